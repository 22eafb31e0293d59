// Issue 15, failover without an error (docs/groups.md, "Replay"): a call on
// a group's session that its member's failure interrupted is made again on
// another member when it is the same call there: an Init, or a call
// continuing an operation that had taken no data yet, whose Init is
// replayed first. Over the faulty module in front of the mock's tokens
// (FaultyGroup: member 0 is the mock's slot 2, member 1 its slot 1).
#include "group_harness.hpp"

#include "unit/observe_test_support.hpp"

#include <unistd.h>
#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <future>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

namespace p11mux::test {
namespace {

struct Signed {
  CK_RV rv;
  std::array<CK_BYTE, 64> bytes;
  CK_ULONG len;
};

constexpr std::string_view kData = "signed across a failover";

Signed sign(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_ULONG len = 64) {
  Signed out{CKR_OK, {}, len};
  std::string data(kData);
  out.rv = p->C_Sign(s, reinterpret_cast<CK_BYTE*>(data.data()), data.size(), out.bytes.data(),
                     &out.len);
  return out;
}

// The signature verifies on session `s` (its member's copy of `key`).
CK_RV verify(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, Signed& sig) {
  CK_MECHANISM hmac{CKM_SHA256_HMAC, nullptr, 0};
  std::string data(kData);
  REQUIRE(p->C_VerifyInit(s, &hmac, key) == CKR_OK);
  return p->C_Verify(s, reinterpret_cast<CK_BYTE*>(data.data()), data.size(), sig.bytes.data(),
                     sig.len);
}

}  // namespace

TEST_CASE("group failover: a C_Sign whose member failed after its C_SignInit is replayed") {
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    FaultyGroup g(FaultyGroup::Bind{bind});
    REQUIRE(g.proxy.initialize() == CKR_OK);
    CK_FUNCTION_LIST* p = g.proxy.p11;
    const CK_SESSION_HANDLE a = g.open(true);  // member 0
    const CK_SESSION_HANDLE b = g.open(true);  // member 1
    const CK_OBJECT_HANDLE key = make_token_key(p, a);
    CK_MECHANISM hmac{CKM_SHA256_HMAC, nullptr, 0};

    SUBCASE("the member fails between the Init and the single-part call") {
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      const unsigned long inits = g.faulty->calls("C_SignInit");
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      // Member 0 answers C_Sign with its error and goes down; the call is
      // made again on member 1, after its C_SignInit there.
      Signed sig = sign(p, a);
      CHECK(sig.rv == CKR_OK);
      CHECK(sig.len == MOCK_DIGEST_LEN);
      CHECK(g.faulty->calls("C_SignInit") == inits + 1);
      // Made with member 1's copy of the key: it verifies there.
      CHECK(verify(p, b, key, sig) == CKR_OK);
      // The operation ended; the session goes on on member 1.
      CHECK(sign(p, a).rv == CKR_OPERATION_NOT_INITIALIZED);
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      Signed again = sign(p, a);
      CHECK(again.rv == CKR_OK);
      CHECK(verify(p, b, key, again) == CKR_OK);
    }
    SUBCASE("after a length query; the length the application gave is the one used") {
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      CK_ULONG len = 0;
      std::string data(kData);
      auto* bytes = reinterpret_cast<CK_BYTE*>(data.data());
      REQUIRE(p->C_Sign(a, bytes, data.size(), nullptr, &len) == CKR_OK);
      CHECK(len == MOCK_DIGEST_LEN);
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      // Too small a buffer: member 1 says so, and the operation stays.
      Signed small = sign(p, a, MOCK_DIGEST_LEN - 1);
      CHECK(small.rv == CKR_BUFFER_TOO_SMALL);
      CHECK(small.len == MOCK_DIGEST_LEN);
      Signed sig = sign(p, a);
      CHECK(sig.rv == CKR_OK);
      CHECK(verify(p, b, key, sig) == CKR_OK);
    }
    SUBCASE("a member down before the call: the session moves and the Init is replayed") {
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      const CK_SESSION_HANDLE c = g.open(true);  // member 0 again (least-busy)
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      CHECK(g.random(c) == CKR_DEVICE_ERROR);  // c's call takes member 0 down
      Signed sig = sign(p, a);
      CHECK(sig.rv == CKR_OK);
      CHECK(verify(p, b, key, sig) == CKR_OK);
    }
    SUBCASE("an Init whose member fails is made on the next member") {
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      CHECK(p->C_SignInit(a, &hmac, key) == CKR_OK);
      Signed sig = sign(p, a);
      CHECK(sig.rv == CKR_OK);
      CHECK(verify(p, b, key, sig) == CKR_OK);
    }
    SUBCASE("no member left to take it: an error, and the operation ended") {
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      g.faulty->fail_slot(1, CKR_DEVICE_REMOVED);  // its token reported absent
      CHECK(sign(p, a).rv == CKR_DEVICE_ERROR);
      // Member 1 back: the session moves there, with nothing to replay (the
      // error ended the operation, as any error of C_Sign does).
      g.faulty->clear_slot(1);
      CHECK(sign(p, a).rv == CKR_OPERATION_NOT_INITIALIZED);
      g.faulty->clear_slot(2);
    }
  }
}

