// Mutex: the futex path, and the application's callbacks (C_Initialize case 2).
#include "sync/lock.hpp"

#include "counting_mutexes.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

using test::create_counted_mutex;
using test::destroy_counted_mutex;
using test::lock_counted_mutex;
using test::unlock_counted_mutex;
auto& counts = test::mutex_calls;

CK_RV failing_create(CK_VOID_PTR_PTR) { return CKR_HOST_MEMORY; }

template <class Body>
long contended_sum(Mutex& m, Body) {
  long sum = 0;
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 20000; ++i) {
        MutexGuard g(m);
        ++sum;  // a data race (and a wrong sum) if the mutex fails
      }
    });
  }
  for (auto& t : threads) t.join();
  return sum;
}

TEST_CASE("the futex mutex excludes") {
  Mutex m;
  CHECK(contended_sum(m, 0) == 80000);
}

TEST_CASE("with the application's callbacks every lock goes through them") {
  test::reset_mutex_calls();
  LockSource app{&create_counted_mutex, &destroy_counted_mutex, &lock_counted_mutex,
                 &unlock_counted_mutex};
  {
    Mutex m(app);
    CHECK(counts.created == 1);
    CHECK(contended_sum(m, 0) == 80000);
    CHECK(counts.locked == 80000);
    CHECK(counts.unlocked == 80000);
  }
  CHECK(counts.destroyed == 1);
}

TEST_CASE("a failing CreateMutex is reported with its CKR code") {
  LockSource app{&failing_create, &destroy_counted_mutex, &lock_counted_mutex,
                 &unlock_counted_mutex};
  CHECK_THROWS_WITH(Mutex{app}, doctest::Contains("CKR_HOST_MEMORY"));
}

// HeldLock's debug check (sync/lock.hpp): a futex lock says whether it is
// held; the application's cannot tell, so it never claims "unlocked".
TEST_CASE("maybe_locked is false only for a futex lock that no thread holds") {
  Mutex m;
  CHECK_FALSE(m.maybe_locked());
  m.lock();
  CHECK(m.maybe_locked());
  m.unlock();
  CHECK_FALSE(m.maybe_locked());
  LockSource app{&create_counted_mutex, &destroy_counted_mutex, &lock_counted_mutex,
                 &unlock_counted_mutex};
  Mutex a(app);
  CHECK(a.maybe_locked());
}

}  // namespace
}  // namespace p11mux
