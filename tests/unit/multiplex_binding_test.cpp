// Multiplex mode's choice of binding (the rules at the top of
// proxy/forward/multiplex.hpp), on a Session built here: no backend, no
// Runtime, no .so loaded. Thread numbers are passed explicitly (1 is the
// calling thread, others are other threads); the backend handles are made up.
#include "forward/multiplex.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

constexpr std::uint64_t kMe = 1;
const LockSource kNoCallbacks{};

// A binding's owner and busy flag, as the tests set them (Binding::claim).
void set_owner(Binding& b, std::uint64_t owner) { b.claim = owner << 1; }
void hold(Binding& b) { b.claim |= Binding::kBusy; }

// Runs body(1) and body(2) on two threads at once, over and over, for
// `length`: for races whose window is a few instructions wide.
template <class Body>
void race(Body body, std::chrono::milliseconds length = std::chrono::milliseconds(300)) {
  std::atomic<int> ready{0};
  std::atomic<bool> stop{false};
  auto loop = [&](std::uint64_t me) {
    ready.fetch_add(1);
    while (ready.load() < 2) {
    }
    while (!stop.load(std::memory_order_relaxed)) body(me);
  };
  std::thread one(loop, 1);
  std::thread two(loop, 2);
  std::this_thread::sleep_for(length);
  stop = true;
  one.join();
  two.join();
}

void spin_a_moment() {
  std::atomic<int> n{0};
  while (n.fetch_add(1, std::memory_order_relaxed) < 200) {
  }
}

// A session with its anchor open on backend session 100.
struct TestSession {
  Session s{kNoCallbacks};
  TestSession() { s.anchor.backend = 100; }

  // An extra binding on backend session `backend`, as bind_from_pool leaves one.
  Binding& extra(CK_SESSION_HANDLE backend, std::uint64_t owner, OpMask ops = 0) {
    Binding* b = add_binding(s, backend);
    REQUIRE(b != nullptr);
    set_owner(*b, owner);
    b->ops = ops;
    return *b;
  }

  // The claim as forward_multiplexed makes it: counted, then the anchor
  // without the lock, then the rules under it.
  template <class F>
  Binding* claim(std::uint64_t me = kMe) {
    enter_call(s);
    if (Binding* b = claim_anchor<F>(s, me)) return b;
    MutexGuard guard(s.lock);
    Binding* b = choose_binding<F>(s, me);
    if (b == nullptr) leave_call(s);  // forward_multiplexed would go to the pool
    return b;
  }
};

TEST_CASE("a call continuing an operation runs on this thread's binding where it is active") {
  TestSession t;
  set_owner(t.s.anchor, kMe);  // free, but without the operation
  Binding& other = t.extra(200, /*owner=*/2, op::encrypt);
  Binding& mine = t.extra(201, kMe, op::encrypt);
  Binding* b = t.claim<fn::C_EncryptUpdate>();
  CHECK(b == &mine);  // not the anchor (rule 2), not the other thread's (rule 1's hand-off)
  CHECK(b->busy());
  CHECK_FALSE(other.busy());
  CHECK_FALSE(t.s.anchor.busy());
}

TEST_CASE("the inline path takes this thread's anchor only if it holds the continued operation") {
  TestSession t;
  set_owner(t.s.anchor, kMe);  // free, this thread's, but the operation is elsewhere
  Binding& holder = t.extra(200, /*owner=*/2, op::sign);
  CHECK(t.claim<fn::C_SignUpdate>() == &holder);
  CHECK(holder.owner() == kMe);
  CHECK_FALSE(t.s.anchor.busy());
  // It does take the anchor when the anchor holds it.
  TestSession u;
  set_owner(u.s.anchor, kMe);
  u.s.anchor.ops = op::sign;
  u.extra(200, /*owner=*/2, op::sign);
  CHECK(u.claim<fn::C_SignFinal>() == &u.s.anchor);
}

TEST_CASE("an operation is handed off from its one free holder to another thread") {
  TestSession t;
  set_owner(t.s.anchor, 2);
  t.s.anchor.ops = op::digest;
  Binding& mine = t.extra(200, kMe);  // free and this thread's, but without the operation
  Binding* b = t.claim<fn::C_DigestUpdate>();
  CHECK(b == &t.s.anchor);
  CHECK(t.s.anchor.owner() == kMe);  // the binding follows the operation to this thread
  CHECK(t.s.anchor.busy());
  CHECK_FALSE(mine.busy());
}

