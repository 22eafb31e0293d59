#include "signals.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <csignal>
#include <cstring>

namespace p11mux::load {
namespace {

volatile std::sig_atomic_t g_interrupted = 0;
struct sigaction g_saved_int {
}, g_saved_term{};

extern "C" void on_interrupt(int) { g_interrupted = 1; }

// Written by install_crash_message before any worker starts, only read after.
char g_crash_message[512];
std::size_t g_crash_length = 0;

void write_stderr(const char* text, std::size_t length) {
  ssize_t ignored = ::write(STDERR_FILENO, text, length);
  (void)ignored;
}

extern "C" void on_crash(int sig) {
  // Only async-signal-safe calls here: write(2) and raise(3).
  const char* name = sig == SIGSEGV  ? "SIGSEGV"
                     : sig == SIGBUS ? "SIGBUS"
                     : sig == SIGILL ? "SIGILL"
                     : sig == SIGFPE ? "SIGFPE"
                                     : "SIGABRT";
  static const char kPrefix[] = "\np11mux-load: fatal: ";
  write_stderr(kPrefix, sizeof kPrefix - 1);
  write_stderr(name, std::strlen(name));
  write_stderr(g_crash_message, g_crash_length);
  ::raise(sig);  // SA_RESETHAND restored the default action; SA_NODEFER lets it through
}

}  // namespace

InterruptCatcher::InterruptCatcher() {
  g_interrupted = 0;
  struct sigaction sa {};
  sa.sa_handler = on_interrupt;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESTART | SA_RESETHAND;
  ::sigaction(SIGINT, &sa, &g_saved_int);
  ::sigaction(SIGTERM, &sa, &g_saved_term);
}

InterruptCatcher::~InterruptCatcher() {
  ::sigaction(SIGINT, &g_saved_int, nullptr);
  ::sigaction(SIGTERM, &g_saved_term, nullptr);
}

bool InterruptCatcher::requested() noexcept { return g_interrupted != 0; }

void install_crash_message(const std::string& message) {
  std::string line = " " + message + "\n";
  g_crash_length = std::min(line.size(), sizeof g_crash_message);
  std::memcpy(g_crash_message, line.data(), g_crash_length);
  struct sigaction sa {};
  sa.sa_handler = on_crash;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = SA_RESETHAND | SA_NODEFER;
  for (int sig : {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT}) ::sigaction(sig, &sa, nullptr);
}

}  // namespace p11mux::load
