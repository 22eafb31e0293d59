// Unit tests for proxy/metrics and proxy/stats_report: exact counts across
// threads, buckets, errors by code, pool figures, and the three renderings.
#include "observe/metrics.hpp"
#include "observe/observer.hpp"
#include "observe/stats_report.hpp"
#include "observe_test_support.hpp"

#include <doctest/doctest.h>

#include <spdlog/sinks/null_sink.h>

#include <thread>
#include <vector>

namespace p11mux {
namespace {

using test::parse_prometheus;
using test::valid_json;

constexpr std::size_t kSign = function_index<fn::C_Sign>;
constexpr std::size_t kLogin = function_index<fn::C_Login>;

TEST_CASE("every function of the table has an index and a name") {
  CHECK(kFunctionCount == 92);
  CHECK(kFunctionNames[function_index<fn::C_Initialize>] == "C_Initialize");
  CHECK(kFunctionNames[kSign] == "C_Sign");
  CHECK(kFunctionNames[function_index<fn::C_MessageVerifyFinal>] == "C_MessageVerifyFinal");
  CHECK(function_index_of("C_GetInfo") == function_index<fn::C_GetInfo>);
  CHECK_FALSE(function_index_of("C_Sgn").has_value());
}

TEST_CASE("latency buckets: powers of two of a microsecond, bounds inclusive") {
  CHECK(LatencyBuckets::index(0) == 0);
  CHECK(LatencyBuckets::index(1000) == 0);
  CHECK(LatencyBuckets::index(1001) == 1);
  CHECK(LatencyBuckets::index(2000) == 1);
  CHECK(LatencyBuckets::index(2001) == 2);
  CHECK(LatencyBuckets::index(1'000'000) == 10);  // 1 ms: (512, 1024] us
  CHECK(LatencyBuckets::index(LatencyBuckets::upper_ns(22)) == 22);
  CHECK(LatencyBuckets::index(LatencyBuckets::upper_ns(22) + 1) == 23);
  CHECK(LatencyBuckets::index(~std::uint64_t{0} / 2) == 23);
  for (std::size_t i = 0; i + 1 < LatencyBuckets::kCount; ++i) {
    CHECK(LatencyBuckets::index(LatencyBuckets::upper_ns(i)) == i);
  }
}

TEST_CASE("calls, errors by code and latency are counted exactly") {
  Metrics m;
  for (int i = 0; i < 10; ++i) m.record_call(kSign, CKR_OK, 1500);  // bucket 1 (<= 2 us)
  m.record_call(kSign, CKR_DEVICE_ERROR, 5000);
  m.record_call(kLogin, CKR_PIN_INCORRECT, 100);
  m.record_call(kLogin, CKR_PIN_INCORRECT, 100);
  m.record_call(kLogin, CKR_OK, 100);
  m.record_lock_wait(50);
  m.record_lock_wait(3000);

  MetricsSnapshot s = m.snapshot();
  CHECK(s.latency[kSign].count() == 11);
  CHECK(s.latency[kSign].buckets[1] == 10);
  CHECK(s.latency[kSign].buckets[3] == 1);  // 5 us: (4, 8]
  CHECK(s.latency[kSign].sum_ns == 10 * 1500 + 5000);
  CHECK(s.latency[kSign].max_ns == 5000);
  CHECK(s.errors[kSign] == 1);
  CHECK(s.latency[kLogin].count() == 3);
  CHECK(s.errors[kLogin] == 2);
  REQUIRE(s.errors_by_rv.size() == 2);
  CHECK(s.errors_by_rv[0].function == kLogin);  // table order: C_Login before C_Sign
  CHECK(s.errors_by_rv[0].rv == CKR_PIN_INCORRECT);
  CHECK(s.errors_by_rv[0].count == 2);
  CHECK(s.errors_by_rv[1].function == kSign);
  CHECK(s.errors_by_rv[1].rv == CKR_DEVICE_ERROR);
  CHECK(s.errors_unclassified == 0);
  CHECK(s.lock_wait.count() == 2);
  CHECK(s.lock_wait.sum_ns == 3050);
  CHECK(s.latency[function_index<fn::C_Digest>].count() == 0);
}

TEST_CASE("counts from many threads add up exactly (no lost updates)") {
  Metrics m;
  constexpr int kThreads = 8;
  constexpr int kCalls = 20000;
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kCalls; ++i) {
        m.record_call(kSign, i % 100 == 0 ? CKR_FUNCTION_FAILED : CKR_OK,
                      static_cast<std::uint64_t>(t * 1000 + i % 7));
        m.record_lock_wait(10);
      }
    });
  }
  // Snapshots while counting are lower bounds and never throw.
  for (int i = 0; i < 20; ++i) CHECK(m.snapshot().latency[kSign].count() <= kThreads * kCalls);
  for (auto& t : threads) t.join();
  MetricsSnapshot s = m.snapshot();
  CHECK(s.latency[kSign].count() == kThreads * kCalls);
  CHECK(s.errors[kSign] == kThreads * kCalls / 100);
  REQUIRE(s.errors_by_rv.size() == 1);
  CHECK(s.errors_by_rv[0].count == kThreads * kCalls / 100);
  CHECK(s.lock_wait.count() == kThreads * kCalls);
}

