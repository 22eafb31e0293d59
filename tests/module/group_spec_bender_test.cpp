// Issue 15, failover over a backend that bends the spec: the scenarios of
// group_failover_test.cpp with the faulty module in front of the spec bender
// (libp11mux-spec-bender.so: operations kept active after errors,
// ulValueLen filled on a short buffer, handle numbers reused at once;
// mock_control.h, MOCK_BEND_*) instead of the well-behaved mock. Whatever
// the members do, the group keeps the promises of docs/groups.md, "Replay"
// and "Members up and down": a replayed operation gives the application no
// error, a lost one is told once and the next Init works, and a virtual
// object handle never names another object. FaultyGroup: member 0 is the
// bender's slot 2, member 1 its slot 1.
#include "group_bender.hpp"

#include <algorithm>

#include <chrono>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace p11mux::test {
namespace {

// The group of FaultyGroup over the spec bender, with [pool] bind = `bind`.
struct BenderGroup : FaultyGroup {
  explicit BenderGroup(const char* bind, const char* level = "warn",
                       MockConfig config = bender_config())
      : FaultyGroup(Bind{bind}, P11MUX_TEST_SPEC_BENDER_PATH, level) {
    CHECK(bender().reset() == 0);
    REQUIRE(bender().configure(&config) == 0);
    REQUIRE(proxy.initialize() == CKR_OK);
  }
  // Member 0 back and admitted again (recovery_interval_s = 1), polled the
  // way group_failover_test.cpp does: a new session goes there. That
  // session, or CK_INVALID_HANDLE after 5 s.
  CK_SESSION_HANDLE open_on_member_0() {
    for (int i = 0; i < 100; ++i) {
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
      const CK_SESSION_HANDLE s = open(true);
      if (on_member_0(s)) return s;
      REQUIRE(proxy.p11->C_CloseSession(s) == CKR_OK);
    }
    return CK_INVALID_HANDLE;
  }
};

// The group with a session on each member and a token key made through
// the first: a on member 0, b on member 1.
struct KeyOnBoth {
  KeyOnBoth(const char* bind, std::string id, MockConfig config = bender_config())
      : g(bind, "warn", config),
        p(g.proxy.p11),
        a(g.open(true)),
        b(g.open(true)),
        key(make_token_key(p, a, std::move(id))) {}
  BenderGroup g;
  CK_FUNCTION_LIST* p;
  CK_SESSION_HANDLE a, b;
  CK_OBJECT_HANDLE key;
};

// The session works as new for signing: an Init, a MAC that `checker`
// (a session on the same member) verifies.
void signs_afresh(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_SESSION_HANDLE checker,
                  CK_OBJECT_HANDLE key) {
  REQUIRE(p->C_SignInit(s, &hmac, key) == CKR_OK);
  const Mac mac = sign(p, s);
  REQUIRE(mac.rv == CKR_OK);
  REQUIRE(p->C_VerifyInit(checker, &hmac, key) == CKR_OK);
  CHECK(verify(p, checker, mac) == CKR_OK);
}

}  // namespace

