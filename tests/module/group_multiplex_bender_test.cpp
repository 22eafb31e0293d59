// Issue 15, multiplex mode on a group's slot over a backend that bends the
// spec: the lanes of group_multiplex_test.cpp (proxy/group/session_lanes.hpp)
// with the faulty module in front of the spec bender (operations kept active
// after errors, ulValueLen filled on a short buffer, handle numbers reused;
// mock_control.h, MOCK_BEND_*) instead of the mock. Each thread's lane keeps
// the promises group_spec_bender_test.cpp checks on a session in serialize
// mode (docs/groups.md, "Replay" and "Multiplex mode"), and nothing of one
// thread's lane shows in another's. balance = primary: every lane opens on
// member 0 (the bender's slot 2) while it is up, then on member 1 (slot 1).
#include "group_bender.hpp"

#include <chrono>
#include <memory>
#include <optional>
#include <string>
#include <thread>

namespace p11mux::test {
namespace {

// The group of FaultyGroup over the spec bender in multiplex mode, with
// [pool] bind = `bind`, the log at `level`, and `more` appended to its
// configuration.
struct BenderLanes : FaultyGroup {
  explicit BenderLanes(const char* bind, MockConfig config = bender_config(),
                       const char* level = "warn", const std::string& more = "")
      : FaultyGroup("balance = primary\n" + more,
                    {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_SPEC_BENDER_PATH},
                     {"P11MUX_SESSION_MODE", "multiplex"},
                     {"P11MUX_POOL_BIND", bind},
                     {"P11MUX_LOG_LEVEL", level}}) {
    CHECK(bender().reset() == 0);
    REQUIRE(bender().configure(&config) == 0);
    REQUIRE(proxy.initialize() == CKR_OK);
  }
};

// The data of one MAC, wrong: zeros.
Mac wrong_mac() {
  Mac wrong;
  wrong.len = MOCK_DIGEST_LEN;
  return wrong;
}

// The lane of the thread calling it signs afresh: an Init, a MAC that
// verifies on the same lane.
CK_RV signs_afresh(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key) {
  if (CK_RV rv = p->C_SignInit(s, &hmac, key); rv != CKR_OK) return rv;
  const Mac mac = sign(p, s);
  if (mac.rv != CKR_OK) return mac.rv;
  if (CK_RV rv = p->C_VerifyInit(s, &hmac, key); rv != CKR_OK) return rv;
  return verify(p, s, mac);
}

// `body(g, s, key, v3)` over a v2.40 member (no C_SessionCancel) and a
// v3.0 one, in both bind modes: a session and a token key `id` made
// through this thread's lane (on every member).
template <class Body>
void each_version_and_bind(const char* id, Body body) {
  for (const int v3 : {0, 1})
    for (const std::string bind : {"open", "state"}) {
      CAPTURE(v3);
      CAPTURE(bind);
      MockConfig config = bender_config();
      config.provide_v3 = v3;
      BenderLanes g(bind.c_str(), config);
      const CK_SESSION_HANDLE s = g.open(true);
      body(g, s, make_token_key(g.proxy.p11, s, id), v3);
    }
}

}  // namespace

