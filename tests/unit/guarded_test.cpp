// Guarded<T> and Locked<T> (sync/guarded.hpp): the T reachable only under
// the lock, through the futex lock and through the application's callbacks,
// at the cost of a bare Mutex. What clang's analysis rejects is shown by the
// thread-safety build (the pool's Guarded members, ACQUIRED_AFTER).
#include "sync/guarded.hpp"

#include "counting_mutexes.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <mutex>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

namespace p11mux {
namespace {

// The callbacks count each lock and unlock, and whether the lock was held
// when the guarded value was touched.
auto& calls = test::mutex_calls;

struct Tally {
  long sum = 0;
  std::vector<int> seen;
};

long contended_sum(Guarded<Tally>& tally) {
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) {
        if (i % 2 == 0) {
          Locked locked(tally);
          ++locked->sum;  // a data race (and a wrong sum) if the lock fails
        } else {
          tally.with_lock([](Tally& counted) { ++counted.sum; });
        }
      }
    });
  }
  for (auto& t : threads) t.join();
  return Locked(tally)->sum;
}

TEST_CASE("guarded: the futex lock excludes, through Locked and with_lock alike") {
  Guarded<Tally> tally;
  CHECK(contended_sum(tally) == 80000);
}

TEST_CASE(
    "guarded: with the application's callbacks the value is touched only between LockMutex and "
    "UnlockMutex") {
  test::reset_mutex_calls();
  const LockSource app{&test::create_counted_mutex, &test::destroy_counted_mutex,
                       &test::lock_counted_mutex, &test::unlock_counted_mutex};
  {
    Guarded<Tally> tally(app, Tally{5, {1, 2}});
    CHECK(calls.created == 1);
    {
      Locked t(tally);
      CHECK(calls.held == 1);
      CHECK(t->sum == 5);  // the initial value, moved in
      CHECK((*t).seen.size() == 2);
    }
    CHECK(calls.held == 0);
    int held_inside = tally.with_lock([](Tally&) { return calls.held.load(); });
    CHECK(held_inside == 1);
    CHECK(contended_sum(tally) == 80005);
    CHECK(calls.locked == calls.unlocked);
    CHECK(calls.locked == 80000 + 3);
  }
  CHECK(calls.destroyed == 1);
}

TEST_CASE("guarded: with_lock returns what the function returns, references included") {
  const LockSource own{};
  Guarded<std::string> name(own);
  std::string copy = name.with_lock([](std::string& s) {
    s = "slot 1";
    return s;
  });
  CHECK(copy == "slot 1");
  std::string& inside = name.with_lock([](std::string& s) -> std::string& { return s; });
  CHECK(&inside == &*Locked(name));
}

// A Mutex, a Guarded and a Locked keep a pointer to what they were given: a
// temporary LockSource would be gone before the first lock, so it does not
// compile (issue 11: the pool kept a reference to one).
static_assert(!std::is_constructible_v<Mutex, LockSource>);
static_assert(!std::is_constructible_v<Guarded<int>, LockSource>);
static_assert(std::is_constructible_v<Guarded<int>, const LockSource&>);
static_assert(std::is_constructible_v<Guarded<int>, LockSource&>);

// No cost: a Guarded is its Mutex and its T; a Locked is one pointer.
static_assert(sizeof(Guarded<long>) == sizeof(Mutex) + sizeof(long));
static_assert(sizeof(Locked<long>) == sizeof(void*));
// Neither is copied: the lock has an identity.
static_assert(!std::is_copy_constructible_v<Guarded<long>>);
static_assert(!std::is_copy_constructible_v<Locked<long>>);
static_assert(!std::is_move_constructible_v<Locked<long>>);

}  // namespace
}  // namespace p11mux
