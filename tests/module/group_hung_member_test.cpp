// A group member that hangs (issue 15; proxy/group/README.md, "A hung
// member") is never called by p11mux's own work, and blocks none of it: the
// pool's maintenance (keepalive pings, idle closes), the members' watch and
// probes, and the calls at the group's boundaries (docs/groups.md, "A member
// that does not answer"). Over the faulty module in front of the mock
// (group_harness.hpp).
#include "group_harness.hpp"
#include "unit/observe_test_support.hpp"

#include <unistd.h>

#include <chrono>
#include <future>
#include <string>
#include <thread>
#include <utility>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

constexpr const char* kMember0 = "faulty/serial:2";            // the faulty module's slot 2
constexpr const char* kMember1 = "faulty/label:mock-token-1";  // its slot 1

// Polls `done` every 50 ms, for at most `limit` (a liveness guard, not a timing).
template <class Fn>
bool within(std::chrono::milliseconds limit, Fn done) {
  for (auto waited = 0ms; waited < limit; waited += 50ms) {
    if (done()) return true;
    std::this_thread::sleep_for(50ms);
  }
  return done();
}

// FaultyGroup with hang_timeout_s = 1 (and `conf`), its figures in /metrics,
// and one more variable `var`. Its member slots' hung calls are released
// when the test ends, before the calls that wait on them are waited for, and
// before the proxy finalizes.
class HangingGroup {
 public:
  HangingGroup(const char* conf, std::pair<const char*, const char*> var)
      : sock_(unique_temp_path("hung", "sock")),
        g(std::string(conf) + "hang_timeout_s = 1\n",
          {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
           {"P11MUX_LOG_LEVEL", "error"},
           {"P11MUX_METRICS_LISTEN", sock_.c_str()},
           var}) {
    REQUIRE(g.proxy.initialize() == CKR_OK);
  }
  ~HangingGroup() {
    g.faulty->release_slot(2);
    g.faulty->release_slot(1);
    if (hung.valid()) hung.wait();
    ::unlink(sock_.c_str());
  }
  HangingGroup(const HangingGroup&) = delete;
  HangingGroup& operator=(const HangingGroup&) = delete;

  // A member's figure (docs/groups.md, "Per-member figures").
  double figure(const char* name, const char* member) const {
    auto m = http_get(endpoint_of(sock_), "/metrics");
    REQUIRE(m);
    return parse_prometheus(m->body).at(std::string(name) + "{group=\"signing\",member=\"" +
                                        member + "\"}");
  }
  // Two sessions on member 0 (balance = primary), the second closed: its
  // backend session idle in member 0's pool. The first is returned.
  CK_SESSION_HANDLE one_busy_one_idle() {
    const CK_SESSION_HANDLE a = g.open(), b = g.open();
    REQUIRE(g.random(a) == CKR_OK);
    REQUIRE(g.random(b) == CKR_OK);
    REQUIRE(g.proxy.p11->C_CloseSession(b) == CKR_OK);
    return a;
  }
  // `slot` stops answering under a call on `s` (`hung`), and its member
  // (`member`) is found hung: within 1.25 s of the hang (10 s is a liveness
  // guard).
  void hang_under(CK_SESSION_HANDLE s, unsigned long slot, const char* member) {
    g.faulty->hang_slot(slot, FAULTY_HANG_UNTIL_RELEASED);
    hung = std::async(std::launch::async, [this, s] { return g.random(s); });
    REQUIRE(wait_hung(g.faulty, slot));
    REQUIRE(within(10s, [&] { return figure("p11mux_member_hung_total", member) == 1; }));
  }
  // Whether `call` returns within 5 s; if not, member 0 is released so that it can.
  template <class T>
  bool prompt(std::future<T>& call) {
    const bool ready = call.wait_for(5s) == std::future_status::ready;
    g.faulty->release_slot(2);
    return ready;
  }

 private:
  std::string sock_;

 public:
  FaultyGroup g;
  std::future<CK_RV> hung;
};

}  // namespace

TEST_CASE(
    "group hung member: an idle member that stops answering is found hung by its keepalive "
    "ping, and the other member's pings go on") {
  HangingGroup h("", {"P11MUX_POOL_KEEPALIVE_S", "1"});
  FaultyGroup& g = h.g;
  // One session on each member (least-busy takes ties in turn), closed: an
  // idle backend session in each member's pool, and no call of the
  // application's in flight anywhere.
  const CK_SESSION_HANDLE s1 = g.open(), s2 = g.open();
  REQUIRE(g.random(s1) == CKR_OK);
  REQUIRE(g.random(s2) == CKR_OK);
  REQUIRE(g.on_member_0(s1) != g.on_member_0(s2));
  REQUIRE(g.proxy.p11->C_CloseSession(s1) == CKR_OK);
  REQUIRE(g.proxy.p11->C_CloseSession(s2) == CKR_OK);
  // Member 0 stops answering: its idle session's keepalive ping hangs.
  g.faulty->hang_slot(2, FAULTY_HANG_UNTIL_RELEASED);
  REQUIRE(wait_hung(g.faulty, 2));
  // The ping is a call in flight on the member: it is found hung (within
  // 1.25 s of the hang; 10 s is a liveness guard).
  CHECK(within(10s, [&] { return h.figure("p11mux_member_hung_total", kMember0) == 1; }));
  // Member 1's idle session is still pinged (every second): the hung ping
  // holds up member 0's maintenance only.
  const unsigned long pings = g.faulty->calls("C_GetSessionInfo");
  CHECK(within(5s, [&] { return g.faulty->calls("C_GetSessionInfo") > pings; }));
}