TEST_CASE("group multiplex over the spec bender: a lane's single-part call is replayed") {
  for (const std::string bind : {"open", "state"}) {
    CAPTURE(bind);
    BenderLanes g(bind.c_str());
    CK_FUNCTION_LIST* p = g.proxy.p11;
    const CK_SESSION_HANDLE s = g.open(true);
    const CK_OBJECT_HANDLE key = make_token_key(p, s, "replayed on lanes");
    Worker first, second;

    SUBCASE("the member fails between each lane's Init and its C_Sign") {
      for (Worker* w : {&first, &second}) {
        REQUIRE(w->run([&] { return p->C_SignInit(s, &hmac, key); }) == CKR_OK);
      }
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      for (Worker* w : {&first, &second}) {
        Mac mac;
        CHECK(w->run([&] { return (mac = sign(p, s)).rv; }) == CKR_OK);
        CHECK(mac.len == MOCK_DIGEST_LEN);
        // Member 1's copy of the key made it: this thread's lane, moved
        // there too, verifies it.
        REQUIRE(p->C_VerifyInit(s, &hmac, key) == CKR_OK);
        CHECK(verify(p, s, mac) == CKR_OK);
        CHECK(w->run([&] { return sign(p, s).rv; }) == CKR_OPERATION_NOT_INITIALIZED);
      }
    }
    SUBCASE("a length query, then too small a buffer on the next member") {
      CK_ULONG len = 0;
      CHECK(first.run([&] {
        if (CK_RV rv = p->C_SignInit(s, &hmac, key); rv != CKR_OK) return rv;
        std::string data(kData);
        return p->C_Sign(s, reinterpret_cast<CK_BYTE*>(data.data()), data.size(), nullptr, &len);
      }) == CKR_OK);
      CHECK(len == MOCK_DIGEST_LEN);
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      Mac small;
      CHECK(first.run([&] { return (small = sign(p, s, MOCK_DIGEST_LEN - 1)).rv; }) ==
            CKR_BUFFER_TOO_SMALL);
      CHECK(small.len == MOCK_DIGEST_LEN);
      Mac mac;
      CHECK(first.run([&] { return (mac = sign(p, s)).rv; }) == CKR_OK);
      REQUIRE(p->C_VerifyInit(s, &hmac, key) == CKR_OK);
      CHECK(verify(p, s, mac) == CKR_OK);
    }
    SUBCASE("the member did the work and answered a device error") {
      // The faulty module's rule: C_Digest forwarded, its answer replaced.
      g.fail_nth("C_Digest", CKR_DEVICE_ERROR, 1);
      Digests d(p, s, "digested twice on a lane, answered once");
      CHECK(first.run([&] { return d.init(); }) == CKR_OK);
      CHECK(first.run([&] { return d.digest(); }) == CKR_OK);
      CHECK(d.right());
      CHECK(g.faulty->calls("C_Digest") == 2);
    }
    // Whatever happened, every lane signs afresh.
    for (Worker* w : {&first, &second}) {
      CHECK(w->run([&] { return signs_afresh(p, s, key); }) == CKR_OK);
    }
    CHECK(signs_afresh(p, s, key) == CKR_OK);
    g.faulty->clear_slot(2);
  }
}

TEST_CASE("group multiplex over the spec bender: the C_Sign its member failed and kept, replayed") {
  // The bender's own failure: the first C_Sign answers CKR_DEVICE_ERROR and
  // its operation stays active on member 0's backend session (KEEP_OP).
  // Member 0 never really went away: its probe admits it again, and lanes
  // go back to it. None carries the operation it kept.
  for (const std::string bind : {"open", "state"}) {
    CAPTURE(bind);
    BenderLanes g(bind.c_str(), bender_config("C_Sign", CKR_DEVICE_ERROR, 1));
    CK_FUNCTION_LIST* p = g.proxy.p11;
    const CK_SESSION_HANDLE s = g.open(true);
    const CK_OBJECT_HANDLE key = make_token_key(p, s, "kept by the bender");
    {
      Worker signer;
      Mac mac;
      CHECK(signer.run([&] {
        if (CK_RV rv = p->C_SignInit(s, &hmac, key); rv != CKR_OK) return rv;
        return (mac = sign(p, s)).rv;
      }) == CKR_OK);
      CHECK(bender_stats().bend_ops_kept == 1);
      REQUIRE(p->C_VerifyInit(s, &hmac, key) == CKR_OK);
      CHECK(verify(p, s, mac) == CKR_OK);
    }
    // This thread's lane holds nothing: it goes back to member 0 once that
    // is admitted (primary).
    bool back = false;
    for (int i = 0; i < 100 && !back; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      back = g.on_member_0(s);
    }
    REQUIRE(back);
    // New threads' lanes open there, and sign afresh.
    for (int t = 0; t < 4; ++t) {
      CAPTURE(t);
      Worker w;
      CHECK(w.run([&] { return signs_afresh(p, s, key); }) == CKR_OK);
      CHECK(w.run([&] { return CK_RV{g.on_member_0(s) ? CKR_OK : CKR_GENERAL_ERROR}; }) == CKR_OK);
    }
    CHECK(signs_afresh(p, s, key) == CKR_OK);
  }
}

