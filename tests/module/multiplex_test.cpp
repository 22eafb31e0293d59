// Multiplex mode over the mock: one application session, one backend
// session per calling thread. v3.0 message-based operations over the
// recording backend, which answers CKR_OK and tells which session it got.
#include "harness.hpp"

#include "forward/operation_state.hpp"
#include "functions/function_traits.hpp"
#include "recorder_control.h"

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <future>
#include <latch>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;
using Signature = std::array<CK_BYTE, MOCK_DIGEST_LEN>;

const Proxy::Environment kMultiplex = {{"P11MUX_SESSION_MODE", "multiplex"}};

CK_OBJECT_HANDLE make_key_pair(Proxy& proxy, CK_SESSION_HANDLE h) {
  CK_MECHANISM mech{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub = CK_INVALID_HANDLE, priv = CK_INVALID_HANDLE;
  CHECK(proxy.p11->C_GenerateKeyPair(h, &mech, nullptr, 0, nullptr, 0, &pub, &priv) == CKR_OK);
  return priv;
}

TEST_CASE("16 threads sign on one shared session in parallel: no OPERATION_ACTIVE, all verify") {
  MockConfig c{};
  c.call_spin_us = 20;
  Proxy proxy(c, nullptr, kMultiplex);
  CK_SESSION_HANDLE shared = proxy.open();
  CK_OBJECT_HANDLE key = make_key_pair(proxy, shared);
  std::atomic<long> good{0}, bad{0}, errors{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 16; ++t) {
    threads.emplace_back([&, t] {
      std::string data = "message from thread " + std::to_string(t);
      Signature expected{};
      libs().mock->reference_signature(key, reinterpret_cast<const unsigned char*>(data.data()),
                                       data.size(), expected.data());
      CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
      for (int i = 0; i < 100; ++i) {
        if (proxy.p11->C_SignInit(shared, &mech, key) != CKR_OK) {
          errors++;
          continue;
        }
        Signature sig{};
        CK_ULONG len = sig.size();
        if (proxy.p11->C_Sign(shared, reinterpret_cast<CK_BYTE*>(data.data()), data.size(),
                              sig.data(), &len) != CKR_OK) {
          errors++;
          continue;
        }
        (sig == expected ? good : bad)++;
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(errors == 0);
  CHECK(bad == 0);
  CHECK(good == 1600);
  MockStats s = mock_stats();
  CHECK(s.session_violations == 0);
  CHECK(s.max_concurrent_calls >= 2);  // really in parallel
}

// On a thread of its own: the digest active on `shared`, which has been fed
// `before`, is fed `rest` and finished; it must be the digest of both.
void finish_digest_on_new_thread(Proxy& proxy, CK_SESSION_HANDLE shared, const std::string& before,
                                 std::string rest) {
  Signature out{};
  CK_ULONG len = out.size();
  std::thread([&] {
    CHECK(proxy.p11->C_DigestUpdate(shared, reinterpret_cast<CK_BYTE*>(rest.data()), rest.size()) ==
          CKR_OK);
    CHECK(proxy.p11->C_DigestFinal(shared, out.data(), &len) == CKR_OK);
  }).join();
  Signature expected{};
  std::string whole = before + rest;
  libs().mock->reference_digest(reinterpret_cast<const unsigned char*>(whole.data()), whole.size(),
                                expected.data());
  CHECK(out == expected);
}

TEST_CASE("an operation started on one thread continues on another (hand-off)") {
  Proxy proxy({}, nullptr, kMultiplex);
  CK_SESSION_HANDLE shared = proxy.open();
  CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
  std::string part1 = "hello, ", part2 = "world";
  std::thread([&] { CHECK(proxy.p11->C_DigestInit(shared, &mech) == CKR_OK); }).join();
  std::thread([&] {
    CHECK(proxy.p11->C_DigestUpdate(shared, reinterpret_cast<CK_BYTE*>(part1.data()),
                                    part1.size()) == CKR_OK);
  }).join();
  finish_digest_on_new_thread(proxy, shared, part1, part2);
  Signature out{};
  CK_ULONG len = out.size();
  // Ambiguous: two live threads each have a digest active; a third cannot
  // tell whose to continue. (Threads stay alive: a joined thread's id may be
  // reused by the next one, which then counts as the same thread.)
  std::promise<void> done;
  std::shared_future<void> finished = done.get_future().share();
  std::atomic<int> started{0};
  auto starter = [&] {
    CHECK(proxy.p11->C_DigestInit(shared, &mech) == CKR_OK);
    started++;
    finished.wait();
  };
  std::thread a(starter), b(starter);
  while (started < 2) std::this_thread::yield();
  std::thread([&] {
    CHECK(proxy.p11->C_DigestFinal(shared, out.data(), &len) == CKR_OPERATION_NOT_INITIALIZED);
  }).join();
  done.set_value();
  a.join();
  b.join();
}

// The state C_SetOperationState restores is opaque to p11mux: the backend
// session it ran on must count as holding every operation, or a thread
// continuing the restored digest runs on another backend session
// (CKR_OPERATION_NOT_INITIALIZED, before the fix).
TEST_CASE("an operation restored with C_SetOperationState continues on another thread") {
  Proxy proxy({}, nullptr, kMultiplex);
  CK_SESSION_HANDLE shared = proxy.open();
  CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
  std::string part1 = "hello, ", part2 = "world";
  std::vector<CK_BYTE> state(256);
  CK_ULONG state_len = state.size();
  // Saved, then finished: no backend session of the session holds a digest.
  std::thread([&] {
    CHECK(proxy.p11->C_DigestInit(shared, &mech) == CKR_OK);
    CHECK(proxy.p11->C_DigestUpdate(shared, reinterpret_cast<CK_BYTE*>(part1.data()),
                                    part1.size()) == CKR_OK);
    CHECK(proxy.p11->C_GetOperationState(shared, state.data(), &state_len) == CKR_OK);
    Signature discarded{};
    CK_ULONG discarded_len = discarded.size();
    CHECK(proxy.p11->C_DigestFinal(shared, discarded.data(), &discarded_len) == CKR_OK);
  }).join();
  std::thread([&] {
    CHECK(proxy.p11->C_SetOperationState(shared, state.data(), state_len, CK_INVALID_HANDLE,
                                         CK_INVALID_HANDLE) == CKR_OK);
  }).join();
  finish_digest_on_new_thread(proxy, shared, part1, part2);
  CHECK(proxy.p11->C_CloseSession(shared) == CKR_OK);
}

// Issue 10, defect 9: bindings used to be keyed by std::thread::id, which a
// new thread gets again once the old one exited: it inherited the exited
// thread's digest (CKR_OPERATION_ACTIVE on its own C_DigestInit).
TEST_CASE("a new thread never inherits an exited thread's operation, even with its thread id") {
  Proxy proxy({}, nullptr, kMultiplex);
  CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
  std::string mine = "thread B's data", theirs = "thread A's data, abandoned";
  bool reused = false;
  CK_RV init_rv = CKR_OK, final_rv = CKR_OK;
  Signature out{};
  for (int attempt = 0; attempt < 200 && !reused; ++attempt) {
    CK_SESSION_HANDLE shared = proxy.open();
    std::thread::id a_id;
    std::thread([&] {
      a_id = std::this_thread::get_id();
      CHECK(proxy.p11->C_DigestInit(shared, &mech) == CKR_OK);
      CHECK(proxy.p11->C_DigestUpdate(shared, reinterpret_cast<CK_BYTE*>(theirs.data()),
                                      theirs.size()) == CKR_OK);
    }).join();  // exits with its digest active
    std::thread([&] {
      if (std::this_thread::get_id() != a_id) return;  // not the case under test: again
      reused = true;
      init_rv = proxy.p11->C_DigestInit(shared, &mech);
      CHECK(proxy.p11->C_DigestUpdate(shared, reinterpret_cast<CK_BYTE*>(mine.data()),
                                      mine.size()) == CKR_OK);
      CK_ULONG len = out.size();
      final_rv = proxy.p11->C_DigestFinal(shared, out.data(), &len);
    }).join();
    REQUIRE(proxy.p11->C_CloseSession(shared) == CKR_OK);
  }
  REQUIRE(reused);  // glibc hands an exited thread's id (its pthread_t) to the next one
  CHECK(init_rv == CKR_OK);
  CHECK(final_rv == CKR_OK);
  Signature expected{};
  libs().mock->reference_digest(reinterpret_cast<const unsigned char*>(mine.data()), mine.size(),
                                expected.data());
  CHECK(out == expected);
}

TEST_CASE("session objects are usable from every thread and destroyed when the session closes") {
  Proxy proxy({}, nullptr, kMultiplex);
  CK_SESSION_HANDLE shared = proxy.open();
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  std::thread([&] { key = make_key_pair(proxy, shared); }).join();
  CHECK(mock_stats().session_objects == 2);
  std::thread([&] {
    CK_MECHANISM mech{CKM_ECDSA, nullptr, 0};
    CHECK(proxy.p11->C_SignInit(shared, &mech, key) == CKR_OK);
    Signature sig{};
    CK_ULONG len = sig.size();
    std::string data = "x";
    CHECK(proxy.p11->C_Sign(shared, reinterpret_cast<CK_BYTE*>(data.data()), 1, sig.data(), &len) ==
          CKR_OK);
  }).join();
  REQUIRE(proxy.p11->C_CloseSession(shared) == CKR_OK);
  CHECK(mock_stats().session_objects == 0);
}

TEST_CASE("C_GetSessionInfo reports the virtual session's kind and the token's login state") {
  Proxy proxy({}, nullptr, kMultiplex);
  CK_SESSION_HANDLE rw = proxy.open(0, CKF_SERIAL_SESSION | CKF_RW_SESSION);
  CK_SESSION_HANDLE ro = proxy.open(0, CKF_SERIAL_SESSION);
  REQUIRE(proxy.p11->C_Login(rw, CKU_USER,
                             reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(MOCK_USER_PIN)),
                             4) == CKR_OK);
  std::thread([&] {
    CK_SESSION_INFO info{};
    CHECK(proxy.p11->C_GetSessionInfo(rw, &info) == CKR_OK);
    CHECK(info.state == CKS_RW_USER_FUNCTIONS);
    CHECK((info.flags & CKF_RW_SESSION) != 0);
    CHECK(proxy.p11->C_GetSessionInfo(ro, &info) == CKR_OK);
    CHECK(info.state == CKS_RO_USER_FUNCTIONS);
    CHECK((info.flags & CKF_RW_SESSION) == 0);
  }).join();
}

TEST_CASE("closing a multiplexed session waits for its running calls; nothing leaks") {
  {
    MockConfig c{};
    c.slow_us = 20000;
    Proxy proxy(c, nullptr, kMultiplex);
    for (int round = 0; round < 5; ++round) {
      CK_SESSION_HANDLE shared = proxy.open();
      std::vector<std::future<CK_RV>> calls;
      for (int t = 0; t < 4; ++t) {
        calls.push_back(std::async(std::launch::async, [&] {
          CK_BYTE buf[8];
          return proxy.p11->C_GenerateRandom(shared, buf, sizeof buf);
        }));
      }
      std::this_thread::sleep_for(5ms);
      REQUIRE(proxy.p11->C_CloseSession(shared) == CKR_OK);
      for (auto& f : calls) {
        CK_RV rv = f.get();
        CHECK((rv == CKR_OK || rv == CKR_SESSION_HANDLE_INVALID || rv == CKR_SESSION_CLOSED));
      }
    }
    CHECK(mock_stats().session_violations == 0);
  }
  MockStats s = mock_stats();
  CHECK(s.sessions_open == 0);
  CHECK(s.sessions_opened_total == s.sessions_closed_total);
}

TEST_CASE("multiplex over a non-thread-safe backend still never overlaps calls") {
  MockConfig c{};
  c.accept_locking = MOCK_LOCK_NONE;
  c.call_spin_us = 10;
  Proxy proxy(c, nullptr, kMultiplex);
  CK_SESSION_HANDLE shared = proxy.open();
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      CK_BYTE buf[8];
      for (int i = 0; i < 100; ++i)
        CHECK(proxy.p11->C_GenerateRandom(shared, buf, sizeof buf) == CKR_OK);
    });
  }
  for (auto& t : threads) t.join();
  CHECK(mock_stats().library_violations == 0);
}

// p11mux's 3.0 function list, and the recorder (the same instance p11mux loads).
struct V3 {
  V3() {
    void* p11mux = ::dlopen(P11MUX_TEST_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(p11mux != nullptr, ::dlerror());
    auto get_interface = reinterpret_cast<CK_C_GetInterface>(::dlsym(p11mux, "C_GetInterface"));
    REQUIRE(static_cast<bool>(get_interface));
    void* recorder = ::dlopen(P11MUX_TEST_RECORDER_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(recorder != nullptr, ::dlerror());
    last_call = reinterpret_cast<RecorderLastCallFn>(::dlsym(recorder, "recorder_last_call"));
    REQUIRE(static_cast<bool>(last_call));
    CK_VERSION v30{3, 0};
    CK_INTERFACE* iface = nullptr;
    REQUIRE(get_interface(reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>("PKCS 11")), &v30,
                          &iface, 0) == CKR_OK);
    list = static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
  }
  CK_FUNCTION_LIST_3_0* list = nullptr;
  RecorderLastCallFn last_call = nullptr;
};

V3& v3() {
  static V3 instance;
  return instance;
}

// Calls F on the session with arguments that pass p11mux's checks (pointers
// into zeroed memory; the recorder reads nothing) and returns the backend
// session it reached.
alignas(64) unsigned char arena[2048];

template <class F>
unsigned long call_on(CK_SESSION_HANDLE h) {
  using Args = typename FunctionArgs<typename F::Pointer>::type;
  Args args{};
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    auto sample = [&](auto& arg, std::size_t i) {
      using T = std::remove_reference_t<decltype(arg)>;
      if constexpr (std::is_pointer_v<T>)
        arg = reinterpret_cast<T>(arena + 64 * (i + 1));
      else
        arg = i == 0 ? static_cast<T>(h) : T{};
    };
    (sample(std::get<I>(args), I), ...);
  }
  (std::make_index_sequence<std::tuple_size_v<Args>>{});
  CK_RV rv = std::apply(v3().list->*F::member, args);
  CHECK_MESSAGE(rv == CKR_OK, F::name);
  RecorderCall rec{};
  REQUIRE(v3().last_call(std::string(F::name).c_str(), &rec) == 0);
  return rec.args[0];
}

// Runs each function on a thread of its own, one after the other. The
// threads live until the end, so none reuses another's id (p11mux would take
// it for the same thread).
class DistinctThreads {
 public:
  DistinctThreads() : release_(released_.get_future().share()) {}
  ~DistinctThreads() {
    released_.set_value();
    for (auto& t : threads_) t.join();
  }
  template <class Fn>
  void run(Fn fn) {
    std::promise<void> ran;
    std::future<void> done = ran.get_future();
    threads_.emplace_back([this, fn, ran = std::move(ran)]() mutable {
      fn();
      ran.set_value();
      release_.wait();
    });
    done.wait();
  }

 private:
  std::promise<void> released_;
  std::shared_future<void> release_;
  std::vector<std::thread> threads_;
};

// Init on one thread, each per-message call on another, Final on another: all
// on the backend session the operation started on. Another thread's plain
// call runs elsewhere while the operation is active, there once Final ended it.
template <class Init, class Final, class... Messages>
void message_operation_follows_its_session() {
  // bind = open: the last check needs the session's own backend session.
  const Proxy::Environment env = {{"P11MUX_MODULE", P11MUX_TEST_RECORDER_PATH},
                                  {"P11MUX_SESSION_MODE", "multiplex"},
                                  {"P11MUX_POOL_BIND", "open"}};
  Proxy proxy({}, nullptr, env);
  CK_SESSION_HANDLE shared = proxy.open();
  DistinctThreads threads;
  unsigned long backend = 0;
  threads.run([&] { backend = call_on<Init>(shared); });
  (
      [&] {
        CAPTURE(Messages::name);
        threads.run([&] { CHECK(call_on<Messages>(shared) == backend); });
      }(),
      ...);
  threads.run([&] { CHECK(call_on<fn::C_GetSessionInfo>(shared) != backend); });
  threads.run([&] { CHECK(call_on<Final>(shared) == backend); });
  threads.run([&] { CHECK(call_on<fn::C_GetSessionInfo>(shared) == backend); });
}

TEST_CASE(
    "v3.0 message-based encryption: every message reaches the session holding the operation") {
  message_operation_follows_its_session<fn::C_MessageEncryptInit, fn::C_MessageEncryptFinal,
                                        fn::C_EncryptMessage, fn::C_EncryptMessageBegin,
                                        fn::C_EncryptMessageNext>();
}

TEST_CASE(
    "v3.0 message-based decryption: every message reaches the session holding the operation") {
  message_operation_follows_its_session<fn::C_MessageDecryptInit, fn::C_MessageDecryptFinal,
                                        fn::C_DecryptMessage, fn::C_DecryptMessageBegin,
                                        fn::C_DecryptMessageNext>();
}

TEST_CASE("v3.0 message-based signing: every message reaches the session holding the operation") {
  message_operation_follows_its_session<fn::C_MessageSignInit, fn::C_MessageSignFinal,
                                        fn::C_SignMessage, fn::C_SignMessageBegin,
                                        fn::C_SignMessageNext>();
}

TEST_CASE(
    "v3.0 message-based verification: every message reaches the session holding the operation") {
  message_operation_follows_its_session<fn::C_MessageVerifyInit, fn::C_MessageVerifyFinal,
                                        fn::C_VerifyMessage, fn::C_VerifyMessageBegin,
                                        fn::C_VerifyMessageNext>();
}

unsigned long backend_sessions_opened() {
  RecorderCall rec{};
  REQUIRE(v3().last_call("C_OpenSession", &rec) == 0);
  return rec.count;
}

TEST_CASE("threads sending messages through one message-based operation at once all reach it") {
  const Proxy::Environment env = {{"P11MUX_MODULE", P11MUX_TEST_RECORDER_PATH},
                                  {"P11MUX_SESSION_MODE", "multiplex"}};
  Proxy proxy({}, nullptr, env);
  CK_SESSION_HANDLE shared = proxy.open();
  const unsigned long backend = call_on<fn::C_MessageEncryptInit>(shared);
  // While one thread's message runs on the operation's backend session, the
  // others wait for it. Had one run elsewhere, p11mux would have opened a
  // backend session for it: the pool holds none but this one.
  const unsigned long opened = backend_sessions_opened();
  std::vector<std::thread> threads;
  std::latch start(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      start.arrive_and_wait();
      for (int i = 0; i < 20000; ++i) {
        CK_BYTE iv[12] = {}, data[16] = {}, out[16];
        CK_ULONG out_len = sizeof out;
        CHECK(v3().list->C_EncryptMessage(shared, iv, sizeof iv, nullptr, 0, data, sizeof data, out,
                                          &out_len) == CKR_OK);
      }
    });
  }
  for (auto& t : threads) t.join();
  CHECK(backend_sessions_opened() == opened);
  CHECK(call_on<fn::C_MessageEncryptFinal>(shared) == backend);
}