TEST_CASE("group over the spec bender: a C_Sign whose member failed after its Init is replayed") {
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    KeyOnBoth both(bind, "replayed");
    auto& [g, p, a, b, key] = both;

    SUBCASE("the member fails between the Init and the single-part call") {
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      const Mac mac = sign(p, a);
      CHECK(mac.rv == CKR_OK);
      CHECK(mac.len == MOCK_DIGEST_LEN);
      REQUIRE(p->C_VerifyInit(b, &hmac, key) == CKR_OK);
      CHECK(verify(p, b, mac) == CKR_OK);  // member 1's copy made it
      CHECK(sign(p, a).rv == CKR_OPERATION_NOT_INITIALIZED);
    }
    SUBCASE("a length query, then too small a buffer on the next member") {
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      std::string data(kData);
      CK_ULONG len = 0;
      REQUIRE(p->C_Sign(a, reinterpret_cast<CK_BYTE*>(data.data()), data.size(), nullptr, &len) ==
              CKR_OK);
      CHECK(len == MOCK_DIGEST_LEN);
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      const Mac small = sign(p, a, MOCK_DIGEST_LEN - 1);
      CHECK(small.rv == CKR_BUFFER_TOO_SMALL);
      CHECK(small.len == MOCK_DIGEST_LEN);
      const Mac mac = sign(p, a);
      CHECK(mac.rv == CKR_OK);
      REQUIRE(p->C_VerifyInit(b, &hmac, key) == CKR_OK);
      CHECK(verify(p, b, mac) == CKR_OK);
    }
    SUBCASE("the member down before the call: the session moves, the Init is replayed") {
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      g.take_member_0_down(g.open());  // member 0 again (least-busy)
      const Mac mac = sign(p, a);
      CHECK(mac.rv == CKR_OK);
      REQUIRE(p->C_VerifyInit(b, &hmac, key) == CKR_OK);
      CHECK(verify(p, b, mac) == CKR_OK);
    }
    SUBCASE("an Init whose member fails is made on the next member") {
      g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
      CHECK(p->C_SignInit(a, &hmac, key) == CKR_OK);
      const Mac mac = sign(p, a);
      CHECK(mac.rv == CKR_OK);
      REQUIRE(p->C_VerifyInit(b, &hmac, key) == CKR_OK);
      CHECK(verify(p, b, mac) == CKR_OK);
    }
    // Whatever happened, nothing is left active: the session signs afresh.
    signs_afresh(p, a, b, key);
    g.faulty->clear_slot(2);
  }
}

TEST_CASE("group over the spec bender: a member failing under the single-part call itself") {
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    SUBCASE("it did the work, and its answer says the device failed") {
      BenderGroup g(bind);
      g.fail_nth("C_Digest", CKR_DEVICE_ERROR, 1);
      Digests d(g.proxy.p11, g.open(), "digested twice, answered once");
      REQUIRE(d.init() == CKR_OK);
      CHECK(d.digest() == CKR_OK);
      CHECK(d.right());
      CHECK(g.faulty->calls("C_Digest") == 2);
      CHECK(g.sessions_on(1) >= 1);  // moved to member 1
      REQUIRE(d.init() == CKR_OK);
    }
    SUBCASE("it did not, and kept the operation active; it comes back later") {
      // The bender's own failure: the first C_Sign answers CKR_DEVICE_ERROR
      // and its sign operation stays active on member 0's backend session.
      KeyOnBoth both(bind, "kept by the bender", bender_config("C_Sign", CKR_DEVICE_ERROR, 1));
      auto& [g, p, a, b, key] = both;
      REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
      const Mac mac = sign(p, a);
      CHECK(mac.rv == CKR_OK);
      CHECK(bender_stats().bend_ops_kept == 1);
      REQUIRE(p->C_VerifyInit(b, &hmac, key) == CKR_OK);
      CHECK(verify(p, b, mac) == CKR_OK);
      // Member 0 never really went away: its probe admits it again, and
      // sessions spread back to it. None carries the operation it kept.
      const CK_SESSION_HANDLE back = g.open_on_member_0();
      REQUIRE(back != CK_INVALID_HANDLE);
      std::vector<CK_SESSION_HANDLE> sessions{a, b, back};
      for (int i = 0; i < 4; ++i) sessions.push_back(g.open(true));
      for (CK_SESSION_HANDLE s : sessions) {
        CAPTURE(s);
        REQUIRE(p->C_SignInit(s, &hmac, key) == CKR_OK);
        CHECK(sign(p, s).rv == CKR_OK);
      }
      int there = 0;
      for (CK_SESSION_HANDLE s : sessions) there += g.on_member_0(s);
      CHECK(there >= 2);
    }
  }
}

TEST_CASE("group over the spec bender: what cannot be replayed is told lost once, then goes on") {
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    const bool kept = std::string_view(bind) == "open";  // one of each, not both twice
    BenderGroup g(bind, "warn",
                  kept ? bender_config("C_DigestFinal", CKR_DEVICE_ERROR, 1) : bender_config());
    Digests a(g.proxy.p11, g.open(), "fed to member 0");  // member 0
    const CK_SESSION_HANDLE b = g.open();                 // member 1
    const CK_SESSION_HANDLE c = g.open();                 // member 0
    REQUIRE(a.init() == CKR_OK);
    REQUIRE(a.update() == CKR_OK);
    if (kept) {
      // Member 0 itself fails the Final and keeps the digest (KEEP_OP).
      CHECK(a.final_part() == CKR_DEVICE_ERROR);
      CHECK(bender_stats().bend_ops_kept == 1);
    } else {
      g.take_member_0_down(c);
      CHECK(a.final_part() == CKR_DEVICE_ERROR);
    }
    CHECK(a.final_part() == CKR_OPERATION_NOT_INITIALIZED);
    // The next Init works, on member 1, and so does b.
    REQUIRE(a.init() == CKR_OK);
    CHECK(a.digest() == CKR_OK);
    CHECK(a.right());
    CHECK(g.random(b) == CKR_OK);
    g.faulty->clear_slot(2);
  }
}

