// Signal handling for a run: Ctrl-C ends the run early with a summary, and a
// crash inside the module is explained before the process dies.
#pragma once

#include <string>

namespace p11mux::load {

// While alive, SIGINT and SIGTERM set a flag instead of killing the process; a
// second Ctrl-C kills as usual.
class InterruptCatcher {
 public:
  InterruptCatcher();
  ~InterruptCatcher();
  InterruptCatcher(const InterruptCatcher&) = delete;
  InterruptCatcher& operator=(const InterruptCatcher&) = delete;
  static bool requested() noexcept;
};

// On SIGSEGV, SIGBUS, SIGILL, SIGFPE or SIGABRT, writes one line to stderr,
// "p11mux-load: fatal: SIGSEGV <message>", then lets the signal take its
// default course (core dump and all).
void install_crash_message(const std::string& message);

}  // namespace p11mux::load