// v3.0 §5.9-5.14: an error ends the message, not the message-based operation,
// which stays active until its Final.
template <class... Messages>
void messages_never_end(OpMask op) {
  for (CK_RV rv : {CKR_OK, CKR_BUFFER_TOO_SMALL, CKR_DATA_LEN_RANGE, CKR_ENCRYPTED_DATA_INVALID,
                   CKR_SIGNATURE_INVALID, CKR_OPERATION_NOT_INITIALIZED}) {
    CAPTURE(rv);
    (
        [&] {
          CHECK_MESSAGE(ops_after<Messages>(op, rv, CK_SESSION_HANDLE{1}) == op, Messages::name);
        }(),
        ...);
  }
}

TEST_CASE("a per-message call never ends its message-based operation, errors included") {
  messages_never_end<fn::C_EncryptMessage, fn::C_EncryptMessageBegin, fn::C_EncryptMessageNext>(
      op::message_encrypt);
  messages_never_end<fn::C_DecryptMessage, fn::C_DecryptMessageBegin, fn::C_DecryptMessageNext>(
      op::message_decrypt);
  messages_never_end<fn::C_SignMessage, fn::C_SignMessageBegin, fn::C_SignMessageNext>(
      op::message_sign);
  messages_never_end<fn::C_VerifyMessage, fn::C_VerifyMessageBegin, fn::C_VerifyMessageNext>(
      op::message_verify);
}

