// P11MUX_FAULTY_SCHEDULE (faulty_control.h): slot faults at fixed times after
// C_Initialize, so that a program which cannot reach the control functions
// (p11mux-load through p11mux, the failover bench) gets a member that dies and
// comes back in the middle of a run.
#pragma once

#include <p11mux/pkcs11.h>

#include <chrono>
#include <condition_variable>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace p11mux::faulty {

struct ScheduledFault {
  enum class Action { removed, back, restart, hang, release, fail, clear };
  std::chrono::nanoseconds at{};  // after C_Initialize
  CK_SLOT_ID slot = 0;
  Action action = Action::clear;
  unsigned long arg = 0;  // hang: milliseconds (FAULTY_HANG_UNTIL_RELEASED); fail: the code
  std::string text;       // the entry as written, for the line on stderr
};

// "T:slot=ID:ACTION,..." in the order of T (entries with equal T keep theirs);
// nullopt with a message in `error` if malformed. "" is an empty schedule.
std::optional<std::vector<ScheduledFault>> parse_schedule(std::string_view text,
                                                          std::string& error);

// Applies a schedule on a thread of its own: a monotonic clock, no cost on the
// calls. One per module; start and stop under the module's lifecycle lock.
class Scheduler {
 public:
  ~Scheduler() { stop(); }
  // Starts the schedule's clock now; an empty schedule starts no thread.
  void start(std::vector<ScheduledFault> faults);
  // Faults not yet due are dropped.
  void stop();

 private:
  void run(std::vector<ScheduledFault> faults, std::chrono::steady_clock::time_point t0);

  std::mutex mu_;
  std::condition_variable wake_;
  bool stopping_ = false;  // guarded by mu_
  std::thread thread_;
};

}  // namespace p11mux::faulty