TEST_CASE("vendor and unusual return codes are told apart") {
  Metrics m;
  m.record_call(kSign, CKR_VENDOR_DEFINED + 7, 1);
  m.record_call(kSign, CKR_VENDOR_DEFINED + 7, 1);
  m.record_call(kSign, 0xFFFFFFFFul, 1);
  MetricsSnapshot s = m.snapshot();
  REQUIRE(s.errors_by_rv.size() == 2);
  CHECK(s.errors_by_rv[0].rv == CKR_VENDOR_DEFINED + 7);
  CHECK(s.errors_by_rv[0].count == 2);
  CHECK(s.errors_by_rv[1].rv == 0xFFFFFFFFul);
}

TEST_CASE("quantiles interpolate within buckets and never exceed the maximum") {
  HistogramCounts h;
  CHECK(h.quantile_ns(0.5) == 0.0);
  h.buckets[1] = 100;  // (1, 2] us
  h.sum_ns = 150000;
  h.max_ns = 1900;
  CHECK(h.quantile_ns(0.5) == doctest::Approx(1450.0));
  CHECK(h.quantile_ns(1.0) <= 1900.0);
  CHECK(h.quantile_ns(0.0) >= 1000.0);
  HistogramCounts one;
  one.buckets[6] = 1;  // (32, 64] us
  one.sum_ns = one.max_ns = 40000;
  CHECK(one.quantile_ns(0.5) == 40000.0);
}

TEST_CASE("pool figures: one entry per slot, stable, safe to register concurrently") {
  LockSource os;
  PoolMetricsRegistry pools(os);
  SlotPoolMetrics* a = pools.slot(3);
  REQUIRE(a != nullptr);
  CHECK(pools.slot(3) == a);
  std::vector<std::thread> threads;
  std::vector<SlotPoolMetrics*> seen(8);
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&, t] { seen[static_cast<std::size_t>(t)] = pools.slot(7); });
  }
  for (auto& t : threads) t.join();
  for (SlotPoolMetrics* p : seen) CHECK(p == seen[0]);
  a->open = 4;
  a->idle = 1;
  a->in_use = 3;
  a->waits = 2;
  a->wait_ns = 1'500'000;
  a->discarded_dead = 1;
  std::vector<SlotFigures> figures = slot_figures(pools);
  REQUIRE(figures.size() == 2);
  CHECK(figures[0].slot == 3);
  CHECK(figures[0].open == 4);
  CHECK(figures[0].in_use == 3);
  CHECK(figures[0].wait_ns == 1'500'000);
  CHECK(figures[1].slot == 7);
}