// C_SessionCancel names operations, not a backend session: from any thread it
// reaches the backend sessions that hold them.
TEST_CASE("C_SessionCancel from another thread cancels the operation where it runs") {
  MockConfig c{};
  c.provide_v3 = 1;
  Proxy proxy(c, nullptr, kMultiplex);
  CK_FUNCTION_LIST_3_0* p3 = v3().list;
  CK_SESSION_HANDLE shared = proxy.open();
  CK_MECHANISM digest = sha256();
  CK_OBJECT_HANDLE key = make_key_pair(proxy, shared);
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  REQUIRE(proxy.p11->C_DigestInit(shared, &digest) == CKR_OK);
  // Another thread's sign operation, on another backend session.
  std::thread([&] {
    REQUIRE(proxy.p11->C_DigestInit(shared, &digest) == CKR_OK);
    REQUIRE(proxy.p11->C_SignInit(shared, &ecdsa, key) == CKR_OK);
  }).join();
  CK_RV cancelled = CKR_GENERAL_ERROR;
  std::thread([&] { cancelled = p3->C_SessionCancel(shared, CKF_DIGEST | CKF_SIGN); }).join();
  CHECK(cancelled == CKR_OK);
  // Both digests and the signature are gone: Init succeeds again on each thread.
  CHECK(proxy.p11->C_DigestInit(shared, &digest) == CKR_OK);
  std::thread([&] {
    CHECK(proxy.p11->C_DigestInit(shared, &digest) == CKR_OK);
    CHECK(proxy.p11->C_SignInit(shared, &ecdsa, key) == CKR_OK);
  }).join();
}

