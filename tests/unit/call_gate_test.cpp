// The call gate: C_Finalize waits for calls in flight and refuses new ones.
#include "call_gate.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
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

}  // namespace
}  // namespace p11mux
