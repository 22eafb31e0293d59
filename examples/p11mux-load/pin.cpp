#include "pin.h"

#include <fcntl.h>
#include <termios.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstring>

#include "module.h"

namespace p11mux::load {
namespace {

void write_all(int fd, const std::string& s) {
  const char* p = s.data();
  std::size_t left = s.size();
  while (left > 0) {
    ssize_t n = ::write(fd, p, left);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return;
    p += n;
    left -= static_cast<std::size_t>(n);
  }
}

// Restores the terminal however we leave prompt_pin.
class EchoOff {
 public:
  explicit EchoOff(int fd) : fd_(fd) {
    if (::tcgetattr(fd_, &saved_) == 0) {
      termios quiet = saved_;
      quiet.c_lflag &= ~static_cast<tcflag_t>(ECHO | ECHONL);
      active_ = ::tcsetattr(fd_, TCSAFLUSH, &quiet) == 0;
    }
  }
  ~EchoOff() {
    if (active_) ::tcsetattr(fd_, TCSAFLUSH, &saved_);
  }
  EchoOff(const EchoOff&) = delete;
  EchoOff& operator=(const EchoOff&) = delete;

 private:
  int fd_;
  termios saved_{};
  bool active_ = false;
};

volatile std::sig_atomic_t g_prompt_interrupted = 0;
extern "C" void on_prompt_interrupt(int) { g_prompt_interrupted = 1; }

// While prompting, Ctrl-C must not leave the terminal with echo off: catch it
// (without SA_RESTART, so read() returns EINTR) and unwind normally.
class CatchInterrupt {
 public:
  CatchInterrupt() {
    g_prompt_interrupted = 0;
    struct sigaction sa {};
    sa.sa_handler = on_prompt_interrupt;
    sigemptyset(&sa.sa_mask);
    ::sigaction(SIGINT, &sa, &saved_);
  }
  ~CatchInterrupt() { ::sigaction(SIGINT, &saved_, nullptr); }
  CatchInterrupt(const CatchInterrupt&) = delete;
  CatchInterrupt& operator=(const CatchInterrupt&) = delete;

 private:
  struct sigaction saved_ {};
};

}  // namespace

void wipe(std::string& secret) noexcept {
  if (!secret.empty()) ::explicit_bzero(secret.data(), secret.size());
  secret.clear();
}

std::string prompt_pin(const std::string& token_label) {
  int fd = ::open("/dev/tty", O_RDWR | O_NOCTTY | O_CLOEXEC);
  if (fd < 0) {
    throw SetupError("no PIN given and no terminal to ask for one: use --pin, P11MUX_LOAD_PIN or --no-login");
  }
  std::string pin;
  pin.reserve(256);  // no reallocation leaving copies behind for any sane PIN
  bool interrupted = false;
  {
    CatchInterrupt catch_interrupt;
    EchoOff echo_off(fd);
    write_all(fd, "User PIN for token '" + token_label + "': ");
    char c;
    while (true) {
      ssize_t n = ::read(fd, &c, 1);
      if (n < 0 && errno == EINTR && !g_prompt_interrupted) continue;
      if (g_prompt_interrupted) {
        interrupted = true;
        break;
      }
      if (n <= 0 || c == '\n' || c == '\r') break;
      pin.push_back(c);
    }
    c = 0;
    write_all(fd, "\n");
  }
  ::close(fd);
  if (interrupted) {
    wipe(pin);
    throw SetupError("interrupted while reading the PIN");
  }
  return pin;
}

}  // namespace p11mux::load