// Backends that keep an operation after an error (SoftHSM2: a failed
// C_DigestKey): the operation is "maybe active" until proven ended, and never
// in the mask multiplex mode routes by.
TEST_CASE(
    "an error in an operation leaves it maybe active until an Init, a final call or a cancel") {
  const CK_SESSION_HANDLE h = 1;
  CK_BYTE out[32];
  CK_ULONG len = sizeof out;
  CK_MECHANISM mech = sha256();
  // Errors from calls that continue or end an active operation.
  CHECK(ops_after<fn::C_DigestKey>(op::digest, CKR_KEY_HANDLE_INVALID, h, CK_OBJECT_HANDLE{7}) ==
        0);
  CHECK(maybe_after<fn::C_DigestKey>(op::digest, 0, CKR_KEY_HANDLE_INVALID, h,
                                     CK_OBJECT_HANDLE{7}) == op::digest);
  CHECK(maybe_after<fn::C_DigestFinal>(op::digest, 0, CKR_DEVICE_ERROR, h, out, &len) ==
        op::digest);
  CHECK(maybe_after<fn::C_DigestEncryptUpdate>(op::digest | op::encrypt, 0, CKR_DATA_LEN_RANGE, h,
                                               out, CK_ULONG{1}, out,
                                               &len) == (op::digest | op::encrypt));
  // Not after a length query, CKR_BUFFER_TOO_SMALL, or for an operation never started.
  CHECK(maybe_after<fn::C_DigestFinal>(op::digest, 0, CKR_BUFFER_TOO_SMALL, h, out, &len) == 0);
  CHECK(maybe_after<fn::C_DigestFinal>(op::digest, 0, CKR_OK, h, nullptr, &len) == 0);
  CHECK(maybe_after<fn::C_DigestUpdate>(0, 0, CKR_OPERATION_NOT_INITIALIZED, h, out, CK_ULONG{1}) ==
        0);
  // Still maybe after another error; ended by a successful final call, a
  // successful Init (the backend had none left), or C_SessionCancel.
  CHECK(maybe_after<fn::C_DigestFinal>(0, op::digest, CKR_DEVICE_ERROR, h, out, &len) ==
        op::digest);
  CHECK(maybe_after<fn::C_DigestFinal>(0, op::digest, CKR_OK, h, out, &len) == 0);
  CHECK(maybe_after<fn::C_DigestInit>(0, op::digest, CKR_OK, h, &mech) == 0);
  CHECK(maybe_after<fn::C_DigestInit>(0, op::digest, CKR_OPERATION_ACTIVE, h, &mech) == op::digest);
  CHECK(maybe_after<fn::C_SessionCancel>(0, op::digest | op::sign, CKR_OK, h,
                                         CK_FLAGS{CKF_DIGEST}) == op::sign);
  // Whatever C_SetOperationState restored is unknown.
  CHECK(maybe_after<fn::C_SetOperationState>(0, 0, CKR_OK, h, out, CK_ULONG{1}, CK_OBJECT_HANDLE{0},
                                             CK_OBJECT_HANDLE{0}) == kAllOps);
}

}  // namespace
}  // namespace p11mux::test
