#include "softhsm_token.h"

#include "process.h"

#include <fstream>
#include <iterator>
#include <stdexcept>

namespace p11test {
namespace {

std::filesystem::path write_config(const std::filesystem::path& dir) {
  std::filesystem::create_directory(dir / "tokens");
  const auto conf = dir / "softhsm2.conf";
  std::ofstream out(conf);
  out << "directories.tokendir = " << (dir / "tokens").string() << "\n"
      << "objectstore.backend = file\n"
      << "log.level = ERROR\n";
  out.close();
  if (!out) throw std::runtime_error("cannot write " + conf.string());
  return conf;
}

std::string read_file(const std::filesystem::path& path) {
  std::ifstream in(path);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

}  // namespace

SoftHsmToken::SoftHsmToken(const std::string& label)
    : dir_("p11mux-itest-"),
      conf_("SOFTHSM2_CONF", write_config(dir_.path()).string()),
      label_(label) {
  add_token(label_);
}

void SoftHsmToken::add_token(const std::string& label) const {
  const auto log = dir_.path() / "softhsm2-util.log";
  const std::string util = env_or("P11MUX_TEST_SOFTHSM2_UTIL", "softhsm2-util");
  const int status = run_process(
      {util, "--init-token", "--free", "--label", label, "--so-pin", kSoPin, "--pin", kUserPin},
      log);
  if (status != 0) {
    throw std::runtime_error(util + " --init-token exited with " + std::to_string(status) + ": " +
                             read_file(log));
  }
}

}  // namespace p11test