TEST_CASE("no hand-off when two other bindings hold the operation") {
  TestSession t;
  set_owner(t.s.anchor, 2);
  t.s.anchor.ops = op::find;
  Binding& third = t.extra(200, /*owner=*/3, op::find);
  Binding& mine = t.extra(201, kMe);
  // Which one is meant is unknowable: the call runs as any other would, and
  // the backend answers it (CKR_OPERATION_NOT_INITIALIZED).
  CHECK(t.claim<fn::C_FindObjects>() == &mine);
  CHECK(t.s.anchor.owner() == 2);
  CHECK(third.owner() == 3);
}

TEST_CASE("no hand-off from a busy holder: the call runs elsewhere") {
  TestSession t;
  set_owner(t.s.anchor, 2);
  t.s.anchor.ops = op::encrypt;
  hold(t.s.anchor);
  Binding& mine = t.extra(200, kMe);
  CHECK(t.claim<fn::C_EncryptUpdate>() == &mine);
}

TEST_CASE("a v3.0 message call waits while the binding holding its operation is busy") {
  TestSession t;
  set_owner(t.s.anchor, 2);
  t.s.anchor.ops = op::message_encrypt;
  hold(t.s.anchor);
  enter_call(t.s);                            // thread 2's call on it
  Binding& idle = t.extra(200, /*owner=*/3);  // free, no operation: rule 3 would take it
  std::atomic<bool> claimed{false};
  Binding* b = nullptr;
  std::thread caller([&] {
    b = t.claim<fn::C_EncryptMessage>();
    claimed = true;
  });
  // Not a timed assertion: the result below is the same however long this
  // takes; the sleep only makes it likely that the caller is waiting.
  std::this_thread::sleep_for(std::chrono::milliseconds(20));
  const bool claimed_early = claimed;
  {
    MutexGuard guard(t.s.lock);  // thread 2's call ends
    t.s.anchor.release();
    leave_call(t.s);
  }
  caller.join();
  CHECK(b == &t.s.anchor);
  CHECK(t.s.anchor.owner() == kMe);
  CHECK_FALSE(idle.busy());
  CHECK_FALSE(claimed_early);
}

