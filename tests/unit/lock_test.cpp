// Mutex: the futex path, and the application's callbacks (C_Initialize case 2).
#include "sync/lock.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <mutex>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

struct Counts {
  std::atomic<int> created{0}, destroyed{0}, locked{0}, unlocked{0};
};
Counts counts;

CK_RV create(CK_VOID_PTR_PTR m) {
  counts.created++;
  *m = new std::mutex;
  return CKR_OK;
}
CK_RV destroy(CK_VOID_PTR m) {
  counts.destroyed++;
  delete static_cast<std::mutex*>(m);
  return CKR_OK;
}
CK_RV lock(CK_VOID_PTR m) {
  counts.locked++;
  static_cast<std::mutex*>(m)->lock();
  return CKR_OK;
}
CK_RV unlock(CK_VOID_PTR m) {
  counts.unlocked++;
  static_cast<std::mutex*>(m)->unlock();
  return CKR_OK;
}
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
  counts.created = counts.destroyed = counts.locked = counts.unlocked = 0;
  LockSource app{&create, &destroy, &lock, &unlock};
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
  LockSource app{&failing_create, &destroy, &lock, &unlock};
  CHECK_THROWS_WITH(Mutex{app}, doctest::Contains("CKR_HOST_MEMORY"));
}

}  // namespace
}  // namespace p11mux