TEST_CASE("group multiplex over the spec bender: an error ends the lane's operation, kept or not") {
  // The spec ends an operation on an error of the call continuing it; the
  // bender does not. The lane's next Init must work.
  each_version_and_bind(
      "verified on lanes", [](BenderLanes& g, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, int v3) {
        CK_FUNCTION_LIST* p = g.proxy.p11;
        Worker w;
        const Mac wrong = wrong_mac();

        SUBCASE("a verification replayed on another member, then failed there") {
          REQUIRE(w.run([&] { return p->C_VerifyInit(s, &hmac, key); }) == CKR_OK);
          g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
          CHECK(w.run([&] { return verify(p, s, wrong); }) == CKR_SIGNATURE_INVALID);
          CHECK(bender_stats().bend_ops_kept >= 1);
        }
        SUBCASE("a verification failed on its own member") {
          REQUIRE(w.run([&] { return p->C_VerifyInit(s, &hmac, key); }) == CKR_OK);
          CHECK(w.run([&] { return verify(p, s, wrong); }) == CKR_SIGNATURE_INVALID);
          CHECK(bender_stats().bend_ops_kept >= 1);
          // Refused by the member for the operation it kept, then ended there:
          // v3.0 cancelled; v2.40 a fresh backend session.
          const unsigned long cancels = bender().calls("C_SessionCancel");
          CHECK(w.run([&] { return p->C_VerifyInit(s, &hmac, key); }) == CKR_OK);
          CHECK(bender().calls("C_SessionCancel") == cancels + (v3 ? 1 : 0));
          CHECK(w.run([&] { return verify(p, s, wrong); }) == CKR_SIGNATURE_INVALID);
        }
        SUBCASE("a C_DigestKey p11mux refuses after replaying the lane's digest") {
          // A session key lives on the member that made it (docs/groups.md,
          // "Objects"): the lane moved off it has no copy of it.
          const CK_OBJECT_HANDLE mine =
              w.run([&] { return make_token_key(p, s, "session key", CK_FALSE); });
          Digests d(p, s, "digested afresh");
          REQUIRE(w.run([&] { return d.init(); }) == CKR_OK);
          g.take_member_0_down(s);  // this thread's lane is there
          CHECK(w.run([&] { return p->C_DigestKey(s, mine); }) == CKR_KEY_HANDLE_INVALID);
          REQUIRE(w.run([&] { return d.init(); }) == CKR_OK);
          CHECK(w.run([&] { return d.digest(); }) == CKR_OK);
          CHECK(d.right());
        }
        // The lane's next Init works, and so does a verification there.
        CHECK(w.run([&] { return p->C_VerifyInit(s, &hmac, key); }) == CKR_OK);
        Mac right;
        REQUIRE(p->C_SignInit(s, &hmac, key) == CKR_OK);
        REQUIRE((right = sign(p, s)).rv == CKR_OK);
        CHECK(w.run([&] { return verify(p, s, right); }) == CKR_OK);
        g.faulty->clear_slot(2);
      });
}

TEST_CASE("group multiplex over the spec bender: each thread its own lane, nothing leaks between") {
  each_version_and_bind(
      "two threads", [](BenderLanes& g, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key, int) {
        CK_FUNCTION_LIST* p = g.proxy.p11;
        std::optional<Worker> a;
        a.emplace();
        Worker b;
        // a's digest is a's: b neither continues it nor collides with it.
        Digests of_a(p, s, "fed by a");
        Digests of_b(p, s, "fed by b");
        REQUIRE(a->run([&] { return of_a.init(); }) == CKR_OK);
        REQUIRE(a->run([&] { return of_a.update(); }) == CKR_OK);
        CHECK(b.run([&] { return of_b.final_part(); }) == CKR_OPERATION_NOT_INITIALIZED);
        CHECK(b.run([&] { return of_b.init(); }) == CKR_OK);
        CHECK(b.run([&] { return of_b.digest(); }) == CKR_OK);
        CHECK(of_b.right());
        CHECK(a->run([&] { return of_a.final_part(); }) == CKR_OK);
        CHECK(of_a.right());
        // An error on a's lane, the bender keeping its verification: b's lane
        // verifies as if nothing happened.
        REQUIRE(a->run([&] { return p->C_VerifyInit(s, &hmac, key); }) == CKR_OK);
        CHECK(a->run([&] { return verify(p, s, wrong_mac()); }) == CKR_SIGNATURE_INVALID);
        CHECK(bender_stats().bend_ops_kept >= 1);
        CHECK(b.run([&] { return signs_afresh(p, s, key); }) == CKR_OK);
        // a's thread exits, its lane holding what the bender kept; the next
        // thread's lane closes it, and neither that thread's nor any later
        // lane's backend session carries the verification.
        a.reset();
        for (int t = 0; t < 4; ++t) {
          CAPTURE(t);
          Worker next;
          CHECK(next.run([&] { return signs_afresh(p, s, key); }) == CKR_OK);
        }
        // Nor does a new session's.
        REQUIRE(p->C_CloseSession(s) == CKR_OK);
        const CK_SESSION_HANDLE again = g.open(true);
        for (int t = 0; t < 4; ++t) {
          CAPTURE(t);
          Worker next;
          CHECK(next.run([&] { return signs_afresh(p, again, key); }) == CKR_OK);
        }
      });
}