TEST_CASE("group over the spec bender: a member that restarted under a session: renewed") {
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    BenderGroup g(bind);
    Digests a(g.proxy.p11, g.open(), "after a restart");  // member 0
    REQUIRE(a.init() == CKR_OK);
    SUBCASE("an operation that took no data is replayed on the fresh session") {
      g.faulty->restart_slot(2);
      CHECK(a.digest() == CKR_OK);
      CHECK(a.right());
    }
    SUBCASE("one that took data is lost, told once, not as a gone session") {
      REQUIRE(a.update() == CKR_OK);
      g.faulty->restart_slot(2);
      CHECK(a.final_part() == CKR_DEVICE_ERROR);
      CHECK(a.final_part() == CKR_OPERATION_NOT_INITIALIZED);
    }
    // The session stays on member 0, up, and digests afresh.
    REQUIRE(a.init() == CKR_OK);
    CHECK(a.digest() == CKR_OK);
    CHECK(a.right());
    CHECK(g.sessions_on(2) >= 1);
  }
}

TEST_CASE("group over the spec bender: an error the member keeps active after a replay") {
  // The spec ends an operation on an error of the call continuing it; the
  // bender does not. After a replay, the member's operation is p11mux's
  // doing; without one, the member's bend: either way the application's
  // next Init must work. Over a v2.40 member (no
  // C_SessionCancel) and a v3.0 one, in both bind modes.
  for (const int v3 : {0, 1})
    for (const char* bind : {"open", "state"}) {
      CAPTURE(v3);
      CAPTURE(bind);
      MockConfig config = bender_config();
      config.provide_v3 = v3;
      KeyOnBoth both(bind, "verified", config);
      auto& [g, p, a, b, key] = both;

      SUBCASE("a verification that fails on the member it was replayed on") {
        REQUIRE(p->C_VerifyInit(a, &hmac, key) == CKR_OK);
        g.faulty->fail_slot(2, CKR_DEVICE_ERROR);
        Mac wrong;
        wrong.len = MOCK_DIGEST_LEN;  // zeros: no MAC of kData
        CHECK(verify(p, a, wrong) == CKR_SIGNATURE_INVALID);
        CHECK(bender_stats().bend_ops_kept >= 1);
        const unsigned long cancels = bender().calls("C_SessionCancel");
        REQUIRE(p->C_VerifyInit(a, &hmac, key) == CKR_OK);
        // v3.0: cancelled; v2.40: a fresh backend session.
        CHECK(bender().calls("C_SessionCancel") == cancels + (v3 ? 1 : 0));
        REQUIRE(p->C_SignInit(b, &hmac, key) == CKR_OK);
        const Mac right = sign(p, b);
        REQUIRE(right.rv == CKR_OK);
        CHECK(verify(p, a, right) == CKR_OK);
      }
      SUBCASE("a verification that fails on its own member, which keeps it") {
        REQUIRE(p->C_VerifyInit(a, &hmac, key) == CKR_OK);
        Mac wrong;
        wrong.len = MOCK_DIGEST_LEN;
        CHECK(verify(p, a, wrong) == CKR_SIGNATURE_INVALID);
        CHECK(bender_stats().bend_ops_kept >= 1);
        REQUIRE(p->C_VerifyInit(a, &hmac, key) == CKR_OK);
        REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
        const Mac right = sign(p, a);
        REQUIRE(right.rv == CKR_OK);
        CHECK(verify(p, a, right) == CKR_OK);
      }
      SUBCASE("a C_DigestKey p11mux answers after replaying its digest") {
        // A session key lives on the member that made it (docs/groups.md,
        // "Objects"): the moved session's copy of it is gone.
        const CK_OBJECT_HANDLE mine = make_token_key(p, a, "session key", CK_FALSE);
        Digests d(p, a, "digested afresh");
        REQUIRE(d.init() == CKR_OK);
        g.take_member_0_down(g.open());
        CHECK(p->C_DigestKey(a, mine) == CKR_KEY_HANDLE_INVALID);
        REQUIRE(d.init() == CKR_OK);
        CHECK(d.digest() == CKR_OK);
        CHECK(d.right());
      }
      g.faulty->clear_slot(2);
    }
}