// docs/groups.md, "Per-member figures": each [backend.NAME] has its own slot
// IDs, so two backends' pools on one slot ID are two entries, each named by
// its backend, never one sum.
TEST_CASE("pool figures of two backends sharing a slot ID: apart, named in every rendering") {
  LockSource os;
  PoolMetricsRegistry a(os, "a"), b(os, "b");
  REQUIRE(a.slot(0) != nullptr);
  REQUIRE(b.slot(0) != nullptr);
  a.slot(0)->open = 3;
  a.slot(0)->in_use = 3;
  a.slot(0)->unclean[0] = 2;
  b.slot(0)->open = 1;
  b.slot(0)->idle = 1;
  LiveFigures live;
  for (const PoolMetricsRegistry* r : {&a, &b}) {
    for (SlotFigures& f : slot_figures(*r)) live.slots.push_back(std::move(f));
  }
  REQUIRE(live.slots.size() == 2);
  CHECK(live.slots[0].backend == "a");
  CHECK(live.slots[0].open == 3);
  CHECK(live.slots[1].backend == "b");
  CHECK(live.slots[1].open == 1);

  std::string text = prometheus_text(MetricsSnapshot{}, live);
  INFO(text);
  auto p = parse_prometheus(text);
  for (const auto& e : p.errors) FAIL_CHECK(e);
  CHECK(p.at("p11mux_pool_sessions_open{backend=\"a\",slot=\"0\"}") == 3);
  CHECK(p.at("p11mux_pool_sessions_open{backend=\"b\",slot=\"0\"}") == 1);
  CHECK(p.at("p11mux_pool_sessions_idle{backend=\"b\",slot=\"0\"}") == 1);
  CHECK(p.at("p11mux_pool_wait_duration_seconds_count{backend=\"a\",slot=\"0\"}") == 0);
  CHECK(p.at("p11mux_pool_sessions_unclean_total{backend=\"a\",slot=\"0\",reason=\"" +
             std::string(kCloseReasonNames[0]) + "\"}") == 2);
  CHECK(p.at("p11mux_pool_sessions_unclean_total{backend=\"b\",slot=\"0\",reason=\"" +
             std::string(kCloseReasonNames[0]) + "\"}") == 0);
  CHECK_FALSE(p.has("p11mux_pool_sessions_open{slot=\"0\"}"));

  std::string json = stats_json(MetricsSnapshot{}, live);
  CHECK(valid_json(json));
  CHECK_MESSAGE(
      json.find("\"slots\":[{\"backend\":\"a\",\"slot\":0,\"open\":3,") != std::string::npos, json);
  CHECK_MESSAGE(
      json.find("{\"backend\":\"b\",\"slot\":0,\"open\":1,\"idle\":1,") != std::string::npos, json);

  std::string all;
  for (const auto& l : summary_lines(MetricsSnapshot{}, live)) all += l + "\n";
  CHECK_MESSAGE(
      all.find("  backend a slot 0 pool: 0 virtual sessions on 3 open (0 idle, 3 in use)") !=
          std::string::npos,
      all);
  CHECK_MESSAGE(
      all.find("  backend b slot 0 pool: 0 virtual sessions on 1 open (1 idle, 0 in use)") !=
          std::string::npos,
      all);
}

// The single-backend configuration's figures stay as they were before groups:
// no backend name anywhere (dashboards and scrapers keep working).
TEST_CASE("pool figures of the single backend carry no backend name") {
  LockSource os;
  PoolMetricsRegistry only(os);
  only.slot(0)->open = 2;
  LiveFigures live;
  live.slots = slot_figures(only);
  REQUIRE(live.slots.size() == 1);
  CHECK(live.slots[0].backend.empty());
  std::string text = prometheus_text(MetricsSnapshot{}, live);
  CHECK(text.find("backend=") == std::string::npos);
  CHECK(parse_prometheus(text).at("p11mux_pool_sessions_open{slot=\"0\"}") == 2);
  std::string json = stats_json(MetricsSnapshot{}, live);
  CHECK(json.find("\"backend\"") == std::string::npos);
  CHECK(json.find("\"slots\":[{\"slot\":0,\"open\":2,") != std::string::npos);
  std::string all;
  for (const auto& l : summary_lines(MetricsSnapshot{}, live)) all += l + "\n";
  CHECK(all.find("\n  slot 0 pool: 0 virtual sessions on 2 open") != std::string::npos);
}