TEST_CASE("group hung member: a member found hung gets no keepalive ping") {
  HangingGroup h("balance = primary\n", {"P11MUX_POOL_KEEPALIVE_S", "2"});
  const CK_SESSION_HANDLE a = h.one_busy_one_idle();
  // Right after the idle session's first ping (every 2 s), member 0 stops
  // answering under a's call, and is found hung before the next ping is due.
  REQUIRE(within(5s, [&] { return h.g.faulty->calls("C_GetSessionInfo") > 0; }));
  h.hang_under(a, 2, kMember0);
  // Two more pings would be due meanwhile: none is made, so a's call is the
  // only one waiting in the member.
  std::this_thread::sleep_for(3s);
  FaultySlotStats stats{};
  h.g.faulty->slot_stats(2, &stats);
  CHECK(stats.hung_now == 1);
  h.g.faulty->release_slot(2);
  CHECK(h.hung.get() == CKR_OK);
}

TEST_CASE(
    "group hung member: a member whose probe hangs holds up neither another member's hang "
    "detection nor its recovery") {
  HangingGroup h("balance = primary\n", {"P11MUX_LOG_LEVEL", "error"});
  FaultyGroup& g = h.g;
  // a on member 0 (primary), which fails: down, and its probe (every
  // second) hangs in the member.
  const CK_SESSION_HANDLE a = g.open();
  REQUIRE(g.random(a) == CKR_OK);
  g.take_member_0_down(a);
  g.faulty->hang_slot(2, FAULTY_HANG_UNTIL_RELEASED);
  REQUIRE(wait_hung(g.faulty, 2));
  // a moves to member 1 (leaving its backend session on member 0 without a
  // close, which would hang), which then stops answering under a's call:
  // found hung all the same.
  REQUIRE(g.random(a) == CKR_OK);
  h.hang_under(a, 1, kMember1);
  // It answers again: probed and up again, while member 0's probe still hangs.
  g.faulty->release_slot(1);
  CHECK(h.hung.get() == CKR_OK);
  CHECK(within(10s, [&] { return h.figure("p11mux_member_up", kMember1) == 1; }));
  FaultySlotStats stats{};
  g.faulty->slot_stats(2, &stats);
  CHECK(stats.hung_now == 1);
}

TEST_CASE(
    "group hung member: the group's slot and token info, and C_Login, do not ask a hung "
    "member") {
  HangingGroup h("balance = primary\n", {"P11MUX_LOG_LEVEL", "error"});
  CK_FUNCTION_LIST* p = h.g.proxy.p11;
  h.hang_under(h.g.open(), 2, kMember0);
  const CK_SESSION_HANDLE b = h.g.open();  // on member 1, the one up
  // Each answered from member 1 alone, at once.
  auto answered = std::async(std::launch::async, [&] {
    CK_SLOT_INFO slot{};
    CK_TOKEN_INFO token{};
    CK_ULONG n = 0;
    CK_UTF8CHAR pin[] = MOCK_USER_PIN;
    const bool info = p->C_GetSlotInfo(0, &slot) == CKR_OK &&
                      (slot.flags & CKF_TOKEN_PRESENT) != 0 &&
                      p->C_GetTokenInfo(0, &token) == CKR_OK &&
                      p->C_GetSlotList(CK_TRUE, nullptr, &n) == CKR_OK && n == 1;
    return info && p->C_Login(b, CKU_USER, pin, sizeof pin - 1) == CKR_OK;
  });
  CHECK(h.prompt(answered));
  CHECK(answered.get());
}

TEST_CASE("group hung member: C_Finalize does not close a hung member's idle sessions") {
  // No probe during the test: the member stays hung once its call returned.
  HangingGroup h("balance = primary\n", {"P11MUX_GROUP_SIGNING_RECOVERY_INTERVAL_S", "3600"});
  h.hang_under(h.one_busy_one_idle(), 2, kMember0);
  // a's call returns (a network HSM's own timeout, say); the member still
  // answers nothing.
  h.g.faulty->release_slot(2);
  h.g.faulty->hang_slot(2, FAULTY_HANG_UNTIL_RELEASED);
  CHECK(h.hung.get() == CKR_OK);
  auto finalized =
      std::async(std::launch::async, [&] { return h.g.proxy.p11->C_Finalize(nullptr); });
  CHECK(h.prompt(finalized));
  CHECK(finalized.get() == CKR_OK);
  h.g.proxy.finalized();
}

}  // namespace p11mux::test
