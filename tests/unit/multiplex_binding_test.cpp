// Multiplex mode's choice of binding (the rules at the top of
// proxy/forward/multiplex.hpp), on a Session built here: no backend, no
// Runtime, no .so loaded. Thread numbers are passed explicitly (1 is the
// calling thread, others are other threads); the backend handles are made up.
#include "forward/multiplex.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <chrono>
#include <thread>

namespace p11mux {
namespace {

constexpr std::uint64_t kMe = 1;
const LockSource kNoCallbacks{};

// A session with its anchor open on backend session 100.
struct TestSession {
  Session s{kNoCallbacks};
  TestSession() { s.anchor.backend = 100; }

  // An extra binding on backend session `backend`, as bind_from_pool leaves one.
  Binding& extra(CK_SESSION_HANDLE backend, std::uint64_t owner, OpMask ops = 0) {
    Binding& b = *add_binding(s, backend);
    b.owner = owner;
    b.ops = ops;
    return b;
  }

  // claim_binding as forward_multiplexed calls it: counted, under the lock.
  template <class F>
  Binding* claim(std::uint64_t me = kMe) {
    MutexGuard guard(s.lock);
    enter_call(s);
    Binding* b = claim_binding<F>(s, me);
    if (b == nullptr) leave_call(s);  // forward_multiplexed would go to the pool
    return b;
  }
};

TEST_CASE("a call continuing an operation runs on this thread's binding where it is active") {
  TestSession t;
  t.s.anchor.owner = kMe;  // free, but without the operation
  Binding& other = t.extra(200, /*owner=*/2, op::encrypt);
  Binding& mine = t.extra(201, kMe, op::encrypt);
  Binding* b = t.claim<fn::C_EncryptUpdate>();
  CHECK(b == &mine);  // not the anchor (rule 2), not the other thread's (rule 1's hand-off)
  CHECK(b->busy);
  CHECK_FALSE(other.busy);
  CHECK_FALSE(t.s.anchor.busy);
}

TEST_CASE("the inline path takes this thread's anchor only if it holds the continued operation") {
  TestSession t;
  t.s.anchor.owner = kMe;  // free, this thread's, but the operation is elsewhere
  Binding& holder = t.extra(200, /*owner=*/2, op::sign);
  CHECK(t.claim<fn::C_SignUpdate>() == &holder);
  CHECK(holder.owner == kMe);
  CHECK_FALSE(t.s.anchor.busy);
  // It does take the anchor when the anchor holds it.
  TestSession u;
  u.s.anchor.owner = kMe;
  u.s.anchor.ops = op::sign;
  u.extra(200, /*owner=*/2, op::sign);
  CHECK(u.claim<fn::C_SignFinal>() == &u.s.anchor);
}

TEST_CASE("an operation is handed off from its one free holder to another thread") {
  TestSession t;
  t.s.anchor.owner = 2;
  t.s.anchor.ops = op::digest;
  Binding& mine = t.extra(200, kMe);  // free and this thread's, but without the operation
  Binding* b = t.claim<fn::C_DigestUpdate>();
  CHECK(b == &t.s.anchor);
  CHECK(t.s.anchor.owner == kMe);  // the binding follows the operation to this thread
  CHECK(t.s.anchor.busy);
  CHECK_FALSE(mine.busy);
}

TEST_CASE("no hand-off when two other bindings hold the operation") {
  TestSession t;
  t.s.anchor.owner = 2;
  t.s.anchor.ops = op::find;
  Binding& third = t.extra(200, /*owner=*/3, op::find);
  Binding& mine = t.extra(201, kMe);
  // Which one is meant is unknowable: the call runs as any other would, and
  // the backend answers it (CKR_OPERATION_NOT_INITIALIZED).
  CHECK(t.claim<fn::C_FindObjects>() == &mine);
  CHECK(t.s.anchor.owner == 2);
  CHECK(third.owner == 3);
}

TEST_CASE("no hand-off from a busy holder: the call runs elsewhere") {
  TestSession t;
  t.s.anchor.owner = 2;
  t.s.anchor.ops = op::encrypt;
  t.s.anchor.busy = true;
  Binding& mine = t.extra(200, kMe);
  CHECK(t.claim<fn::C_EncryptUpdate>() == &mine);
}

TEST_CASE("a v3.0 message call waits while the binding holding its operation is busy") {
  TestSession t;
  t.s.anchor.owner = 2;
  t.s.anchor.ops = op::message_encrypt;
  t.s.anchor.busy = true;
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
    t.s.anchor.busy = false;
    leave_call(t.s);
  }
  caller.join();
  CHECK(b == &t.s.anchor);
  CHECK(t.s.anchor.owner == kMe);
  CHECK_FALSE(idle.busy);
  CHECK_FALSE(claimed_early);
}

TEST_CASE("a message call waiting for the anchor gets it when its call gives it back unlocked") {
  TestSession t;
  t.s.anchor.owner = 2;
  t.s.anchor.ops = op::message_sign;
  t.s.anchor.busy = true;
  enter_call(t.s);  // thread 2's call on it (one that changes nothing: give_back)
  Binding& idle = t.extra(200, /*owner=*/3);
  Binding* b = nullptr;
  std::thread caller([&] { b = t.claim<fn::C_SignMessage>(); });
  std::this_thread::sleep_for(std::chrono::milliseconds(20));  // likely waiting by now
  give_back(t.s, t.s.anchor);                                  // without the session lock
  caller.join();
  CHECK(b == &t.s.anchor);
  CHECK(t.s.anchor.owner == kMe);
  CHECK_FALSE(idle.busy);
  {
    MutexGuard guard(t.s.lock);
    t.s.anchor.busy.store(false);
    leave_call(t.s);
  }
  CHECK(t.s.in_flight.load() == 0);
}

TEST_CASE("a call that continues no operation runs on this thread's own free binding") {
  TestSession t;
  t.s.anchor.owner = 2;                           // free, no operation: rule 3 would take it
  Binding& mine = t.extra(200, kMe, op::verify);  // an operation on it does not matter
  CHECK(t.claim<fn::C_GenerateRandom>() == &mine);
  CHECK_FALSE(t.s.anchor.busy);
  // The anchor too, on the inline path.
  TestSession u;
  u.s.anchor.owner = kMe;
  u.s.anchor.ops = op::verify;
  u.extra(200, /*owner=*/2);
  CHECK(u.claim<fn::C_GenerateRandom>() == &u.s.anchor);
}

TEST_CASE("a call on a busy binding of its own runs elsewhere") {
  TestSession t;
  t.s.anchor.owner = kMe;
  t.s.anchor.busy = true;  // this thread, re-entered from a callback (Notify)
  Binding& other = t.extra(200, /*owner=*/2);
  CHECK(t.claim<fn::C_GenerateRandom>() == &other);
}

TEST_CASE(
    "otherwise any free binding with no operation active, and not one an error may have left") {
  TestSession t;
  t.s.anchor.owner = 2;
  t.s.anchor.busy = true;
  Binding& active = t.extra(200, /*owner=*/3, op::sign);
  Binding& maybe = t.extra(201, /*owner=*/4);
  maybe.maybe = op::decrypt;
  Binding& idle = t.extra(202, /*owner=*/5);
  Binding* b = t.claim<fn::C_GenerateRandom>();
  CHECK(b == &idle);
  CHECK(idle.owner == kMe);  // now this thread's
  CHECK(idle.busy);
  CHECK_FALSE(active.busy);
  CHECK_FALSE(maybe.busy);
  CHECK(maybe.owner == 4);
}

TEST_CASE("otherwise none: a new binding from the pool, in a detached binding's place") {
  TestSession t;
  t.s.anchor.owner = 2;
  t.s.anchor.busy = true;
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

}  // namespace
}  // namespace p11mux