TEST_CASE("group failover: a member failing under the single-part call itself") {
  // The faulty module forwards the first C_Digest and replaces its answer:
  // member 0 did the work, and its answer says the device failed.
  FaultyGroup g("", {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                     {"P11MUX_FAULTY_FAIL", "C_Digest:CKR_DEVICE_ERROR:nth=1"},
                     {"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE a = g.open();
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  std::string data = "digested twice, answered once";
  REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
  std::array<CK_BYTE, 64> digest{};
  CK_ULONG len = digest.size();
  CHECK(p->C_Digest(a, reinterpret_cast<CK_BYTE*>(data.data()), data.size(), digest.data(), &len) ==
        CKR_OK);
  CHECK(g.faulty->calls("C_Digest") == 2);
  std::array<CK_BYTE, MOCK_DIGEST_LEN> expected{};
  libs().mock->reference_digest(reinterpret_cast<const CK_BYTE*>(data.data()), data.size(),
                                expected.data());
  REQUIRE(len == MOCK_DIGEST_LEN);
  CHECK(std::equal(expected.begin(), expected.end(), digest.begin()));
  CHECK(g.sessions_on(1) >= 1);  // a moved to member 1
}

TEST_CASE("group failover: what cannot be replayed is told lost once, then the session goes on") {
  FaultyGroup g("",
                {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}, {"P11MUX_LOG_LEVEL", "warn"}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE a = g.open();  // member 0
  const CK_SESSION_HANDLE b = g.open();  // member 1
  const CK_SESSION_HANDLE c = g.open();  // member 0
  std::string part = "fed to member 0";
  auto* bytes = reinterpret_cast<CK_BYTE*>(part.data());
  std::array<CK_BYTE, 64> out{};
  CK_ULONG len = out.size();

  SUBCASE("a multi-part operation that took data") {
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
    REQUIRE(p->C_DigestUpdate(a, bytes, part.size()) == CKR_OK);
    g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
    CHECK(g.random(c) == CKR_DEVICE_ERROR);  // member 0 down
    CHECK(p->C_DigestFinal(a, out.data(), &len) == CKR_DEVICE_ERROR);
    CHECK(p->C_DigestFinal(a, out.data(), &len) == CKR_OPERATION_NOT_INITIALIZED);
  }
  SUBCASE("a mechanism replay does not know") {
    CK_MECHANISM vendor{CKM_VENDOR_DEFINED | 0x11, nullptr, 0};
    REQUIRE(p->C_DigestInit(a, &vendor) == CKR_OK);
    g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
    CHECK(g.random(c) == CKR_DEVICE_ERROR);
    const unsigned long digests = g.faulty->calls("C_Digest");
    CHECK(p->C_Digest(a, bytes, part.size(), out.data(), &len) == CKR_DEVICE_ERROR);
    CHECK(g.faulty->calls("C_Digest") == digests);  // not sent
  }
  // Either way the session works on member 1, and so does b.
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
  len = out.size();
  CHECK(p->C_Digest(a, bytes, part.size(), out.data(), &len) == CKR_OK);
  CHECK(g.random(b) == CKR_OK);
  g.faulty->clear_slot(2);
}

TEST_CASE(
    "group failover: threads digesting while a member is removed and comes back see no error") {
  // Digests, not the mock's signatures: those differ between members (each
  // copy of a key has its own mock handle), where real members' cloned keys
  // agree; a digest is the same on every member.
  // Serialize mode: a session per thread. Multiplex mode: the threads share
  // one session, each on a lane of its own.
  for (const bool multiplex : {false, true}) {
    CAPTURE(multiplex);
    FaultyGroup g("", {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                       {"P11MUX_SESSION_MODE", multiplex ? "multiplex" : "serialize"},
                       {"P11MUX_LOG_LEVEL", "error"}});
    REQUIRE(g.proxy.initialize() == CKR_OK);
    CK_FUNCTION_LIST* p = g.proxy.p11;
    constexpr int kThreads = 6;
    constexpr int kDigests = 400;
    std::string data = "digested by whichever member is up";
    std::array<CK_BYTE, MOCK_DIGEST_LEN> expected{};
    libs().mock->reference_digest(reinterpret_cast<const CK_BYTE*>(data.data()), data.size(),
                                  expected.data());
    auto digest = [&](CK_SESSION_HANDLE s) {
      CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
      CK_RV rv = p->C_DigestInit(s, &sha);
      if (rv != CKR_OK) return rv;
      std::array<CK_BYTE, 64> out{};
      CK_ULONG len = out.size();
      rv = p->C_Digest(s, reinterpret_cast<CK_BYTE*>(data.data()), data.size(), out.data(), &len);
      if (rv == CKR_OK &&
          (len != expected.size() || !std::equal(expected.begin(), expected.end(), out.begin()))) {
        rv = CKR_GENERAL_ERROR;
      }
      return rv;
    };
    std::vector<CK_SESSION_HANDLE> sessions;
    const CK_SESSION_HANDLE shared = g.open();
    for (int t = 0; t < kThreads; ++t) sessions.push_back(multiplex ? shared : g.open());
    std::atomic<int> done{0};
    std::atomic<int> errors{0};
    std::vector<std::thread> threads;
    for (int t = 0; t < kThreads; ++t) {
      threads.emplace_back([&, s = sessions[t]] {
        for (int i = 0; i < kDigests; ++i) {
          if (const CK_RV rv = digest(s); rv != CKR_OK) {
            errors.fetch_add(1);
            MESSAGE("digest " << i << ": " << rv);
          }
          done.fetch_add(1);
        }
      });
    }
    auto wait_for = [&](int count) {
      while (done.load() < count) std::this_thread::sleep_for(std::chrono::milliseconds(1));
    };
    wait_for(kThreads * kDigests / 4);
    g.faulty->set_slot_removed(2, 1);  // member 0's token gone, its sessions with it
    wait_for(kThreads * kDigests / 2);
    g.faulty->set_slot_removed(2, 0);  // back, without the sessions it had
    for (std::thread& t : threads) t.join();
    CHECK(errors.load() == 0);
    if (multiplex) continue;  // its lanes return to member 0 when that spreads the calls in flight
    // Member 0 is admitted again within about a second (recovery_interval_s =
    // 1); a session placed there then works on a fresh backend session.
    bool rejoined = false;
    for (int i = 0; i < 100 && !rejoined; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const unsigned long before = g.sessions_on(2);
      const CK_SESSION_HANDLE s = g.open();
      rejoined = g.sessions_on(2) > before;
      CHECK(digest(s) == CKR_OK);
    }
    CHECK(rejoined);
  }
}

TEST_CASE("group failover: a member that restarted under a session: a fresh session, replayed") {
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    FaultyGroup g(FaultyGroup::Bind{bind});
    REQUIRE(g.proxy.initialize() == CKR_OK);
    CK_FUNCTION_LIST* p = g.proxy.p11;
    const CK_SESSION_HANDLE a = g.open();  // member 0
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    std::string data = "after a restart";
    auto* bytes = reinterpret_cast<CK_BYTE*>(data.data());
    std::array<CK_BYTE, 64> out{};
    CK_ULONG len = out.size();

    SUBCASE("an operation that took no data is replayed on the fresh session") {
      REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
      g.faulty->restart_slot(2);  // member 0's sessions gone; the member is up
      CHECK(p->C_Digest(a, bytes, data.size(), out.data(), &len) == CKR_OK);
      CHECK(len == MOCK_DIGEST_LEN);
    }
    SUBCASE("a call without an operation is made again") {
      g.faulty->restart_slot(2);
      CHECK(g.random(a) == CKR_OK);
    }
    SUBCASE("one that took data is lost, told once, not as a gone session") {
      REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
      REQUIRE(p->C_DigestUpdate(a, bytes, data.size()) == CKR_OK);
      g.faulty->restart_slot(2);
      CHECK(p->C_DigestFinal(a, out.data(), &len) == CKR_DEVICE_ERROR);
      CHECK(p->C_DigestFinal(a, out.data(), &len) == CKR_OPERATION_NOT_INITIALIZED);
    }
    // The session stays on member 0, which stays up, and works.
    CHECK(g.random(a) == CKR_OK);
    CK_SESSION_INFO info{};
    CHECK(p->C_GetSessionInfo(a, &info) == CKR_OK);
    CHECK(g.sessions_on(2) >= 1);
  }
}

TEST_CASE("group failover: a member admitted again takes its share of the sessions back") {
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    FaultyGroup g(FaultyGroup::Bind{bind}, "error");
    REQUIRE(g.proxy.initialize() == CKR_OK);
    CK_FUNCTION_LIST* p = g.proxy.p11;
    // Which member a session is on, without taking any down: member 1 (the
    // mock's slot 1) answers a code that says nothing of its health. (Its
    // slot answers it too, so no session can move onto it meanwhile.)
    auto on_member_0 = [&](CK_SESSION_HANDLE s) {
      g.faulty->fail_slot(1, CKR_FUNCTION_FAILED);
      const CK_RV rv = g.random(s);
      g.faulty->clear_slot(1);
      CAPTURE(rv);
      REQUIRE((rv == CKR_OK || rv == CKR_FUNCTION_FAILED));
      return rv == CKR_OK;
    };
    std::vector<CK_SESSION_HANDLE> sessions;
    for (int i = 0; i < 4; ++i) sessions.push_back(g.open());  // two on each member
    g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
    for (CK_SESSION_HANDLE s : sessions) (void)g.random(s);               // member 0 goes down
    for (CK_SESSION_HANDLE s : sessions) REQUIRE(g.random(s) == CKR_OK);  // its two move
    for (CK_SESSION_HANDLE s : sessions) REQUIRE_FALSE(on_member_0(s));
    // One has a digest in progress: it stays on member 1 to finish it.
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    const CK_SESSION_HANDLE busy = sessions[0];
    REQUIRE(p->C_DigestInit(busy, &sha) == CKR_OK);
    g.faulty->clear_slot(2);
    // Member 0 is admitted again within about a second: a new session goes
    // there (it holds none).
    bool rejoined = false;
    for (int i = 0; i < 100 && !rejoined; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const CK_SESSION_HANDLE probe = g.open();
      rejoined = on_member_0(probe);
      REQUIRE(p->C_CloseSession(probe) == CKR_OK);
    }
    REQUIRE(rejoined);
    // Each session at its next call: the busy one finishes its digest where
    // it is; the idle ones spread again, until member 0 holds two.
    std::string data = "finished where it began";
    std::array<CK_BYTE, 64> out{};
    CK_ULONG len = out.size();
    CHECK(p->C_Digest(busy, reinterpret_cast<CK_BYTE*>(data.data()), data.size(), out.data(),
                      &len) == CKR_OK);
    for (CK_SESSION_HANDLE s : sessions) CHECK(g.random(s) == CKR_OK);
    CHECK_FALSE(on_member_0(busy));
    int back = 0;
    for (CK_SESSION_HANDLE s : sessions) back += on_member_0(s);
    CHECK(back == 2);
  }
}

TEST_CASE("group failover: bind = state, a member whose token went before the call's session") {
  // An idle session holds no backend session: its call borrows one, and
  // the member's C_OpenSession answers CKR_TOKEN_NOT_PRESENT. The call
  // reached nothing: it is made on the next member, whatever it is.
  FaultyGroup g(FaultyGroup::Bind{"state"}, "error");
  REQUIRE(g.proxy.initialize() == CKR_OK);
  const CK_SESSION_HANDLE a = g.open();  // member 0, no backend session yet
  (void)g.open();                        // member 1
  // Member 0's pooled session taken and kept by another session's digest.
  const CK_SESSION_HANDLE c = g.open();  // member 0
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  REQUIRE(g.proxy.p11->C_DigestInit(c, &sha) == CKR_OK);
  const unsigned long opens = g.faulty->calls("C_OpenSession");
  g.faulty->set_slot_removed(2, 1);
  CHECK(g.random(a) == CKR_OK);
  CHECK(g.faulty->calls("C_OpenSession") > opens);  // member 0's was tried, then member 1's
  CK_SESSION_INFO info{};
  CHECK(g.proxy.p11->C_GetSessionInfo(a, &info) == CKR_OK);
  g.faulty->set_slot_removed(2, 0);
}

// Multiplex mode (docs/groups.md, "Multiplex mode"): each thread's lane of a
// session is a group's session of its own, failed over and replayed as in
// serialize mode. balance = primary: every lane on member 0 while it is up.
TEST_CASE("group failover: multiplex mode, single-part replayed, multi-part told lost") {
  FaultyGroup g("balance = primary\n", {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                                        {"P11MUX_SESSION_MODE", "multiplex"},
                                        {"P11MUX_LOG_LEVEL", "error"}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE a = g.open(true);
  const CK_OBJECT_HANDLE key = make_token_key(p, a);
  CK_MECHANISM hmac{CKM_SHA256_HMAC, nullptr, 0};
  CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
  std::string part = "fed to member 0";
  auto* bytes = reinterpret_cast<CK_BYTE*>(part.data());
  std::array<CK_BYTE, 64> out{};
  CK_ULONG len = out.size();

  SUBCASE("a C_Sign whose member failed after its C_SignInit, on another thread's lane too") {
    REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
    // A second thread's lane, with a signature begun on member 0 as well.
    std::promise<CK_RV> begun;
    std::promise<void> member_failed;
    std::thread other([&, failed = member_failed.get_future()]() mutable {
      begun.set_value(p->C_SignInit(a, &hmac, key));
      failed.wait();
      Signed sig = sign(p, a);
      CHECK(sig.rv == CKR_OK);
      CHECK(sig.len == MOCK_DIGEST_LEN);
    });
    CHECK(begun.get_future().get() == CKR_OK);
    g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
    member_failed.set_value();
    Signed sig = sign(p, a);
    other.join();
    CHECK(sig.rv == CKR_OK);
    // Made with member 1's copy of the key: it verifies there, where every
    // lane now runs.
    CHECK(verify(p, a, key, sig) == CKR_OK);
  }
  SUBCASE("a multi-part operation that took data") {
    REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
    REQUIRE(p->C_DigestUpdate(a, bytes, part.size()) == CKR_OK);
    g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
    CHECK(p->C_DigestFinal(a, out.data(), &len) == CKR_DEVICE_ERROR);
    CHECK(p->C_DigestFinal(a, out.data(), &len) == CKR_OPERATION_NOT_INITIALIZED);
  }
  // Either way the session works on member 1.
  REQUIRE(p->C_DigestInit(a, &sha) == CKR_OK);
  len = out.size();
  CHECK(p->C_Digest(a, bytes, part.size(), out.data(), &len) == CKR_OK);
  g.faulty->clear_slot(2);
}

TEST_CASE("group failover: a member that answers nothing for hang_timeout_s goes down") {
  const std::string sock = unique_temp_path("hung", "sock");
  FaultyGroup g("balance = primary\nhang_timeout_s = 1\n",
                {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                 {"P11MUX_LOG_LEVEL", "error"},
                 {"P11MUX_METRICS_LISTEN", sock.c_str()}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  auto figure = [&](const char* name) {
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    return parse_prometheus(m->body).at(std::string(name) +
                                        "{group=\"signing\",member=\"faulty/serial:2\"}");
  };
  // Both on member 0 (primary), which then stops answering under a's call.
  const CK_SESSION_HANDLE a = g.open(), b = g.open();
  REQUIRE(g.random(a) == CKR_OK);
  REQUIRE(g.random(b) == CKR_OK);
  g.faulty->hang_slot(2, FAULTY_HANG_UNTIL_RELEASED);
  auto hung = std::async(std::launch::async, [&] { return g.random(a); });
  struct Released {
    const FaultyControl* faulty;
    ~Released() { faulty->release_slot(2); }  // before `hung` waits, if a check fails
  } released{g.faulty};
  REQUIRE(wait_hung(g.faulty, 2));
  // The members' thread looks every 125 ms (an eighth of the 1 s timeout)
  // and finds it within 1.25 s; 10 s is a liveness guard, not a timing.
  bool down = false;
  for (int i = 0; i < 200 && !down; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    down = figure("p11mux_member_hung_total") == 1;
  }
  REQUIRE(down);
  CHECK(figure("p11mux_member_calls_in_flight") == 1);  // a's call, still in the backend
  // b moves to member 1 at its next call, answered while a's call waits.
  auto moved = std::async(std::launch::async, [&] { return g.random(b); });
  const bool answered = moved.wait_for(std::chrono::seconds(10)) == std::future_status::ready;
  if (!answered) g.faulty->release_slot(2);  // so that `moved` can end
  REQUIRE(answered);
  CHECK(moved.get() == CKR_OK);
  // b's backend session there was abandoned, not closed (the close would
  // have hung b's thread): still open on the member.
  CHECK(g.sessions_on(2) == 2);
  g.faulty->release_slot(2);
  CHECK(hung.get() == CKR_OK);  // the backend did the work: its answer stands
  // The member answers its probe, and the abandoned session is closed
  // before it is admitted again: only a's is left there.
  bool closed = false;
  for (int i = 0; i < 200 && !closed; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    closed = g.sessions_on(2) == 1;
  }
  CHECK(closed);
  ::unlink(sock.c_str());
}

TEST_CASE("group failover: a call made again gets the application's template lengths") {
  // A member that writes the lengths of C_GetAttributeValue's template and
  // then answers that its session is gone (the faulty module's `after`):
  // the call is made again on a fresh session, which must see the lengths
  // the application gave, not CK_UNAVAILABLE_INFORMATION, or it writes the
  // whole value into a 4-byte buffer.
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    FaultyGroup g(FaultyGroup::Bind{bind}, "error");
    REQUIRE(g.proxy.initialize() == CKR_OK);
    CK_FUNCTION_LIST* p = g.proxy.p11;
    const CK_SESSION_HANDLE s = g.open(true);
    const CK_OBJECT_HANDLE key = make_token_key(p, s);  // CKA_ID "replayed": 8 bytes
    g.fail_nth("C_GetAttributeValue", CKR_SESSION_HANDLE_INVALID, 1, /*after=*/true);
    std::array<CK_BYTE, 16> buffer{};
    CK_ATTRIBUTE id{CKA_ID, buffer.data(), 4};
    CHECK(p->C_GetAttributeValue(s, key, &id, 1) == CKR_BUFFER_TOO_SMALL);
    CHECK(id.ulValueLen == CK_UNAVAILABLE_INFORMATION);
    CHECK(std::all_of(buffer.begin() + 4, buffer.end(), [](CK_BYTE b) { return b == 0; }));
    // The call after it is answered as usual.
    id.ulValueLen = buffer.size();
    CHECK(p->C_GetAttributeValue(s, key, &id, 1) == CKR_OK);
    CHECK(id.ulValueLen == 8);
  }
}

TEST_CASE("group failover: a session moved off a down member counts its calls on its new member") {
  // Each call checks and counts on the health its session keeps of its
  // member (SessionOperations::member_health), which must follow the move.
  const std::string sock = unique_temp_path("moved", "sock");
  FaultyGroup g("balance = primary\n", {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                                        {"P11MUX_LOG_LEVEL", "error"},
                                        {"P11MUX_METRICS_LISTEN", sock.c_str()}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  auto calls = [&](const char* member) {
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    return parse_prometheus(m->body).at(
        std::string("p11mux_member_calls_total{group=\"signing\",member=\"") + member + "\"}");
  };
  const CK_SESSION_HANDLE a = g.open();
  REQUIRE(g.random(a) == CKR_OK);  // on member 0 (primary)
  g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
  // A call that is not an Init is not made again: the member's answer,
  // which marks it down; the next call moves the session to member 1.
  REQUIRE(g.random(a) == CKR_DEVICE_ERROR);
  REQUIRE(g.random(a) == CKR_OK);
  const double before_0 = calls("faulty/serial:2");
  const double before_1 = calls("faulty/label:mock-token-1");
  for (int i = 0; i < 5; ++i) REQUIRE(g.random(a) == CKR_OK);
  CHECK(calls("faulty/label:mock-token-1") == before_1 + 5);
  CHECK(calls("faulty/serial:2") == before_0);
  g.faulty->clear_slot(2);
}

TEST_CASE("group failover: a down member's sessions are closed when it answers again") {
  // A member that fails with a device code may keep its sessions (a network
  // outage): the C_CloseSession a move sends it then fails, and the session
  // would stay open there for good. It is closed at its return instead.
  FaultyGroup g("balance = primary\n",
                {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH}, {"P11MUX_LOG_LEVEL", "error"}});
  REQUIRE(g.proxy.initialize() == CKR_OK);
  const CK_SESSION_HANDLE a = g.open();
  REQUIRE(g.random(a) == CKR_OK);  // on member 0 (primary)
  REQUIRE(g.sessions_on(2) == 1);
  g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
  REQUIRE(g.random(a) == CKR_DEVICE_ERROR);  // the member's answer: down
  REQUIRE(g.random(a) == CKR_OK);            // moved to member 1
  CHECK(g.sessions_on(2) == 1);              // its close refused: still there
  g.faulty->clear_slot(2);
  // Probed every recovery_interval_s (1 s) and admitted again, after its
  // abandoned sessions are closed; 10 s is a liveness guard, not a timing.
  bool closed = false;
  for (int i = 0; i < 200 && !closed; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    closed = g.sessions_on(2) == 0;
  }
  CHECK(closed);
  CHECK(g.proxy.p11->C_CloseSession(a) == CKR_OK);
  CHECK(g.sessions_on(2) == 0);
}

}  // namespace p11mux::test
