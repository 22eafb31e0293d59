// The call gate: C_Finalize waits for calls in flight and refuses new ones;
// fork() holds new ones (without refusing them) and waits, bounded.
#include "lifecycle/call_gate.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <future>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

TEST_CASE("a closed gate refuses calls") {
  CallGate gate;
  std::size_t shard = 0;
  CHECK_FALSE(gate.enter(shard));
  gate.open();
  REQUIRE(gate.enter(shard));
  gate.leave(shard);
  gate.close_and_drain();
  CHECK_FALSE(gate.enter(shard));
}

TEST_CASE("close_and_drain returns only after every admitted call has left") {
  CallGate gate;
  gate.open();
  std::atomic<bool> stop{false};
  std::atomic<long> inside{0};
  std::atomic<long> admitted_after_drain{0};
  std::atomic<bool> drained{false};
  std::vector<std::thread> callers;
  for (int t = 0; t < 8; ++t) {
    callers.emplace_back([&] {
      while (!stop.load()) {
        std::size_t shard = 0;
        if (!gate.enter(shard)) continue;
        if (drained.load()) admitted_after_drain.fetch_add(1);
        inside.fetch_add(1);
        std::this_thread::yield();
        inside.fetch_sub(1);
        gate.leave(shard);
      }
    });
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  gate.close_and_drain();
  drained.store(true);
  CHECK(inside.load() == 0);
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  stop.store(true);
  for (auto& t : callers) t.join();
  CHECK(admitted_after_drain.load() == 0);
}

TEST_CASE("fork hold: waits for the calls inside, admits none until resume, refuses none") {
  CallGate gate;
  gate.open();
  std::atomic<bool> stop{false}, in_fork{false};
  std::atomic<long> admitted_in_fork{0}, refused{0}, calls{0};
  std::vector<std::thread> callers;
  for (int t = 0; t < 8; ++t) {
    callers.emplace_back([&] {
      while (!stop.load()) {
        std::size_t shard = 0;
        if (!gate.enter(shard)) {
          refused.fetch_add(1);
          continue;
        }
        if (in_fork.load()) admitted_in_fork.fetch_add(1);
        std::this_thread::yield();
        if (in_fork.load()) admitted_in_fork.fetch_add(1);
        calls.fetch_add(1);
        gate.leave(shard);
      }
    });
  }
  for (int fork = 0; fork < 20; ++fork) {
    std::size_t own = 0;
    REQUIRE(gate.enter(own));  // as the atfork prepare handler does
    CHECK(gate.hold(std::chrono::seconds(20)) == CallGate::Hold::drained);
    in_fork.store(true);
    std::this_thread::sleep_for(std::chrono::milliseconds(1));  // callers arrive and wait
    in_fork.store(false);
    gate.resume();
    gate.leave(own);
  }
  stop.store(true);
  for (auto& t : callers) t.join();
  CHECK(admitted_in_fork.load() == 0);
  CHECK(refused.load() == 0);
  CHECK(calls.load() > 0);
}

TEST_CASE("fork hold is bounded: a call that never leaves makes it time out, not hang") {
  CallGate gate;
  gate.open();
  std::size_t outer = 0, own = 0;
  REQUIRE(gate.enter(outer));  // the forking thread is itself inside a call
  REQUIRE(gate.enter(own));
  CHECK(gate.hold(std::chrono::milliseconds(10)) == CallGate::Hold::timed_out);
  gate.resume();
  gate.leave(own);
  gate.leave(outer);
  std::size_t shard = 0;
  REQUIRE(gate.enter(shard));  // open again
  gate.leave(shard);
}

TEST_CASE(
    "fork hold: nothing to hold when closed; C_Finalize during a fork refuses the held callers") {
  CallGate gate;
  CHECK(gate.hold(std::chrono::seconds(1)) == CallGate::Hold::not_open);
  gate.open();
  std::size_t own = 0;
  REQUIRE(gate.enter(own));
  REQUIRE(gate.hold(std::chrono::seconds(20)) == CallGate::Hold::drained);
  auto held = std::async(std::launch::async, [&] {
    std::size_t shard = 0;
    bool in = gate.enter(shard);
    if (in) gate.leave(shard);
    return in;
  });
  auto finalize = std::async(std::launch::async, [&] { gate.close_and_drain(); });
  CHECK_FALSE(held.get());  // refused once closed, never let in
  gate.resume();            // the gate stays closed
  gate.leave(own);          // the drain was waiting for the forking thread's entry
  finalize.get();
  std::size_t shard = 0;
  CHECK_FALSE(gate.enter(shard));
}

// Issue 10, defect 6: a call asleep outside the backend (waiting for a
// pooled session) does not hold fork() up, and does not go back in while
// the gate is held.
TEST_CASE("fork hold does not wait for parked calls; one waking meanwhile waits for resume") {
  CallGate gate;
  gate.open();
  std::size_t parked_shard = 0;
  REQUIRE(gate.enter(parked_shard));
  gate.park();
  std::size_t own = 0;
  REQUIRE(gate.enter(own));
  CHECK(gate.hold(std::chrono::seconds(20)) == CallGate::Hold::drained);
  std::atomic<bool> unparked{false};
  auto waker = std::async(std::launch::async, [&] {
    gate.unpark();
    unparked.store(true);
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  CHECK_FALSE(unparked.load());  // held: it waits outside the backend
  gate.resume();
  gate.leave(own);
  waker.get();
  CHECK(unparked.load());
  // Unparked, it counts again: a new hold waits for it.
  REQUIRE(gate.enter(own));
  CHECK(gate.hold(std::chrono::milliseconds(10)) == CallGate::Hold::timed_out);
  gate.resume();
  gate.leave(own);
  gate.leave(parked_shard);
  gate.close_and_drain();
}

TEST_CASE("park/unpark racing fork holds: no unparked call is ever inside during a hold") {
  CallGate gate;
  gate.open();
  std::atomic<bool> stop{false}, in_fork{false};
  std::atomic<long> inside_in_fork{0}, rounds{0};
  std::vector<std::thread> sleepers;
  for (int t = 0; t < 4; ++t) {
    sleepers.emplace_back([&] {
      while (!stop.load()) {
        std::size_t shard = 0;
        if (!gate.enter(shard)) continue;
        gate.park();
        std::this_thread::yield();  // "asleep in the pool"
        gate.unpark();
        if (in_fork.load()) inside_in_fork.fetch_add(1);  // "in the backend"
        rounds.fetch_add(1);
        gate.leave(shard);
      }
    });
  }
  for (int fork = 0; fork < 50; ++fork) {
    std::size_t own = 0;
    REQUIRE(gate.enter(own));
    CHECK(gate.hold(std::chrono::seconds(20)) == CallGate::Hold::drained);
    in_fork.store(true);
    std::this_thread::sleep_for(std::chrono::microseconds(200));
    in_fork.store(false);
    gate.resume();
    gate.leave(own);
  }
  stop.store(true);
  for (auto& t : sleepers) t.join();
  CHECK(inside_in_fork.load() == 0);
  CHECK(rounds.load() > 0);
}

}  // namespace
}  // namespace p11mux