// The observer gives each [backend.NAME] a registry of its own, in the
// configuration's order (Runtime::ports()'s), and reports them all.
TEST_CASE("the observer keeps each backend's pool figures apart, in configuration order") {
  LockSource os;
  Config config;
  for (const char* name : {"hsm_b", "hsm_a"}) {
    NamedBackend& b = config.backends.emplace_back();
    b.name = name;
  }
  auto log = std::make_shared<spdlog::logger>("observer-test",
                                              std::make_shared<spdlog::sinks::null_sink_mt>());
  Observer observer(config, os, false, log);
  REQUIRE(&observer.pools(0) != &observer.pools(1));
  observer.pools(0).slot(0)->open = 5;
  observer.pools(1).slot(0)->open = 7;
  observer.pools(1).slot(2)->open = 1;
  auto p = parse_prometheus(observer.prometheus());
  CHECK(p.at("p11mux_pool_sessions_open{backend=\"hsm_b\",slot=\"0\"}") == 5);
  CHECK(p.at("p11mux_pool_sessions_open{backend=\"hsm_a\",slot=\"0\"}") == 7);
  CHECK(p.at("p11mux_pool_sessions_open{backend=\"hsm_a\",slot=\"2\"}") == 1);
  std::string json = observer.json();
  const auto b0 = json.find("{\"backend\":\"hsm_b\",\"slot\":0,\"open\":5,");
  const auto a0 = json.find("{\"backend\":\"hsm_a\",\"slot\":0,\"open\":7,");
  const auto a2 = json.find("{\"backend\":\"hsm_a\",\"slot\":2,\"open\":1,");
  REQUIRE(b0 != std::string::npos);
  REQUIRE(a0 != std::string::npos);
  REQUIRE(a2 != std::string::npos);
  CHECK(b0 < a0);  // by backend in configuration order, then by slot
  CHECK(a0 < a2);
}

