#include "process.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <stdexcept>

extern char** environ;

namespace p11test {
namespace {

// posix_spawn_file_actions_t with a destructor.
class FileActions {
 public:
  FileActions() { ::posix_spawn_file_actions_init(&actions_); }
  ~FileActions() { ::posix_spawn_file_actions_destroy(&actions_); }
  FileActions(const FileActions&) = delete;
  FileActions& operator=(const FileActions&) = delete;
  posix_spawn_file_actions_t* get() noexcept { return &actions_; }

 private:
  posix_spawn_file_actions_t actions_;
};

}  // namespace

int run_process(const std::vector<std::string>& argv, const std::filesystem::path& log) {
  if (argv.empty()) throw std::invalid_argument("run_process: empty argv");
  std::vector<char*> args;
  for (const auto& arg : argv) args.push_back(const_cast<char*>(arg.c_str()));
  args.push_back(nullptr);

  FileActions actions;
  ::posix_spawn_file_actions_addopen(actions.get(), STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  ::posix_spawn_file_actions_addopen(actions.get(), STDOUT_FILENO, log.c_str(),
                                     O_WRONLY | O_CREAT | O_APPEND, 0600);
  ::posix_spawn_file_actions_adddup2(actions.get(), STDOUT_FILENO, STDERR_FILENO);

  pid_t pid = 0;
  if (int err = ::posix_spawnp(&pid, args[0], actions.get(), nullptr, args.data(), environ)) {
    throw std::runtime_error("cannot start " + argv[0] + ": " + std::strerror(err));
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR)
      throw std::runtime_error("waitpid " + argv[0] + ": " + std::strerror(errno));
  }
  if (!WIFEXITED(status)) throw std::runtime_error(argv[0] + " was killed by a signal");
  return WEXITSTATUS(status);
}

}  // namespace p11test
