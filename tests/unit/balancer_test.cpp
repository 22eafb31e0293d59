// Unit tests for proxy/group/balancer (proxy/group/README.md, "Balancer"):
// least-busy, round-robin and primary; only members that are up, and not
// passed over for their login; no member when none is; and many threads
// choosing and finishing at once.
#include "group/balancer.hpp"

#include <doctest/doctest.h>

#include <array>
#include <atomic>
#include <chrono>
#include <memory>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

using namespace std::chrono_literals;
using Time = MemberHealth::Time;
const Time t0 = Time(1000s);

// N members and the pointers a Balancer takes.
struct Members {
  explicit Members(std::size_t n) {
    MemberHealthRules r;
    for (std::size_t i = 0; i < n; ++i) {
      owned.push_back(std::make_unique<MemberHealth>(r));
      ptrs.push_back(owned.back().get());
    }
  }
  MemberHealth& operator[](std::size_t i) { return *owned[i]; }
  std::vector<std::unique_ptr<MemberHealth>> owned;
  std::vector<MemberHealth*> ptrs;
};

void finish(Balancer& b, const Balancer::Pick& p) { b.member(p.member).end(CKR_OK, 1, t0); }

TEST_CASE("balancer: least-busy takes the member with the fewest calls in flight") {
  Members m(3);
  Balancer b(Balance::least_busy, m.ptrs);
  std::vector<Balancer::Pick> held;
  // Two calls on member 0, one on member 2: member 1 is the least busy.
  m[0].begin();
  held.push_back({0});
  m[0].begin();
  held.push_back({0});
  m[2].begin();
  held.push_back({2});
  Balancer::Pick p = b.pick();
  REQUIRE(p);
  CHECK(p.member == 1);
  CHECK(m[1].in_flight() == 1);  // counted by the pick
  // Now 1 and 2 tie at one call each; 0 has two.
  Balancer::Pick q = b.pick();
  CHECK((q.member == 1 || q.member == 2));
  finish(b, p);
  finish(b, q);
  for (auto& h : held) finish(b, h);
}

TEST_CASE("balancer: least-busy weighs the calls waiting for a member's sessions") {
  // Member 0 has no call in flight but three waiting for a backend session
  // (its pool at the limit); member 1 has one call in flight.
  Members m(2);
  Balancer b(Balance::least_busy, m.ptrs);
  for (int i = 0; i < 3; ++i) m[0].wait_begin();
  m[1].begin();
  const Balancer::Pick busy{1};
  CHECK(m[0].load() == 3);
  CHECK(m[1].load() == 1);
  Balancer::Pick p = b.pick();
  REQUIRE(p);
  CHECK(p.member == 1);
  finish(b, p);
  finish(b, busy);
  for (int i = 0; i < 3; ++i) m[0].wait_end();
  CHECK(m[0].load() == 0);
}

TEST_CASE("balancer: least-busy spreads ties, even one call at a time") {
  Members m(3);
  Balancer b(Balance::least_busy, m.ptrs);
  std::array<int, 3> chosen{};
  for (int i = 0; i < 300; ++i) {
    Balancer::Pick p = b.pick();
    REQUIRE(p);
    ++chosen[p.member];
    finish(b, p);
  }
  CHECK(chosen[0] == 100);
  CHECK(chosen[1] == 100);
  CHECK(chosen[2] == 100);
}

TEST_CASE("balancer: least-busy skips a member that is down, however idle") {
  Members m(3);
  Balancer b(Balance::least_busy, m.ptrs);
  Balancer::Pick busy0 = b.pick(), busy1 = b.pick(), busy2 = b.pick();
  m[1].mark_down(DownReason::device, t0);
  finish(b, busy1);  // member 1 now idle, but down
  for (int i = 0; i < 10; ++i) {
    Balancer::Pick p = b.pick();
    REQUIRE(p);
    CHECK(p.member != 1);
    finish(b, p);
  }
  finish(b, busy0);
  finish(b, busy2);
}

