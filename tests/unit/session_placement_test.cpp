// Unit tests for proxy/group/session_placement (docs/groups.md, "Sessions
// on a group"): where serialize mode puts a group's new session, by each
// `balance` rule; members found unfit passed over; counts exact under many
// threads; a capacity never exceeded.
#include "group/session_placement.hpp"

#include <p11mux/pkcs11.h>

#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

const auto any = [](std::size_t) { return true; };

std::array<std::uint32_t, 3> counts(const SessionPlacement& p) {
  return {p.sessions(0), p.sessions(1), p.sessions(2)};
}

}  // namespace

TEST_CASE("session placement: least-busy fills the member with the fewest sessions") {
  const std::array<std::uint32_t, 3> cap{};
  SessionPlacement p(Balance::least_busy, cap);
  for (int i = 0; i < 9; ++i) p.place(any);
  CHECK(counts(p) == std::array<std::uint32_t, 3>{3, 3, 3});
  // Two sessions of member 1 close: the next two go there.
  p.release(1);
  p.release(1);
  CHECK(p.place(any) == 1);
  CHECK(p.place(any) == 1);
  CHECK(counts(p) == std::array<std::uint32_t, 3>{3, 3, 3});
}

TEST_CASE("session placement: round-robin takes each member in turn, whatever they hold") {
  const std::array<std::uint32_t, 3> cap{};
  SessionPlacement p(Balance::round_robin, cap);
  for (std::size_t expected : {0, 1, 2, 0, 1}) CHECK(p.place(any) == expected);
  p.release(1);
  p.release(1);  // now {2, 0, 1}: least-busy would take member 1 twice
  CHECK(p.place(any) == 2);
  CHECK(p.place(any) == 0);
  CHECK(counts(p) == std::array<std::uint32_t, 3>{3, 0, 2});
}

TEST_CASE("session placement: primary fills the first member to its capacity, then the next") {
  const std::array<std::uint32_t, 3> cap{2, 1, SessionPlacement::kUnlimited};
  SessionPlacement p(Balance::primary, cap);
  CHECK(p.place(any) == 0);
  CHECK(p.place(any) == 0);
  CHECK(p.place(any) == 1);
  CHECK(p.place(any) == 2);
  CHECK(p.place(any) == 2);
  p.release(0);
  CHECK(p.place(any) == 0);  // back to the primary as soon as it has room
}

TEST_CASE("session placement: primary with every member full spreads as least-busy") {
  const std::array<std::uint32_t, 3> cap{1, 1, 1};
  SessionPlacement p(Balance::primary, cap);
  for (int i = 0; i < 6; ++i) p.place(any);
  CHECK(counts(p) == std::array<std::uint32_t, 3>{2, 2, 2});
}

TEST_CASE("session placement: a member found unfit is passed over and not counted") {
  for (Balance rule : {Balance::least_busy, Balance::round_robin, Balance::primary}) {
    CAPTURE(rule);
    const std::array<std::uint32_t, 3> cap{};
    SessionPlacement p(rule, cap);
    std::vector<std::size_t> asked;
    auto not_first = [&](std::size_t i) {
      asked.push_back(i);
      return i != 0;
    };
    for (int i = 0; i < 6; ++i) CHECK(p.place(not_first) != 0);
    CHECK(p.sessions(0) == 0);
    CHECK(p.sessions(1) + p.sessions(2) == 6);
    // Each member asked at most once per choice: 6 choices, at most 12 asks.
    CHECK(asked.size() <= 12);
    // None fit: none, and nothing counted.
    CHECK(p.place([](std::size_t) { return false; }) == SessionPlacement::kNone);
    CHECK(p.sessions(0) + p.sessions(1) + p.sessions(2) == 6);
  }
}

TEST_CASE("session placement: a token's session limit as a capacity") {
  CHECK(session_capacity(CK_EFFECTIVELY_INFINITE) == SessionPlacement::kUnlimited);
  CHECK(session_capacity(CK_UNAVAILABLE_INFORMATION) == SessionPlacement::kUnlimited);
  CHECK(session_capacity(4) == 4);
  CHECK(session_capacity(0x1'0000'0000UL) == 0xffff'ffffu);
}

TEST_CASE("session placement: many threads placing and closing keep exact counts and capacity") {
  const std::array<std::uint32_t, 3> cap{5, 5, 5};
  SessionPlacement p(Balance::primary, cap);
  std::atomic<bool> over{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 2000; ++i) {
        const std::size_t m = p.place(any);
        // At most 8 sessions at once: the primary's capacity of 5 holds
        // while the others have room (15 in all).
        if (p.sessions(0) > 5) over = true;
        p.release(m);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK_FALSE(over.load());
  CHECK(counts(p) == std::array<std::uint32_t, 3>{0, 0, 0});
}

}  // namespace p11mux
