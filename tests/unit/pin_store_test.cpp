// Unit tests for proxy/group/pin_store: a group's kept login (docs/groups.md,
// "Keeping the PIN"). Handed back byte for byte; zero once cleared, replaced
// or destroyed; on a locked page out of core dumps; not kept without locked
// memory; not seen by a fork()ed child; a clear never races a use.
#include "group/pin_store.hpp"

#include <linux/capability.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <doctest/doctest.h>
#include <fmt/format.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

// The sanitizers' mlock does nothing and answers 0 (it would lock their
// shadow memory too): what the kernel locked, and what RLIMIT_MEMLOCK
// refuses, are checked only without them.
#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
#define P11MUX_PIN_TEST_FAKE_MLOCK 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer) || __has_feature(thread_sanitizer)
#define P11MUX_PIN_TEST_FAKE_MLOCK 1
#endif
#endif

namespace p11mux {
namespace {

#ifdef P11MUX_PIN_TEST_FAKE_MLOCK
constexpr bool kRealMlock = false;
#else
constexpr bool kRealMlock = true;
#endif

// Nothing formats a kept login: a log line cannot take one by mistake.
static_assert(!fmt::is_formattable<KeptLogin>::value);
static_assert(!fmt::is_formattable<PinStore>::value);

using Bytes = std::vector<unsigned char>;

Bytes bytes(std::string_view s) { return Bytes(s.begin(), s.end()); }

// What use() lent, copied out (in a test; the store itself never copies).
struct Seen {
  CK_USER_TYPE user_type = 0;
  bool has_pin = false;
  Bytes pin;
  bool by_username = false;
  Bytes username;
};

std::optional<Seen> seen(PinStore& store, CK_USER_TYPE type) {
  return store.use(type, [](const KeptLogin& k) {
    Seen s;
    s.user_type = k.user_type;
    s.has_pin = k.pin != nullptr;
    if (k.pin != nullptr) s.pin.assign(k.pin, k.pin + k.pin_len);
    s.by_username = k.by_username;
    s.username.assign(k.username, k.username + k.username_len);
    return s;
  });
}

bool all_zero(std::span<const unsigned char> page) {
  return std::all_of(page.begin(), page.end(), [](unsigned char b) { return b == 0; });
}

bool contains(std::span<const unsigned char> page, std::string_view what) {
  return std::search(page.begin(), page.end(), what.begin(), what.end()) != page.end();
}

// Keeps `pin` (its bytes, not a C string: NULs and high bytes included).
PinKeep keep(PinStore& store, CK_USER_TYPE type, const Bytes& pin) {
  return store.keep(type, pin.data(), pin.size());
}

// The lines /proc/self/smaps gives for the mapping that starts at `start`.
// A mapping's header starts with its address (lower-case hex); its other
// lines with a capitalised key ("Locked:", "VmFlags:").
std::string smaps_of(const void* start) {
  char head[32];
  std::snprintf(head, sizeof head, "%lx-", reinterpret_cast<unsigned long>(start));
  std::ifstream in("/proc/self/smaps");
  std::string line, out;
  bool inside = false;
  while (std::getline(in, line)) {
    const bool header = !line.empty() && std::isxdigit(static_cast<unsigned char>(line[0])) &&
                        !std::isupper(static_cast<unsigned char>(line[0]));
    if (header) {
      if (inside) break;
      inside = line.rfind(head, 0) == 0;
    }
    if (inside) out += line + "\n";
  }
  return out;
}

// Runs `child` in a fork()ed child; true when it returned true (exit 0).
template <class F>
bool in_child(F&& child) {
  const pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    ::alarm(10);  // a deadlock fails the test rather than hanging it
    ::_exit(child() ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  return WIFEXITED(status) && WEXITSTATUS(status) == 0;
}

// Drops CAP_IPC_LOCK (root has it; with it RLIMIT_MEMLOCK does not apply).
bool drop_ipc_lock() {
  __user_cap_header_struct header{_LINUX_CAPABILITY_VERSION_3, 0};
  __user_cap_data_struct data[_LINUX_CAPABILITY_U32S_3]{};
  if (::syscall(SYS_capget, &header, data) != 0) return false;
  const unsigned bit = 1U << (CAP_IPC_LOCK % 32);
  data[CAP_IPC_LOCK / 32].effective &= ~bit;
  data[CAP_IPC_LOCK / 32].permitted &= ~bit;
  return ::syscall(SYS_capset, &header, data) == 0;
}

TEST_CASE("a kept PIN is handed back byte for byte, one per user type") {
  PinStore store;
  REQUIRE(store.memory() == PinStore::Memory::locked);
  CHECK(store.memory_problem().empty());
  CHECK_FALSE(store.kept(CKU_USER));
  CHECK_FALSE(seen(store, CKU_USER));

  const Bytes user{'1', 0, 0xff, '\n', 0x80, 'z'};  // NULs and high bytes are bytes too
  const Bytes so = bytes("so-secret");
  CHECK(keep(store, CKU_USER, user) == PinKeep::kept);
  CHECK(keep(store, CKU_SO, so) == PinKeep::kept);
  CHECK(store.kept(CKU_USER));
  CHECK(store.kept(CKU_SO));

  auto u = seen(store, CKU_USER);
  REQUIRE(u);
  CHECK(u->user_type == CKU_USER);
  CHECK(u->has_pin);
  CHECK(u->pin == user);
  CHECK_FALSE(u->by_username);
  CHECK(u->username.empty());
  auto s = seen(store, CKU_SO);
  REQUIRE(s);
  CHECK(s->user_type == CKU_SO);
  CHECK(s->pin == so);

  // use() returns what its callable returns.
  CHECK(store.use(CKU_USER, [](const KeptLogin& k) { return k.pin_len; }) == CK_ULONG{6});

  store.clear(CKU_SO);
  CHECK_FALSE(store.kept(CKU_SO));
  CHECK(store.kept(CKU_USER));
  store.clear_all();
  CHECK_FALSE(store.kept(CKU_USER));
  CHECK_FALSE(seen(store, CKU_USER));
}

TEST_CASE("C_LoginUser's username is kept with its PIN") {
  PinStore store;
  const Bytes pin = bytes("pw"), name = bytes("alice@example");
  CHECK(store.keep_by_username(CKU_USER, pin.data(), pin.size(), name.data(), name.size()) ==
        PinKeep::kept);
  auto u = seen(store, CKU_USER);
  REQUIRE(u);
  CHECK(u->by_username);
  CHECK(u->pin == pin);
  CHECK(u->username == name);
  // A later C_Login replaces it, username and all.
  CHECK(keep(store, CKU_USER, bytes("other")) == PinKeep::kept);
  CHECK_FALSE(contains(store.page_for_test(), "alice"));
  CHECK_FALSE(seen(store, CKU_USER)->by_username);
}

TEST_CASE("a login without a PIN (protected authentication path) is kept as one") {
  PinStore store;
  CHECK(store.keep(CKU_USER, nullptr, 42) == PinKeep::kept);  // the length means nothing then
  auto u = seen(store, CKU_USER);
  REQUIRE(u);
  CHECK_FALSE(u->has_pin);
  CHECK(store.use(CKU_USER, [](const KeptLogin& k) { return k.pin_len; }) == CK_ULONG{0});
  // An empty PIN is a PIN: a pointer, no bytes.
  const CK_UTF8CHAR empty[1] = {0};
  CHECK(store.keep(CKU_USER, empty, 0) == PinKeep::kept);
  CHECK(seen(store, CKU_USER)->has_pin);
}

TEST_CASE("CKU_CONTEXT_SPECIFIC and unknown user types are never kept") {
  PinStore store;
  const Bytes pin = bytes("op-pin");
  CHECK(keep(store, CKU_CONTEXT_SPECIFIC, pin) == PinKeep::context_specific);
  CHECK(keep(store, 3, pin) == PinKeep::unknown_user_type);
  CHECK(keep(store, CKU_USER | 0x80000000UL, pin) == PinKeep::unknown_user_type);
  CHECK_FALSE(store.kept(CKU_CONTEXT_SPECIFIC));
  CHECK_FALSE(seen(store, CKU_CONTEXT_SPECIFIC));
  CHECK(all_zero(store.page_for_test()));
  // It leaves the user's login alone: it is not a login of the token.
  CHECK(keep(store, CKU_USER, bytes("user")) == PinKeep::kept);
  CHECK(keep(store, CKU_CONTEXT_SPECIFIC, pin) == PinKeep::context_specific);
  CHECK(store.kept(CKU_USER));
  CHECK(std::string(to_string(PinKeep::context_specific)).find("never kept") != std::string::npos);
}

TEST_CASE("a PIN or username over the bound is refused, and the earlier one goes") {
  PinStore store;
  const Bytes longest(kMaxKeptPin, 'x');
  CHECK(keep(store, CKU_USER, longest) == PinKeep::kept);
  CHECK(seen(store, CKU_USER)->pin == longest);
  const Bytes too_long(kMaxKeptPin + 1, 'y');
  CHECK(keep(store, CKU_USER, too_long) == PinKeep::too_long);
  CHECK_FALSE(store.kept(CKU_USER));
  CHECK(all_zero(store.page_for_test()));
  // A length that does not fit 32 bits is refused, not truncated.
  CHECK(store.keep(CKU_SO, too_long.data(), CK_ULONG{1} << 32 | 4) == PinKeep::too_long);

  const Bytes name(kMaxKeptUsername + 1, 'n');
  CHECK(store.keep_by_username(CKU_USER, longest.data(), 4, name.data(), name.size()) ==
        PinKeep::too_long);
  CHECK(store.keep_by_username(CKU_USER, longest.data(), 4, name.data(), kMaxKeptUsername) ==
        PinKeep::kept);
}

TEST_CASE("the page is zero after clear, replace, and destruction") {
  auto* store = new PinStore(PinStore::AfterDestruction::leave_mapped_for_test);
  const std::span<const unsigned char> page = store->page_for_test();
  REQUIRE(page.size() >= 4096);
  CHECK(all_zero(page));

  CHECK(keep(*store, CKU_USER, bytes("first-Pin-0123456789")) == PinKeep::kept);
  CHECK(contains(page, "first-Pin-0123456789"));
  // Replaced by a shorter one: no byte of the first remains.
  CHECK(keep(*store, CKU_USER, bytes("ab")) == PinKeep::kept);
  CHECK_FALSE(contains(page, "rst-Pin"));
  CHECK_FALSE(contains(page, "0123456789"));
  CHECK(contains(page, "ab"));

  store->clear(CKU_USER);
  CHECK(all_zero(page));  // lengths and flags included

  CHECK(keep(*store, CKU_SO, bytes("so-PIN")) == PinKeep::kept);
  CHECK(store->keep_by_username(CKU_USER, reinterpret_cast<const CK_UTF8CHAR*>("u"), 1,
                                reinterpret_cast<const CK_UTF8CHAR*>("bob"), 3) == PinKeep::kept);
  store->clear_all();
  CHECK(all_zero(page));

  CHECK(keep(*store, CKU_SO, bytes("kept-at-the-end")) == PinKeep::kept);
  CHECK_FALSE(all_zero(page));
  delete store;  // without a clear: the destructor zeroes
  CHECK(all_zero(page));
  ::munmap(const_cast<unsigned char*>(page.data()), page.size());
}

TEST_CASE("the page is locked in memory, out of core dumps, and wiped (or absent) on fork") {
  PinStore store;
  REQUIRE(store.memory() == PinStore::Memory::locked);
  const std::string smaps = smaps_of(store.page_for_test().data());
  INFO(smaps);
  REQUIRE_FALSE(smaps.empty());
  const auto flags = smaps.find("VmFlags:");
  REQUIRE(flags != std::string::npos);
  const std::string vm = smaps.substr(flags);
  CHECK(vm.find(" dd") != std::string::npos);  // MADV_DONTDUMP
  // MADV_WIPEONFORK ("wf", Linux 4.14, Debian 12's 6.1 has it), else MADV_DONTFORK ("dc").
  CHECK(vm.find(store.wiped_on_fork() ? " wf" : " dc") != std::string::npos);
  if (!kRealMlock) return;
  CHECK(vm.find(" lo") != std::string::npos);  // mlock'ed
  const auto locked = smaps.find("\nLocked:");
  REQUIRE(locked != std::string::npos);
  unsigned long kb = 0;
  REQUIRE(std::sscanf(smaps.c_str() + locked, "\nLocked: %lu kB", &kb) == 1);
  CHECK(kb * 1024 >= store.page_for_test().size());
}

TEST_CASE("without locked memory (RLIMIT_MEMLOCK 0, no CAP_IPC_LOCK) nothing is kept") {
  if (!kRealMlock) return;
  CHECK(in_child([] {
    rlimit none{0, 0};
    if (!drop_ipc_lock() || ::setrlimit(RLIMIT_MEMLOCK, &none) != 0) return false;
    PinStore store;
    const Bytes pin = bytes("pin");
    const std::string problem = store.memory_problem();
    return store.memory() == PinStore::Memory::not_locked &&
           keep(store, CKU_USER, pin) == PinKeep::no_locked_memory && !store.kept(CKU_USER) &&
           !store.use(CKU_USER, [](const KeptLogin&) { return 0; }) &&
           store.page_for_test().empty() &&
           problem.find("mlock, RLIMIT_MEMLOCK 0 bytes") != std::string::npos &&
           problem.find("stay out until the application logs in again") != std::string::npos;
  }));
  // The same child with the limit left alone keeps it: what failed above was the limit.
  CHECK(in_child([] {
    if (!drop_ipc_lock()) return false;
    PinStore store;
    return store.memory() == PinStore::Memory::locked &&
           keep(store, CKU_USER, bytes("pin")) == PinKeep::kept;
  }));
}

TEST_CASE("a fork()ed child sees no secret, and never waits for its parent's lock") {
  PinStore store;
  const Bytes pin = bytes("parent-only-PIN");
  REQUIRE(keep(store, CKU_USER, pin) == PinKeep::kept);
  CHECK(in_child([&] {
    if (store.wiped_on_fork() && !all_zero(store.page_for_test())) return false;
    return !store.kept(CKU_USER) && !seen(store, CKU_USER) &&
           keep(store, CKU_SO, pin) == PinKeep::forked_child;
  }));
  CHECK(seen(store, CKU_USER)->pin == pin);  // the parent's is untouched

  // A thread of the parent inside use() at fork(): the child's copy of the
  // lock is held forever, and the child must not wait for it.
  std::atomic<bool> inside{false}, release{false};
  std::thread user([&] {
    store.use(CKU_USER, [&](const KeptLogin&) {
      inside = true;
      while (!release) std::this_thread::sleep_for(std::chrono::milliseconds(1));
      return 0;
    });
  });
  while (!inside) std::this_thread::yield();
  const bool child_ok = in_child([&] {
    store.clear_all();
    return !store.kept(CKU_USER) && !seen(store, CKU_USER);
  });
  release = true;
  user.join();
  CHECK(child_ok);
  CHECK(store.kept(CKU_USER));
}

TEST_CASE("a clear waits for a use in progress") {
  PinStore store;
  const Bytes pin = bytes("in-use-PIN");
  REQUIRE(keep(store, CKU_USER, pin) == PinKeep::kept);
  std::atomic<bool> inside{false}, done{false}, intact{true};
  std::thread login([&] {
    store.use(CKU_USER, [&](const KeptLogin& k) {
      inside = true;
      for (int i = 0; i < 20; ++i) {  // a slow member's C_Login reading the PIN
        if (Bytes(k.pin, k.pin + k.pin_len) != pin) intact = false;
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
      }
      done = true;
      return CKR_OK;
    });
  });
  while (!inside) std::this_thread::yield();
  store.clear(CKU_USER);
  CHECK(done);  // clear returned only after the use
  login.join();
  CHECK(intact);
  CHECK_FALSE(store.kept(CKU_USER));
}

TEST_CASE("keep, use and clear from several threads: a use sees a whole PIN or none") {
  PinStore store;
  const Bytes a(40, 'A'), b(3, 'B');
  std::atomic<bool> stop{false};
  std::atomic<int> torn{0}, whole{0};
  // Until the reader has seen 2,000 PINs, or 10 s.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
  std::thread writer([&] {
    for (int i = 0; whole < 2000 && std::chrono::steady_clock::now() < deadline; ++i) {
      (void)keep(store, CKU_USER, i % 2 == 0 ? a : b);
    }
    stop = true;
  });
  std::thread clearer([&] {
    while (!stop) {
      store.clear(CKU_USER);
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  });
  std::thread reader([&] {
    while (!stop) {
      store.use(CKU_USER, [&](const KeptLogin& k) {
        const Bytes got(k.pin, k.pin + k.pin_len);
        ++(got == a || got == b ? whole : torn);
        return 0;
      });
    }
  });
  writer.join();
  clearer.join();
  reader.join();
  CHECK(torn == 0);
  CHECK(whole >= 2000);
}

}  // namespace
}  // namespace p11mux