TEST_CASE("balancer: round-robin takes each member up in turn") {
  Members m(3);
  Balancer b(Balance::round_robin, m.ptrs);
  std::vector<std::size_t> order;
  for (int i = 0; i < 6; ++i) {
    Balancer::Pick p = b.pick();
    order.push_back(p.member);
    // Held, not finished: round-robin does not look at load.
  }
  CHECK(order == std::vector<std::size_t>{0, 1, 2, 0, 1, 2});
  CHECK(m[0].in_flight() == 2);
  m[1].mark_down(DownReason::device, t0);
  std::array<int, 3> chosen{};
  for (int i = 0; i < 100; ++i) {
    Balancer::Pick p = b.pick();
    ++chosen[p.member];
    finish(b, p);
  }
  CHECK(chosen[1] == 0);
  CHECK(chosen[0] == 50);  // the turns are among the members up: equal shares
  CHECK(chosen[2] == 50);
}

TEST_CASE("balancer: primary fills the first member up to its capacity, then the next") {
  Members m(3);
  const std::array<std::uint32_t, 3> capacity{2, 2, 2};
  Balancer b(Balance::primary, m.ptrs, capacity);
  std::vector<Balancer::Pick> held;
  for (int i = 0; i < 5; ++i) held.push_back(b.pick());
  CHECK(held[0].member == 0);
  CHECK(held[1].member == 0);
  CHECK(held[2].member == 1);
  CHECK(held[3].member == 1);
  CHECK(held[4].member == 2);
  // A call on the primary ends: it has room again, and takes the next.
  finish(b, held[0]);
  held[0] = b.pick();
  CHECK(held[0].member == 0);
  // Member 2 still has room (2, 2, 1).
  held.push_back(b.pick());
  CHECK(held.back().member == 2);
  held.push_back(b.pick());  // 2, 2, 2 are full: least busy, a tie
  CHECK(m[0].in_flight() + m[1].in_flight() + m[2].in_flight() == 7);
  for (auto& h : held) finish(b, h);
}

TEST_CASE("balancer: primary skips a primary that is down, and returns to it when it is back") {
  Members m(2);
  Balancer b(Balance::primary, m.ptrs);  // no capacity given: unlimited
  Balancer::Pick p = b.pick();
  CHECK(p.member == 0);
  finish(b, p);
  m[0].mark_down(DownReason::device, t0);
  p = b.pick();
  CHECK(p.member == 1);
  finish(b, p);
  REQUIRE(m[0].claim_probe(t0 + 60s));
  m[0].probe_done(true, t0 + 60s);
  p = b.pick();
  CHECK(p.member == 1);  // joining: not yet
  finish(b, p);
  REQUIRE(m[0].admit());
  p = b.pick();
  CHECK(p.member == 0);
  finish(b, p);
}

TEST_CASE("balancer: every rule passes over a member that cannot be logged in") {
  for (Balance rule : {Balance::least_busy, Balance::round_robin, Balance::primary}) {
    CAPTURE(static_cast<int>(rule));
    Members m(3);
    // Member 0 cannot be logged in as its group is (GroupRuntime::login_ready).
    std::array<std::atomic<bool>, 3> passed_over{};
    passed_over[0].store(true);
    Balancer b(rule, m.ptrs, {}, passed_over);
    for (int i = 0; i < 6; ++i) {
      const Balancer::Pick p = b.pick();
      REQUIRE(p);
      CHECK(p.member != 0);
      finish(b, p);
    }
    // Only it left up: none, as if it were down.
    m[1].mark_down(DownReason::device, t0);
    m[2].mark_down(DownReason::device, t0);
    CHECK_FALSE(b.pick());
    // It can be logged in again: chosen.
    passed_over[0].store(false);
    const Balancer::Pick p = b.pick();
    CHECK(p.member == 0);
    finish(b, p);
  }
}