TEST_CASE("group over the spec bender: a short buffer across a failover, its length filled") {
  // FILL_LEN: C_GetAttributeValue on too small a buffer writes the length
  // it needs. A CKA_ID longer than the group's 64-byte reads (object_map's
  // read_object) and a label read by the application on the next member.
  BenderGroup g("open");
  CK_FUNCTION_LIST* p = g.proxy.p11;
  const CK_SESSION_HANDLE a = g.open(true);  // member 0
  const CK_SESSION_HANDLE b = g.open(true);  // member 1
  const CK_SESSION_HANDLE c = g.open(true);  // member 0
  const std::string id(100, 'i');
  (void)make_token_key(p, a, id);
  // Found by a search: the handle comes from reading the object's identity.
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_ATTRIBUTE by_class{CKA_CLASS, &cls, sizeof cls};
  REQUIRE(p->C_FindObjectsInit(a, &by_class, 1) == CKR_OK);
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  CK_ULONG found = 0;
  REQUIRE(p->C_FindObjects(a, &key, 1, &found) == CKR_OK);
  REQUIRE(found == 1);
  REQUIRE(p->C_FindObjectsFinal(a) == CKR_OK);
  CK_ATTRIBUTE query{CKA_ID, nullptr, 0};
  REQUIRE(p->C_GetAttributeValue(a, key, &query, 1) == CKR_OK);
  CHECK(query.ulValueLen == id.size());
  REQUIRE(p->C_SignInit(a, &hmac, key) == CKR_OK);
  g.take_member_0_down(c);
  // On member 1: too small a buffer (a heap block of its exact size, for
  // ASan), its length filled by the bender and nothing written past it.
  auto small = std::make_unique<CK_BYTE[]>(8);
  CK_ATTRIBUTE get{CKA_ID, small.get(), 8};
  CHECK(p->C_GetAttributeValue(a, key, &get, 1) == CKR_BUFFER_TOO_SMALL);
  CHECK(bender_stats().bend_lengths_filled >= 1);
  std::string value(id.size(), '\0');
  get = {CKA_ID, value.data(), value.size()};
  CHECK(p->C_GetAttributeValue(a, key, &get, 1) == CKR_OK);
  CHECK(value == id);
  // The key found on member 0 signs on member 1, its Init replayed.
  const Mac mac = sign(p, a);
  CHECK(mac.rv == CKR_OK);
  REQUIRE(p->C_VerifyInit(b, &hmac, key) == CKR_OK);
  CHECK(verify(p, b, mac) == CKR_OK);
  g.faulty->clear_slot(2);
}

