// The virtual session table: handles, generations, reuse, and locking.
#include "sessions/session_table.hpp"

#include <doctest/doctest.h>

#include <atomic>
#include <set>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

CK_SESSION_HANDLE open(SessionTable& table, CK_SESSION_HANDLE backend) {
  SessionLease lease = table.reserve();
  lease->anchor.backend = backend;
  CK_SESSION_HANDLE h = lease->opening_handle;
  table.publish(*lease);
  return h;
}

TEST_CASE("handles are non-zero, unique, and map to their backend session") {
  LockSource os;
  SessionTable table(os);
  std::set<CK_SESSION_HANDLE> seen;
  for (CK_SESSION_HANDLE b = 1; b <= 1000; ++b) {
    CK_SESSION_HANDLE h = open(table, 0x5000 + b);
    CHECK(h != CK_INVALID_HANDLE);
    CHECK(seen.insert(h).second);
  }
  CHECK(table.live_count() == 1000);
  CK_SESSION_HANDLE b = 1;
  for (CK_SESSION_HANDLE h : seen) {
    SessionLease lease = table.lease(h);
    REQUIRE(lease);
    CHECK(lease->anchor.backend > 0x5000);
    ++b;
  }
}

TEST_CASE("a closed session's handle is stale even after its entry is reused") {
  LockSource os;
  SessionTable table(os);
  CK_SESSION_HANDLE first = open(table, 0x5001);
  table.close(table.lease(first));
  CHECK_FALSE(table.lease(first));
  CK_SESSION_HANDLE second = open(table, 0x5002);
  // Same entry (LIFO reuse), new generation.
  CHECK((second & SessionTable::kIndexMask) == (first & SessionTable::kIndexMask));
  CHECK(second != first);
  CHECK_FALSE(table.lease(first));
  SessionLease lease = table.lease(second);
  REQUIRE(lease);
  CHECK(lease->anchor.backend == 0x5002);
}

TEST_CASE("bogus handles are rejected without touching memory") {
  LockSource os;
  SessionTable table(os);
  CK_SESSION_HANDLE h = open(table, 0x5001);
  CHECK_FALSE(table.lease(0));
  CHECK_FALSE(table.lease(h + 1));                             // an unused entry
  CHECK_FALSE(table.lease(SessionTable::kIndexMask));          // beyond any chunk
  CHECK_FALSE(table.lease(~CK_SESSION_HANDLE{0}));             // everything set
  CHECK_FALSE(table.lease(h ^ (CK_SESSION_HANDLE{1} << 40)));  // wrong generation
  CHECK(table.lease(h));
}

TEST_CASE("discarding a reserved entry leaves nothing live") {
  LockSource os;
  SessionTable table(os);
  SessionLease lease = table.reserve();
  CK_SESSION_HANDLE h = lease->opening_handle;
  table.discard(std::move(lease));
  CHECK(table.live_count() == 0);
  CHECK_FALSE(table.lease(h));
}

TEST_CASE("a lease serializes calls on one session") {
  LockSource os;
  SessionTable table(os);
  CK_SESSION_HANDLE h = open(table, 0x5001);
  std::atomic<int> inside{0};
  std::atomic<int> overlaps{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      for (int i = 0; i < 2000; ++i) {
        SessionLease lease = table.lease(h);
        REQUIRE(lease);
        if (inside.fetch_add(1) != 0) overlaps.fetch_add(1);
        std::this_thread::yield();
        inside.fetch_sub(1);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(overlaps.load() == 0);
}

TEST_CASE("closing races leasing: every lease is either valid or refused") {
  LockSource os;
  SessionTable table(os);
  std::atomic<bool> stop{false};
  std::atomic<CK_SESSION_HANDLE> current{open(table, 1)};
  std::atomic<long> wrong{0};
  std::vector<std::thread> users;
  for (int t = 0; t < 4; ++t) {
    users.emplace_back([&] {
      while (!stop.load()) {
        CK_SESSION_HANDLE h = current.load();
        if (SessionLease lease = table.lease(h)) {
          // The entry may have been reused, but then the handle would differ.
          if (lease->handle.load() != h) wrong.fetch_add(1);
        }
      }
    });
  }
  for (CK_SESSION_HANDLE b = 2; b < 3000; ++b) {
    CK_SESSION_HANDLE old = current.load();
    current.store(open(table, b));
    if (SessionLease lease = table.lease(old)) table.close(std::move(lease));
  }
  stop.store(true);
  for (auto& t : users) t.join();
  CHECK(wrong.load() == 0);
  CHECK(table.live_count() == 1);
}

TEST_CASE("for_each_live visits exactly the open sessions") {
  LockSource os;
  SessionTable table(os);
  std::vector<CK_SESSION_HANDLE> handles;
  for (int i = 0; i < 600; ++i) handles.push_back(open(table, 0x5000 + i));  // > 2 chunks
  for (int i = 0; i < 600; i += 3) table.close(table.lease(handles[i]));
  std::size_t visited = 0;
  table.for_each_live([&](SessionLease lease) {
    ++visited;
    CHECK(lease->handle.load() != 0);
  });
  CHECK(visited == 400);
  CHECK(table.live_count() == 400);
}

}  // namespace
}  // namespace p11mux