TEST_CASE("group multiplex over the spec bender: a short buffer on a lane, its length filled") {
  // FILL_LEN: C_GetAttributeValue on too small a buffer writes the length it
  // needs. A CKA_ID longer than the group's 64-byte reads of an object's
  // identity (object_map's read_object), read by another thread's lane, on
  // one member then the other; traced, so that the trace's reading of the
  // answer is checked too.
  for (const std::string bind : {"open", "state"}) {
    CAPTURE(bind);
    const std::string log = unique_temp_path("bender-lanes", "log");
    const std::string id(100, 'i');
    {
      BenderLanes g(bind.c_str(), bender_config(), "trace", "[log]\nfile = " + log + "\n");
      CK_FUNCTION_LIST* p = g.proxy.p11;
      const CK_SESSION_HANDLE s = g.open(true);
      Worker maker, reader;
      (void)maker.run([&] { return make_token_key(p, s, id); });
      // Found by the reader's lane: the handle comes from reading the
      // object's identity.
      CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
      CHECK(reader.run([&] {
        CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
        CK_ATTRIBUTE by_class{CKA_CLASS, &cls, sizeof cls};
        if (CK_RV rv = p->C_FindObjectsInit(s, &by_class, 1); rv != CKR_OK) return rv;
        CK_ULONG found = 0;
        if (CK_RV rv = p->C_FindObjects(s, &key, 1, &found); rv != CKR_OK || found != 1)
          return rv != CKR_OK ? rv : CKR_GENERAL_ERROR;
        return p->C_FindObjectsFinal(s);
      }) == CKR_OK);
      REQUIRE(key != CK_INVALID_HANDLE);
      const unsigned long filled = bender_stats().bend_lengths_filled;
      for (const bool moved : {false, true}) {
        CAPTURE(moved);
        if (moved) g.take_member_0_down(s);  // member 1 from now on
        CK_ATTRIBUTE query{CKA_ID, nullptr, 0};
        CHECK(reader.run([&] { return p->C_GetAttributeValue(s, key, &query, 1); }) == CKR_OK);
        CHECK(query.ulValueLen == id.size());
        // 8 bytes of the caller's, then bytes that are not: never written,
        // never traced. Then a heap block of exactly 8 bytes, for ASan.
        const std::string neighbour = "NEIGHBOUR-BYTES-NOT-THE-CALLERS";
        std::string region = std::string(8, 'c') + neighbour + std::string(200, 'n');
        CK_ATTRIBUTE get{CKA_ID, region.data(), 8};
        CHECK(reader.run([&] { return p->C_GetAttributeValue(s, key, &get, 1); }) ==
              CKR_BUFFER_TOO_SMALL);
        CHECK(region.substr(8) == neighbour + std::string(200, 'n'));
        auto exact = std::make_unique<CK_BYTE[]>(8);
        get = {CKA_ID, exact.get(), 8};
        CHECK(reader.run([&] { return p->C_GetAttributeValue(s, key, &get, 1); }) ==
              CKR_BUFFER_TOO_SMALL);
        CHECK(bender_stats().bend_lengths_filled >= filled + 2);
        // The length the bender gave reads it whole.
        std::string value(id.size(), '\0');
        get = {CKA_ID, value.data(), value.size()};
        CHECK(reader.run([&] { return p->C_GetAttributeValue(s, key, &get, 1); }) == CKR_OK);
        CHECK(value == id);
        // The key found through member 0 signs wherever the lane is.
        CHECK(reader.run([&] { return signs_afresh(p, s, key); }) == CKR_OK);
      }
      g.faulty->clear_slot(2);
    }
    const std::string text = slurp(log);
    CHECK(text.find("C_GetAttributeValue(") != std::string::npos);
    CHECK(text.find("NEIGHBOUR") == std::string::npos);
    CHECK(text.find("nnnnnnnn") == std::string::npos);
    ::unlink(log.c_str());
  }
}

}  // namespace p11mux::test