TEST_CASE("group over the spec bender: reused handle numbers never revive a virtual handle") {
  // REUSE_HANDLES: a destroyed object's number goes to the next object made.
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    BenderGroup g(bind, "error");
    CK_FUNCTION_LIST* p = g.proxy.p11;
    const CK_SESSION_HANDLE a = g.open(true);  // member 0
    const CK_SESSION_HANDLE b = g.open(true);  // member 1
    auto alive = [&](CK_SESSION_HANDLE s, CK_OBJECT_HANDLE o) {
      CK_BYTE id[64];
      CK_ATTRIBUTE get{CKA_ID, id, sizeof id};
      return p->C_GetAttributeValue(s, o, &get, 1);
    };
    const unsigned long reused = bender_stats().bend_handles_reused;

    SUBCASE("a token key destroyed on every member, another made") {
      const CK_OBJECT_HANDLE old_key = make_token_key(p, a, "destroyed");
      // Each session's last resolution is old_key's (resolved_handle.hpp):
      // the map's changes below must not let it revive.
      for (CK_SESSION_HANDLE s : {a, b}) REQUIRE(alive(s, old_key) == CKR_OK);
      REQUIRE(p->C_DestroyObject(a, old_key) == CKR_OK);
      const CK_OBJECT_HANDLE new_key = make_token_key(p, a, "made after");
      CHECK(bender_stats().bend_handles_reused >= reused + 2);  // its number on each member
      CHECK(new_key != old_key);
      for (CK_SESSION_HANDLE s : {a, b}) {
        CHECK(alive(s, old_key) == CKR_OBJECT_HANDLE_INVALID);
        CHECK(p->C_SignInit(s, &hmac, old_key) == CKR_KEY_HANDLE_INVALID);
        CHECK(alive(s, new_key) == CKR_OK);
      }
    }
    SUBCASE("a session key of a session whose member restarted under it") {
      const CK_OBJECT_HANDLE old_key = make_token_key(p, a, "session", CK_FALSE);
      g.faulty->restart_slot(2);     // the bender's sessions on member 0 closed: the key with them
      CHECK(g.random(a) == CKR_OK);  // a fresh backend session
      const CK_OBJECT_HANDLE new_key = make_token_key(p, a, "session after", CK_FALSE);
      CHECK(bender_stats().bend_handles_reused > reused);
      CHECK(new_key != old_key);
      CHECK(alive(a, old_key) == CKR_OBJECT_HANDLE_INVALID);
      CHECK(p->C_SignInit(a, &hmac, old_key) == CKR_KEY_HANDLE_INVALID);
      CHECK(alive(a, new_key) == CKR_OK);
    }
    SUBCASE("a session key of a session moved off its member, which comes back") {
      const CK_OBJECT_HANDLE old_key = make_token_key(p, a, "session", CK_FALSE);
      g.take_member_0_down(g.open(true));
      CHECK(g.random(a) == CKR_OK);  // a moves to member 1
      CHECK(alive(a, old_key) == CKR_OBJECT_HANDLE_INVALID);
      // Member 0 restarts (the bender's sessions there closed) and is admitted.
      g.faulty->restart_slot(2);
      g.faulty->clear_slot(2);
      const CK_SESSION_HANDLE c = g.open_on_member_0();
      REQUIRE(c != CK_INVALID_HANDLE);
      const CK_OBJECT_HANDLE new_key = make_token_key(p, c, "session after", CK_FALSE);
      CHECK(bender_stats().bend_handles_reused > reused);
      CHECK(new_key != old_key);
      for (CK_SESSION_HANDLE s : {a, c}) {
        CAPTURE(s);
        CHECK(alive(s, old_key) == CKR_OBJECT_HANDLE_INVALID);
        CHECK(p->C_SignInit(s, &hmac, old_key) == CKR_KEY_HANDLE_INVALID);
      }
      CHECK(alive(c, new_key) == CKR_OK);
    }
  }
}

TEST_CASE(
    "group over the spec bender: a call made again keeps the application's template lengths") {
  // FILL_LEN: a short buffer gets the needed length written. The faulty
  // module then answers that the session is gone (`after`): the call made
  // again on a fresh session must see the 4 bytes the application gave.
  for (const char* bind : {"open", "state"}) {
    CAPTURE(bind);
    BenderGroup g(bind, "error");
    CK_FUNCTION_LIST* p = g.proxy.p11;
    const CK_SESSION_HANDLE s = g.open(true);
    const CK_OBJECT_HANDLE key = make_token_key(p, s, "lengths");  // a 7-byte CKA_ID
    g.fail_nth("C_GetAttributeValue", CKR_SESSION_HANDLE_INVALID, 1, /*after=*/true);
    std::array<CK_BYTE, 16> buffer{};
    CK_ATTRIBUTE id{CKA_ID, buffer.data(), 4};
    CHECK(p->C_GetAttributeValue(s, key, &id, 1) == CKR_BUFFER_TOO_SMALL);
    CHECK(std::all_of(buffer.begin() + 4, buffer.end(), [](CK_BYTE b) { return b == 0; }));
    id.ulValueLen = buffer.size();
    CHECK(p->C_GetAttributeValue(s, key, &id, 1) == CKR_OK);
    CHECK(id.ulValueLen == 7);
  }
}

}  // namespace p11mux::test