MetricsSnapshot sample_snapshot() {
  Metrics m;
  m.record_call(kSign, CKR_OK, 1500);
  m.record_call(kSign, CKR_OK, 3'000'000'000);  // 3 s
  m.record_call(kSign, CKR_DEVICE_ERROR, 5000);
  m.record_call(kLogin, CKR_PIN_INCORRECT, 100);
  m.record_lock_wait(70);
  return m.snapshot();
}

LiveFigures sample_live() {
  LiveFigures live;
  live.uptime_s = 12.5;
  live.sessions_open = 2;
  live.log_records_dropped = 3;
  SlotFigures& slot = live.slots.emplace_back();
  slot.open = 4;
  slot.idle = 1;
  slot.in_use = 3;
  slot.waits = 2;
  slot.wait_ns = 1'500'000;
  slot.discarded_dead = 1;
  slot.virtual_sessions = 10;
  slot.wait.buckets[LatencyBuckets::index(500'000)] = 1;    // 0.5 ms
  slot.wait.buckets[LatencyBuckets::index(1'000'000)] = 1;  // 1 ms
  slot.wait.sum_ns = 1'500'000;
  slot.wait.max_ns = 1'000'000;
  // A group's member, its label holding what the exposition format escapes.
  live.members.push_back(
      {"signing", "hsm1/label:\"EU\", signing", "down", "device", 1, 40, 2, 1, 0, 3, 0, 5, false});
  return live;
}

TEST_CASE("Prometheus text: valid, with exact values") {
  std::string text = prometheus_text(sample_snapshot(), sample_live());
  auto p = parse_prometheus(text);
  INFO(text);
  for (const auto& e : p.errors) FAIL_CHECK(e);
  CHECK(p.types["p11mux_calls_total"] == "counter");
  CHECK(p.types["p11mux_call_duration_seconds"] == "histogram");
  CHECK(p.types["p11mux_sessions_open"] == "gauge");
  CHECK(p.at("p11mux_calls_total{function=\"C_Sign\"}") == 3);
  CHECK(p.at("p11mux_calls_total{function=\"C_Login\"}") == 1);
  CHECK_FALSE(p.has("p11mux_calls_total{function=\"C_Digest\"}"));
  CHECK(p.at("p11mux_call_errors_total{function=\"C_Sign\",rv=\"CKR_DEVICE_ERROR\"}") == 1);
  CHECK(p.at("p11mux_call_errors_total{function=\"C_Login\",rv=\"CKR_PIN_INCORRECT\"}") == 1);
  CHECK(p.at("p11mux_call_duration_seconds_bucket{function=\"C_Sign\",le=\"2e-06\"}") == 1);
  CHECK(p.at("p11mux_call_duration_seconds_bucket{function=\"C_Sign\",le=\"8e-06\"}") == 2);
  CHECK(p.at("p11mux_call_duration_seconds_bucket{function=\"C_Sign\",le=\"+Inf\"}") == 3);
  CHECK(p.at("p11mux_call_duration_seconds_count{function=\"C_Sign\"}") == 3);
  CHECK(p.at("p11mux_call_duration_seconds_sum{function=\"C_Sign\"}") ==
        doctest::Approx(3.0000065));
  CHECK(p.at("p11mux_session_lock_wait_seconds_count") == 1);
  CHECK(p.at("p11mux_sessions_open") == 2);
  CHECK(p.at("p11mux_pool_sessions_in_use{slot=\"0\"}") == 3);
  CHECK(p.at("p11mux_pool_wait_seconds_total{slot=\"0\"}") == doctest::Approx(0.0015));
  CHECK(p.at("p11mux_pool_virtual_sessions{slot=\"0\"}") == 10);
  CHECK(p.at("p11mux_pool_virtual_per_backend{slot=\"0\"}") == 2.5);
  CHECK(p.types["p11mux_pool_wait_duration_seconds"] == "histogram");
  CHECK(p.at("p11mux_pool_wait_duration_seconds_bucket{slot=\"0\",le=\"0.000512\"}") == 1);
  CHECK(p.at("p11mux_pool_wait_duration_seconds_bucket{slot=\"0\",le=\"+Inf\"}") == 2);
  CHECK(p.at("p11mux_pool_wait_duration_seconds_count{slot=\"0\"}") == 2);
  CHECK(p.at("p11mux_log_records_dropped_total") == 3);
  CHECK(p.at("p11mux_uptime_seconds") == 12.5);
  const std::string member = "{group=\"signing\",member=\"hsm1/label:\\\"EU\\\", signing\"}";
  CHECK(p.at("p11mux_member_up" + member) == 0);
  CHECK(p.at("p11mux_member_calls_in_flight" + member) == 1);
  CHECK(p.at("p11mux_member_calls_total" + member) == 40);
  CHECK(p.at("p11mux_member_errors_total" + member) == 2);
  CHECK(p.at("p11mux_member_downs_total" + member) == 1);
  CHECK(p.at("p11mux_member_failovers_total" + member) == 3);
  CHECK(p.at("p11mux_member_sessions" + member) == 5);
  CHECK(p.at("p11mux_member_login_ready" + member) == 0);
  CHECK(p.types["p11mux_member_calls_total"] == "counter");
}

TEST_CASE("the Prometheus checker rejects what Prometheus would") {
  CHECK_FALSE(parse_prometheus("x 1\n").errors.empty());                            // no TYPE
  CHECK_FALSE(parse_prometheus("# TYPE x counter\nx{a=\"1\" 1\n").errors.empty());  // labels
  CHECK_FALSE(parse_prometheus("# TYPE x counter\nx one\n").errors.empty());        // value
  CHECK_FALSE(
      parse_prometheus("# TYPE x counter\n# TYPE x gauge\nx 1\n").errors.empty());  // 2 TYPEs
  CHECK_FALSE(parse_prometheus("# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\n"
                               "h_count 1\n")
                  .errors.empty());                                       // not cumulative
  CHECK_FALSE(parse_prometheus("# TYPE x counter\nx 1").errors.empty());  // no final newline
  CHECK(parse_prometheus("# HELP x a\n# TYPE x counter\nx{a=\"q\\\"\"} 1\n").errors.empty());
}

TEST_CASE("JSON snapshot: valid, with the figures") {
  std::string json = stats_json(sample_snapshot(), sample_live());
  INFO(json);
  CHECK(valid_json(json));
  CHECK(
      json.find("\"C_Sign\":{\"calls\":3,\"errors\":1,\"errors_by_rv\":{\"CKR_DEVICE_ERROR\":1}") !=
      std::string::npos);
  CHECK(json.find("\"sessions_open\":2") != std::string::npos);
  CHECK(json.find("\"slots\":[{\"slot\":0,\"open\":4,\"idle\":1,\"in_use\":3,"
                  "\"virtual_sessions\":10,\"virtual_per_backend\":2.500,\"waits\":2") !=
        std::string::npos);
  CHECK(json.find("\"wait_latency_us\":{\"mean\":750.000,") != std::string::npos);
  CHECK(json.find("\"members\":[{\"group\":\"signing\",\"member\":\"hsm1/label:\\\"EU\\\", "
                  "signing\",\"state\":\"down\",\"last_down\":\"device\",\"in_flight\":1,"
                  "\"calls\":40,\"errors\":2,\"downs\":1,\"hung\":0,\"failovers\":3,"
                  "\"replays\":0,\"sessions\":5,\"login_ready\":false}]") != std::string::npos);
  CHECK(valid_json(stats_json(MetricsSnapshot{}, LiveFigures{})));
  CHECK_FALSE(valid_json("{\"a\":1,}"));
  CHECK_FALSE(valid_json("{\"a\":01}"));
}

TEST_CASE("summary table: busiest function first, errors, lock and pool lines") {
  auto lines = summary_lines(sample_snapshot(), sample_live());
  REQUIRE(lines.size() >= 6);
  CHECK(lines[0].find(
            "metrics summary: 12.5 s since C_Initialize, 2 sessions open, 4 calls, 2 errors") !=
        std::string::npos);
  CHECK(lines[1].find("function") != std::string::npos);
  CHECK(lines[2].find("C_Sign") != std::string::npos);
  CHECK(lines[3].find("C_Login") != std::string::npos);
  std::string all;
  for (const auto& l : lines) all += l + "\n";
  CHECK(all.find("C_Login CKR_PIN_INCORRECT x1") != std::string::npos);
  CHECK(all.find("group signing member hsm1/label:\"EU\", signing: down, 5 sessions, 40 calls "
                 "(1 in flight), 2 errors, 1 downs (0 hung; last: device), 3 failovers, 0 replays; "
                 "refused the kept login: new sessions pass it over") != std::string::npos);
  CHECK(all.find("session lock: 1 acquisitions") != std::string::npos);
  CHECK(all.find("slot 0 pool: 10 virtual sessions on 4 open (1 idle, 3 in use), 2 waits (1.5 ms, "
                 "p99 1.0 ms), 1 discarded dead") != std::string::npos);
  CHECK(all.find("3 records dropped") != std::string::npos);
}

}  // namespace
}  // namespace p11mux