TEST_CASE("a message call waiting for the anchor gets it when its call gives it back unlocked") {
  TestSession t;
  set_owner(t.s.anchor, 2);
  t.s.anchor.ops = op::message_sign;
  hold(t.s.anchor);
  enter_call(t.s);  // thread 2's call on it (one that changes nothing: give_back)
  Binding& idle = t.extra(200, /*owner=*/3);
  Binding* b = nullptr;
  std::thread caller([&] { b = t.claim<fn::C_SignMessage>(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // likely waiting by now
  give_back(t.s, t.s.anchor);                                  // without the session lock
  caller.join();
  CHECK(b == &t.s.anchor);
  CHECK(t.s.anchor.owner() == kMe);
  CHECK_FALSE(idle.busy());
  {
    MutexGuard guard(t.s.lock);
    t.s.anchor.release();
    leave_call(t.s);
  }
  CHECK(t.s.in_flight.load() == 0);
}

// Issue 13: 64 threads on one session at the pool's limit wait for any
// binding (bind_from_pool); each call that ended woke all of them, and all
// but one found nothing and slept again. A call that ends wakes one now.
// The waiters below do what bind_from_pool does (the pool left out), with a
// backstop long enough that every wake-up counted is one a call made.
TEST_CASE(
    "a call that frees a binding wakes one call waiting in line for any, not all (issue 13)") {
  TestSession t;
  set_owner(t.s.anchor, 2);
  hold(t.s.anchor);
  enter_call(t.s);  // thread 2's call on the session's one binding
  constexpr int kWaiters = 8;
  std::atomic<int> wakeups{0}, served{0};
  std::vector<std::thread> waiters;
  for (int i = 0; i < kWaiters; ++i) {
    waiters.emplace_back([&t, &wakeups, &served, me = std::uint64_t(10 + i)] {
      enter_call(t.s);
      MutexGuard guard(t.s.lock);
      for (;;) {
        join_line(t.s);
        const std::uint32_t ticket = line_ticket(t.s);
        if (Binding* b = claim_held_now(t.s, me)) {
          leave_line(t.s);
          served.fetch_add(1);
          // Its backend call, without the lock: a waiter woken now finds
          // the binding busy and sleeps again.
          t.s.lock.unlock();
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
          t.s.lock.lock();
          b->release();  // the next in line gets it
          leave_call(t.s);
          return;
        }
        wait_in_line(
            t.s, ticket,
            [&t]() NO_THREAD_SAFETY_ANALYSIS { return t.s.anchor.busy(std::memory_order_seq_cst); },
            std::chrono::seconds(30));
        leave_line(t.s);
        wakeups.fetch_add(1);
      }
    });
  }
  // All in line, and (likely, after the sleep) asleep: one that is not yet
  // only adds a wake-up or two below.
  while (t.s.in_flight.load() < 1 + kWaiters + kWaiters * kWaiter) std::this_thread::yield();
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  {
    MutexGuard guard(t.s.lock);  // thread 2's call ends
    t.s.anchor.release();
    leave_call(t.s);
  }
  for (auto& w : waiters) w.join();
  CHECK(served.load() == kWaiters);
  // At most one wake-up each: each call that ended woke the next (one that
  // was not asleep yet needed none). Waking all would make 8 + 7 + ... + 1.
  CHECK(wakeups.load() <= kWaiters + 4);
  CHECK(t.s.in_flight.load() == 0);
  CHECK(t.s.in_line.load() == 0);
}

// Issue 13, the livelock of 16 threads on one session at the pool's limit:
// a binding's operations were known by kind only. Thread kMe (G) verifies
// as the guest of thread 2's binding; thread 3 (H) verifies as the guest of
// G's anchor. G's C_Verify took its anchor (its own, holding "a
// verification") and ended H's; its own stayed active on thread 2's binding
// for good, and every C_VerifyInit of thread 2 answered CKR_OPERATION_ACTIVE.
struct GuestsOfEachOther : TestSession {
  Binding* other = nullptr;  // thread 2's, where G verifies as its guest
  GuestsOfEachOther() {
    set_owner(s.anchor, kMe);
    s.anchor.ops = op::sign | op::verify;  // G's signature, H's verification
    s.anchor.guest = 3;
    s.anchor.guest_ops = op::verify;
    other = &extra(200, /*owner=*/2, op::digest | op::verify);
    other->guest = kMe;
    other->guest_ops = op::verify;
  }
  template <class F>
  Binding* claim_on_state(std::uint64_t me = kMe) {
    enter_call(s);
    if (Binding* b = claim_anchor<F>(s, me)) return b;
    MutexGuard guard(s.lock);
    Binding* b = choose_binding<F>(s, me, /*on_state=*/true);
    if (b == nullptr) leave_call(s);
    return b;
  }
};

TEST_CASE("a call continuing an operation runs where its thread started it, as owner or guest") {
  for (bool on_state : {false, true}) {
    CAPTURE(on_state);
    GuestsOfEachOther t;
    Binding* b = on_state ? t.claim_on_state<fn::C_Verify>() : t.claim<fn::C_Verify>();
    CHECK(b == t.other);             // G's verification, not H's on G's anchor
    CHECK(t.other->owner() == 2);    // still thread 2's: G is its guest
    CHECK_FALSE(t.s.anchor.busy());  // claimed without the lock, and given up
    GuestsOfEachOther u;
    CHECK(u.claim_on_state<fn::C_Verify>(3) == &u.s.anchor);  // H's is on G's anchor
    CHECK(u.claim_on_state<fn::C_Verify>(2) == nullptr);      // thread 2 has none: the pool decides
    GuestsOfEachOther v;
    CHECK(v.claim<fn::C_SignFinal>() == &v.s.anchor);  // G's own signature, inline
  }
}

// G's anchor holds H's verification (H its guest), thread 2's binding its
// own; G has none: G's C_VerifyInit would collide with either
// (CKR_OPERATION_ACTIVE), on a backend where G has no verification at all.
struct VerifiedByOthers : TestSession {
  Binding* other = nullptr;
  VerifiedByOthers() {
    set_owner(s.anchor, kMe);
    s.anchor.ops = op::sign | op::verify;
    s.anchor.guest = 3;
    s.anchor.guest_ops = op::verify;
    other = &extra(200, /*owner=*/2, op::verify);
  }
};

TEST_CASE("a call starting an operation never runs where another thread has that kind active") {
  VerifiedByOthers t;
  Binding& idle = t.extra(201, /*owner=*/4);
  CHECK(t.claim<fn::C_VerifyInit>() == &idle);
  CHECK_FALSE(t.s.anchor.busy());
  // Another kind is no obstacle: the anchor, inline.
  VerifiedByOthers u;
  CHECK(u.claim<fn::C_DecryptInit>() == &u.s.anchor);
  // At the pool's limit (claim_held_now): thread 5's binding is clear of
  // verifications, and G becomes its guest.
  VerifiedByOthers v;
  Binding& fifth = v.extra(201, /*owner=*/5, op::sign);
  {
    MutexGuard guard(v.s.lock);
    CHECK(could_take_held(v.s.anchor, kMe, op::verify, /*continuing=*/true) == false);
    CHECK(could_take_held(*v.other, kMe, op::verify, /*continuing=*/false) == false);
    CHECK(claim_held_now(v.s, kMe, op::verify) == &fifth);
    CHECK(fifth.guest == kMe);
    CHECK(fifth.owner() == 5);
  }
  // With none clear, a call starting one falls back to its own binding,
  // where the backend answers; one continuing waits, or is refused.
  VerifiedByOthers w;
  {
    MutexGuard guard(w.s.lock);
    CHECK(claim_held_now(w.s, kMe, op::verify) == nullptr);
    CHECK(could_take_held(w.s.anchor, kMe, op::verify, /*continuing=*/false));
    CHECK(claim_own_held_now(w.s, kMe) == &w.s.anchor);
  }
}

TEST_CASE("the operations a guest starts are its own; ended ones are nobody's") {
  const std::uint64_t me = this_thread_number();
  Binding b;
  b.backend = 100;
  set_owner(b, me + 1);  // another thread's: this call runs as its guest
  b.ops = op::sign;      // the owner's
  b.ops |= op::verify;   // what this call started
  note_guest_ops(b, op::sign);
  CHECK(b.guest_ops == op::verify);
  b.ops = op::verify;  // the owner's signature ended, by its owner
  set_owner(b, me);
  note_guest_ops(b, op::sign | op::verify);
  CHECK(b.guest_ops == op::verify);  // still the guest's
  b.ops = op::verify | op::digest;   // the owner starts a digest
  note_guest_ops(b, op::verify);
  CHECK(b.guest_ops == op::verify);
  b.ops = op::digest;  // the guest's verification ended
  note_guest_ops(b, op::verify | op::digest);
  CHECK(b.guest_ops == 0);
  // A call that changed nothing changes nothing.
  b.guest_ops = op::digest;
  note_guest_ops(b, op::digest);
  CHECK(b.guest_ops == op::digest);
}

TEST_CASE("a call that continues no operation runs on this thread's own free binding") {
  TestSession t;
  set_owner(t.s.anchor, 2);                       // free, no operation: rule 3 would take it
  Binding& mine = t.extra(200, kMe, op::verify);  // an operation on it does not matter
  CHECK(t.claim<fn::C_GenerateRandom>() == &mine);
  CHECK_FALSE(t.s.anchor.busy());
  // The anchor too, on the inline path.
  TestSession u;
  set_owner(u.s.anchor, kMe);
  u.s.anchor.ops = op::verify;
  u.extra(200, /*owner=*/2);
  CHECK(u.claim<fn::C_GenerateRandom>() == &u.s.anchor);
}

TEST_CASE("a call on a busy binding of its own runs elsewhere") {
  TestSession t;
  set_owner(t.s.anchor, kMe);
  hold(t.s.anchor);  // this thread, re-entered from a callback (Notify)
  Binding& other = t.extra(200, /*owner=*/2);
  CHECK(t.claim<fn::C_GenerateRandom>() == &other);
}

TEST_CASE(
    "otherwise any free binding with no operation active, and not one an error may have left") {
  TestSession t;
  set_owner(t.s.anchor, 2);
  hold(t.s.anchor);
  Binding& active = t.extra(200, /*owner=*/3, op::sign);
  Binding& maybe = t.extra(201, /*owner=*/4);
  maybe.maybe = op::decrypt;
  Binding& idle = t.extra(202, /*owner=*/5);
  Binding* b = t.claim<fn::C_GenerateRandom>();
  CHECK(b == &idle);
  CHECK(idle.owner() == kMe);  // now this thread's
  CHECK(idle.busy());
  CHECK_FALSE(active.busy());
  CHECK_FALSE(maybe.busy());
  CHECK(maybe.owner() == 4);
}

TEST_CASE("otherwise none: a new binding from the pool, in a detached binding's place") {
  TestSession t;
  set_owner(t.s.anchor, 2);
  hold(t.s.anchor);
  t.extra(200, /*owner=*/3, op::sign);
  Binding& maybe = t.extra(201, /*owner=*/4);
  maybe.maybe = op::decrypt;
  Binding& detached = t.extra(202, kMe);
  detached.clear();  // given back to the pool (detach_if_idle): never chosen
  CHECK(t.claim<fn::C_GenerateRandom>() == nullptr);
  CHECK(t.s.in_flight.load() == 0);
  // The pool's session takes the detached binding's place.
  CHECK(add_binding(t.s, 300) == &detached);
  CHECK(t.s.extra.size() == 3);
}

TEST_CASE("the anchor claimed without the lock is never also chosen under it") {
  // Thread 1 claims its anchor without the lock (claim_anchor); thread 2 has
  // no binding, so the rules under the lock choose the anchor whenever they
  // find it free (rule 3), and make it thread 2's; thread 2 hands it back to
  // thread 1 before freeing it, so that thread 1 keeps claiming it without
  // the lock. Each checks that nobody else runs on it. Fails when a claim
  // under the lock sets `busy` after reading it clear instead of claiming it
  // with a compare-exchange (search_binding): thread 1 can claim it in
  // between.
  TestSession t;
  set_owner(t.s.anchor, kMe);
  std::atomic<int> running{0};
  std::atomic<int> overlaps{0};
  std::atomic<int> lock_free_claims{0};
  race([&](std::uint64_t me) {
    enter_call(t.s);
    Binding* b = claim_anchor<fn::C_GenerateRandom>(t.s, me);
    if (b != nullptr) {
      lock_free_claims.fetch_add(1);
    } else {
      MutexGuard guard(t.s.lock);
      b = choose_binding<fn::C_GenerateRandom>(t.s, me);
      if (b == nullptr) {  // the anchor was busy: forward_multiplexed would go to the pool
        leave_call(t.s);
        return;
      }
    }
    if (running.fetch_add(1) != 0) overlaps.fetch_add(1);
    spin_a_moment();  // a backend call: long enough for an overlap to show
    running.fetch_sub(1);
    if (me != kMe) t.s.anchor.claim.store((kMe << 1) | Binding::kBusy);  // still held
    give_back(t.s, *b);
    if (me == kMe) spin_a_moment();  // between calls: thread 2 finds the anchor free
  });
  CHECK(overlaps.load() == 0);
  CHECK(lock_free_claims.load() > 0);
  CHECK(t.s.in_flight.load() == 0);
  CHECK_FALSE(t.s.anchor.busy());
}

TEST_CASE("message calls from two threads always reach the anchor holding their operation") {
  // Thread 1 owns the anchor and claims it without the lock; thread 2 (and
  // thread 1, once thread 2 has taken it over) waits for it under the lock
  // (claim_when_free). Thread 2 has a free binding of its own: a message
  // call must never run there. Fails when claim_when_free sees the holder
  // free and leaves the claim to search_binding: the owner can claim it
  // without the lock in between, and the search then picks the free one.
  TestSession t;
  set_owner(t.s.anchor, kMe);
  t.s.anchor.ops = op::message_encrypt;
  t.extra(200, /*owner=*/2);
  std::atomic<int> elsewhere{0};
  std::atomic<int> running{0};
  std::atomic<int> overlaps{0};
  race([&](std::uint64_t me) {
    Binding* b = t.claim<fn::C_EncryptMessage>(me);
    if (b != &t.s.anchor) {
      elsewhere.fetch_add(1);
      if (b == nullptr) return;
    }
    if (running.fetch_add(1) != 0) overlaps.fetch_add(1);
    spin_a_moment();  // a backend call: long enough for an overlap to show
    running.fetch_sub(1);
    give_back(t.s, *b);
    if (me == kMe) spin_a_moment();  // between calls: thread 2 finds the anchor free
  });
  CHECK(elsewhere.load() == 0);
  CHECK(overlaps.load() == 0);
  CHECK(t.s.in_flight.load() == 0);
}

TEST_CASE("a call never holds another thread's anchor, nor its own without the call's operation") {
  // claim_anchor's one compare-exchange fails on another thread's anchor,
  // leaving it untouched (a continuing call of its owner must find it free).
  TestSession t;
  set_owner(t.s.anchor, 2);
  t.s.anchor.ops = op::sign;  // thread 2's operation: rule 3 does not take it either
  Binding& mine = t.extra(200, kMe);
  enter_call(t.s);
  CHECK(claim_anchor<fn::C_GenerateRandom>(t.s, kMe) == nullptr);
  CHECK(t.s.anchor.claim.load() == (std::uint64_t{2} << 1));  // never claimed, not even briefly
  leave_call(t.s);
  CHECK(t.claim<fn::C_GenerateRandom>() == &mine);
  // Its own anchor without the operation a call continues: claimed, then
  // freed at once, the owner kept.
  TestSession u;
  set_owner(u.s.anchor, kMe);
  u.s.anchor.ops = op::digest;
  enter_call(u.s);
  CHECK(claim_anchor<fn::C_SignUpdate>(u.s, kMe) == nullptr);
  leave_call(u.s);
  CHECK_FALSE(u.s.anchor.busy());
  CHECK(u.s.anchor.owner() == kMe);
  CHECK(u.s.in_flight.load() == 0);
}

}  // namespace
}  // namespace p11mux
