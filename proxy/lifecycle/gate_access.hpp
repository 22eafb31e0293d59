// What the layers below the entry points need of the module's call gate
// (call_gate.hpp). The module hands it to the runtime and the session pool;
// they never reach for the global module themselves:
// - a call about to sleep outside the backend (SessionPool::take at the
//   limit) leaves the gate meanwhile, so that fork() is not held up by it;
// - work that no application call carries (pool maintenance, a thread's pool
//   cache given back at thread exit, a polled C_WaitForSlotEvent) enters the
//   gate like a call, so that C_Finalize and fork() wait for its backend calls.
#pragma once

#include <cstddef>
#include <cstdint>

namespace p11mux {

class GateAccess {
 public:
  // Work of p11mux's own in flight. epoch() names the initialization it
  // entered (as SessionPool::epoch()), 0 when p11mux is not initialized:
  // work of another epoch must not touch the backend or the pool.
  class Background {
   public:
    explicit Background(GateAccess& gate) noexcept
        : gate_(gate), epoch_(gate.enter_background(shard_)) {}
    ~Background() {
      if (epoch_ != 0) gate_.leave_background(shard_);
    }
    Background(const Background&) = delete;
    Background& operator=(const Background&) = delete;
    std::uint64_t epoch() const noexcept { return epoch_; }

   private:
    GateAccess& gate_;
    std::size_t shard_ = 0;
    std::uint64_t epoch_;  // after shard_: enter_background() sets it
  };

  // A call that got in is about to sleep outside the backend: fork() does
  // not wait for it. unpark() waits while a fork holds the gate; the call
  // counts as inside again after it. C_Finalize wakes such sleepers itself.
  virtual void park() noexcept = 0;
  virtual void unpark() noexcept = 0;

 protected:
  constexpr GateAccess() = default;
  ~GateAccess() = default;  // not owned through this interface
  GateAccess(const GateAccess&) = default;
  GateAccess& operator=(const GateAccess&) = default;

  // The epoch of the initialization entered, or 0 (then not entered).
  virtual std::uint64_t enter_background(std::size_t& shard) noexcept = 0;
  virtual void leave_background(std::size_t shard) noexcept = 0;
};

}  // namespace p11mux