TEST_CASE("balancer: no member when none is up") {
  for (Balance rule : {Balance::least_busy, Balance::round_robin, Balance::primary}) {
    Members m(2);
    Balancer b(rule, m.ptrs);
    m[0].mark_down(DownReason::device, t0);
    m[1].mark_down(DownReason::hung, t0);
    Balancer::Pick p = b.pick();
    CHECK_FALSE(p);
    CHECK(p.member == Balancer::kNone);
    CHECK(m[0].in_flight() == 0);
    CHECK(m[1].in_flight() == 0);
    REQUIRE(m[1].claim_probe(t0 + 60s));  // probing: still not chosen
    CHECK_FALSE(b.pick());
  }
  Members none(0);
  Balancer empty(Balance::round_robin, none.ptrs);
  CHECK_FALSE(empty.pick());
}

// Many threads choosing and finishing: every call is counted on the member it
// went to and ended there, a member down throughout is never chosen, and one
// taken down while they run is never chosen by a pick begun after.
void run_concurrently(Balance rule) {
  Members m(4);
  const std::array<std::uint32_t, 4> capacity{3, 3, 3, 3};
  Balancer b(rule, m.ptrs, capacity);
  m[3].mark_down(DownReason::device, t0);
  constexpr int kThreads = 8;
  constexpr int kPicks = 5000;
  std::atomic<bool> two_down{false};
  std::atomic<int> bad{0};
  std::atomic<int> after_down{0};
  std::array<std::atomic<int>, 4> chosen{};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kPicks; ++i) {
        if (t == 0 && i == kPicks / 2) {
          m[2].mark_down(DownReason::device, t0);
          two_down.store(true, std::memory_order_release);
        }
        const bool down_before = two_down.load(std::memory_order_acquire);
        Balancer::Pick p = b.pick();
        if (!p) {
          bad.fetch_add(1);
          continue;
        }
        if (p.member == 3 || (down_before && p.member == 2)) bad.fetch_add(1);
        if (down_before) after_down.fetch_add(1);
        chosen[p.member].fetch_add(1);
        b.member(p.member).end(i % 11 == 0 ? CKR_PIN_INCORRECT : CKR_OK, 1, t0);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(bad.load() == 0);
  CHECK(after_down.load() > 0);
  std::uint64_t calls = 0;
  for (std::size_t i = 0; i < 4; ++i) {
    CHECK(m[i].in_flight() == 0);
    calls += m[i].counters().calls;
    CHECK(m[i].counters().calls == static_cast<std::uint64_t>(chosen[i].load()));
  }
  CHECK(calls == std::uint64_t{kThreads} * kPicks);
  CHECK(chosen[3].load() == 0);
  if (rule != Balance::primary) {
    CHECK(chosen[0].load() > 0);  // the load went to every member up
    CHECK(chosen[1].load() > 0);
  }
}

TEST_CASE("balancer: many threads, least-busy") { run_concurrently(Balance::least_busy); }
TEST_CASE("balancer: many threads, round-robin") { run_concurrently(Balance::round_robin); }
TEST_CASE("balancer: many threads, primary") { run_concurrently(Balance::primary); }

TEST_CASE("balancer: primary never puts more than capacity on a member while another has room") {
  Members m(3);
  const std::array<std::uint32_t, 3> capacity{2, 2, 100};
  Balancer b(Balance::primary, m.ptrs, capacity);
  std::atomic<int> over{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 2000; ++i) {
        // Three held at once: one thread alone would overfill a member.
        std::array<Balancer::Pick, 3> held;
        for (auto& p : held) {
          p = b.pick();
          if (p.member < 2 && b.member(p.member).in_flight() > 2) over.fetch_add(1);
        }
        for (auto& p : held) finish(b, p);
      }
    });
  }
  for (auto& th : threads) th.join();
  CHECK(over.load() == 0);
  CHECK(m[0].counters().calls > 0);
}

}  // namespace
}  // namespace p11mux
