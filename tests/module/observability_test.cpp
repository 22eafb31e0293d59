// Observability through the real module over the mock: metrics that match a
// known call sequence exactly, the stats endpoint (and when it must not
// exist), secrets absent from every log level, trace records, filters, the
// summary table (C_Finalize, SIGUSR1), log rotation, and fork.
#include "group_harness.hpp"
#include "harness.hpp"

#include "unit/observe_test_support.hpp"

#include <dirent.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <map>
#include <regex>
#include <set>
#include <sstream>
#include <thread>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

std::string temp_path(const std::string& name) { return unique_temp_path("obs", name); }

// The names of this process's threads (p11mux names its own p11mux-*).
std::multiset<std::string> thread_names() {
  std::multiset<std::string> names;
  DIR* dir = ::opendir("/proc/self/task");
  REQUIRE(dir != nullptr);
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    std::string comm = slurp(std::string("/proc/self/task/") + e->d_name + "/comm");
    if (!comm.empty() && comm.back() == '\n') comm.pop_back();
    names.insert(comm);
  }
  ::closedir(dir);
  return names;
}

bool has_thread(const std::string& name) { return thread_names().count(name) != 0; }

// The address p11mux logged for its endpoint (needs [log] level info).
std::string logged_endpoint(const std::string& log_path) {
  std::smatch m;
  std::string text = slurp(log_path);
  static const std::regex line("metrics endpoint: (\\S+) serves");
  return std::regex_search(text, m, line) ? m[1].str() : std::string();
}

// Waits (bounded) until the file contains `what`.
bool eventually_contains(const std::string& path, const std::string& what,
                         std::chrono::seconds limit = 10s) {
  auto deadline = std::chrono::steady_clock::now() + limit;
  while (std::chrono::steady_clock::now() < deadline) {
    if (slurp(path).find(what) != std::string::npos) return true;
    std::this_thread::sleep_for(10ms);
  }
  return false;
}

unsigned short free_tcp_port() {
  int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in sa{};
  sa.sin_family = AF_INET;
  sa.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
  socklen_t len = sizeof sa;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&sa), &len);
  ::close(fd);
  return ntohs(sa.sin_port);
}

CK_UTF8CHAR_PTR utf8(const std::string& s) {
  return reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char*>(s.data()));
}

std::string hex(std::string_view bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += digits[c >> 4];
    out += digits[c & 15];
  }
  return out;
}

CK_C_INITIALIZE_ARGS no_threads_args() {
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK | CKF_LIBRARY_CANT_CREATE_OS_THREADS;
  return args;
}

TEST_CASE("metrics match a known call sequence exactly, over a unix socket") {
  std::string sock = temp_path("exact.sock");
  MockConfig mock{};
  std::snprintf(mock.fail_function, sizeof mock.fail_function, "C_Sign");
  mock.fail_rv = CKR_DEVICE_ERROR;
  std::string metrics, stats;
  {
    Proxy proxy(mock, nullptr, {{"P11MUX_METRICS_LISTEN", sock.c_str()}});
    CK_FUNCTION_LIST* p = proxy.p11;
    CK_SESSION_HANDLE a = proxy.open();
    CK_SESSION_HANDLE b = proxy.open();
    CK_BYTE buf[16];
    for (int i = 0; i < 5; ++i) REQUIRE(p->C_GenerateRandom(a, buf, sizeof buf) == CKR_OK);
    CK_MECHANISM mech = sha256();
    CK_BYTE data[] = "abc";
    CK_BYTE digest[MOCK_DIGEST_LEN];
    for (int i = 0; i < 3; ++i) {
      CK_ULONG len = sizeof digest;
      REQUIRE(p->C_DigestInit(b, &mech) == CKR_OK);
      REQUIRE(p->C_Digest(b, data, 3, digest, &len) == CKR_OK);
    }
    CHECK(p->C_GenerateRandom(0x7777, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);
    std::string wrong = "Wr0ng!Pn";
    CHECK(p->C_Login(a, CKU_USER, utf8(wrong), wrong.size()) == CKR_PIN_INCORRECT);
    CHECK(p->C_Login(a, CKU_USER, utf8(wrong), wrong.size()) == CKR_PIN_INCORRECT);
    CK_ULONG sig_len = 0;
    CHECK(p->C_Sign(a, data, 3, nullptr, &sig_len) == CKR_DEVICE_ERROR);  // injected
    REQUIRE(p->C_CloseSession(b) == CKR_OK);

    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    CHECK(m->status == 200);
    metrics = m->body;
    auto s = http_get(endpoint_of(sock), "/stats");
    REQUIRE(s);
    stats = s->body;
  }
  auto prom = parse_prometheus(metrics);
  INFO(metrics);
  for (const auto& e : prom.errors) FAIL_CHECK(e);
  auto calls = [&](const char* f) {
    return prom.at(std::string("p11mux_calls_total{function=\"") + f + "\"}");
  };
  CHECK(calls("C_OpenSession") == 2);
  CHECK(calls("C_GenerateRandom") == 6);
  CHECK(calls("C_DigestInit") == 3);
  CHECK(calls("C_Digest") == 3);
  CHECK(calls("C_Login") == 2);
  CHECK(calls("C_Sign") == 1);
  CHECK(calls("C_CloseSession") == 1);
  CHECK_FALSE(prom.has("p11mux_calls_total{function=\"C_Logout\"}"));
  CHECK(prom.at("p11mux_call_errors_total{function=\"C_GenerateRandom\",rv=\"CKR_SESSION_HANDLE_"
                "INVALID\"}") == 1);
  CHECK(prom.at("p11mux_call_errors_total{function=\"C_Login\",rv=\"CKR_PIN_INCORRECT\"}") == 2);
  CHECK(prom.at("p11mux_call_errors_total{function=\"C_Sign\",rv=\"CKR_DEVICE_ERROR\"}") == 1);
  std::size_t error_series = 0;
  for (const auto& [key, value] : prom.samples)
    error_series += key.starts_with("p11mux_call_errors_total");
  CHECK(error_series == 3);
  CHECK(prom.at("p11mux_call_duration_seconds_count{function=\"C_Digest\"}") == 3);
  // Every session call that found its session took its lock once: 5+3+3+2+1 (not the bogus handle).
  CHECK(prom.at("p11mux_session_lock_wait_seconds_count") == 14);
  CHECK(prom.at("p11mux_sessions_open") == 1);
  CHECK(valid_json(stats));
  CHECK(stats.find("\"C_GenerateRandom\":{\"calls\":6,\"errors\":1,") != std::string::npos);
  CHECK(stats.find("\"sessions_open\":1") != std::string::npos);
  struct stat st {};
  CHECK(::stat(sock.c_str(), &st) != 0);  // removed at C_Finalize
}

// The session pool's figures for slot 0, as /metrics shows them.
struct PoolFigures {
  double open, idle, in_use, waits, wait_s, discarded_dead;
};

PoolFigures pool_figures(const std::string& sock) {
  auto m = http_get(endpoint_of(sock), "/metrics");
  REQUIRE(m);
  auto prom = parse_prometheus(m->body);
  INFO(m->body);
  for (const auto& e : prom.errors) FAIL_CHECK(e);
  auto at = [&](const char* name) { return prom.at(std::string(name) + "{slot=\"0\"}"); };
  return {at("p11mux_pool_sessions_open"),      at("p11mux_pool_sessions_idle"),
          at("p11mux_pool_sessions_in_use"),    at("p11mux_pool_waits_total"),
          at("p11mux_pool_wait_seconds_total"), at("p11mux_pool_sessions_discarded_total")};
}

TEST_CASE("pool metrics follow the backend sessions: open, idle, in use, waits, dead ones") {
  std::string sock = temp_path("pool.sock");
  Proxy proxy({}, nullptr,
              {{"P11MUX_METRICS_LISTEN", sock.c_str()},
               {"P11MUX_POOL_MAX_SESSIONS", "3"},
               {"P11MUX_POOL_WAIT_MS", "20"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE a = proxy.open(), b = proxy.open(), c = proxy.open();
  REQUIRE(p->C_CloseSession(c) == CKR_OK);
  PoolFigures f = pool_figures(sock);
  CHECK(f.open == 3);
  CHECK(f.in_use == 2);
  CHECK(f.idle == 1);
  CHECK(f.waits == 0);
  CHECK(f.discarded_dead == 0);

  // The idle one is reused; then at the limit an open waits and gives up.
  c = proxy.open();
  CK_SESSION_HANDLE d = CK_INVALID_HANDLE;
  CHECK(p->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &d) ==
        CKR_SESSION_COUNT);
  f = pool_figures(sock);
  CHECK(f.open == 3);
  CHECK(f.in_use == 3);
  CHECK(f.idle == 0);
  CHECK(f.waits == 1);
  CHECK(f.wait_s > 0);

  // The device restarts: the session that says so is closed, not pooled.
  CHECK(libs().mock->drop_sessions() == 3);
  CK_BYTE buf[8];
  CHECK(p->C_GenerateRandom(a, buf, sizeof buf) == CKR_SESSION_HANDLE_INVALID);
  REQUIRE(p->C_CloseSession(a) == CKR_OK);
  f = pool_figures(sock);
  CHECK(f.open == 2);
  CHECK(f.in_use == 2);
  CHECK(f.idle == 0);
  CHECK(f.discarded_dead == 1);
  // A session closed without trouble goes back to the pool.
  REQUIRE(p->C_CloseSession(b) == CKR_OK);
  f = pool_figures(sock);
  CHECK(f.open == 2);
  CHECK(f.in_use == 1);
  CHECK(f.idle == 1);
  CHECK(f.discarded_dead == 1);
}

TEST_CASE(
    "pool metrics: a session closed for another reason than a dead device is not counted dead") {
  std::string sock = temp_path("pool-undead.sock");
  MockConfig mock{};
  // p11mux cannot tell whether the object it created is a session object,
  // so it closes the backend session at the end instead of resetting it.
  std::snprintf(mock.fail_function, sizeof mock.fail_function, "C_GetAttributeValue");
  mock.fail_rv = CKR_FUNCTION_FAILED;
  Proxy proxy(mock, nullptr, {{"P11MUX_METRICS_LISTEN", sock.c_str()}});
  CK_SESSION_HANDLE a = proxy.open();
  CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
  REQUIRE(proxy.create_data_object(a, false, obj) == CKR_OK);
  REQUIRE(proxy.p11->C_CloseSession(a) == CKR_OK);
  PoolFigures f = pool_figures(sock);
  CHECK(f.open == 0);  // closed, not pooled
  CHECK(f.idle == 0);
  CHECK(f.discarded_dead == 0);
}

TEST_CASE(
    "pool metrics add up after multiplexed calls borrow and give back sessions on many threads") {
  std::string sock = temp_path("pool-mux.sock");
  MockConfig mock{};
  mock.call_spin_us = 200;  // calls overlap: threads borrow backend sessions of their own
  // bind = open: the session keeps a backend session of its own.
  Proxy proxy(mock, nullptr,
              {{"P11MUX_METRICS_LISTEN", sock.c_str()},
               {"P11MUX_SESSION_MODE", "multiplex"},
               {"P11MUX_POOL_BIND", "open"}});
  CK_SESSION_HANDLE shared = proxy.open();
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t) {
    threads.emplace_back([&] {
      CK_MECHANISM mech = sha256();
      CK_BYTE data[] = "abc", digest[MOCK_DIGEST_LEN];
      for (int i = 0; i < 50; ++i) {
        CK_ULONG len = sizeof digest;
        CHECK(proxy.p11->C_DigestInit(shared, &mech) == CKR_OK);
        CHECK(proxy.p11->C_Digest(shared, data, 3, digest, &len) == CKR_OK);
      }
    });
  }
  for (auto& t : threads) t.join();  // their cached sessions went back to the pool
  PoolFigures f = pool_figures(sock);
  CHECK(f.open == static_cast<double>(mock_stats().sessions_open));
  CHECK(f.in_use == 1);  // the session's own backend session
  CHECK(f.idle == f.open - 1);
  REQUIRE(proxy.p11->C_CloseSession(shared) == CKR_OK);
  f = pool_figures(sock);
  CHECK(f.in_use == 0);
  CHECK(f.idle == f.open);
}

TEST_CASE("bind = state: metrics tell virtual sessions, bound and idle backend sessions, waits") {
  std::string sock = temp_path("pool-state.sock");
  MockConfig mock{};
  mock.max_sessions = 2;
  Proxy proxy(mock, nullptr,
              {{"P11MUX_METRICS_LISTEN", sock.c_str()},
               {"P11MUX_SESSION_MODE", "multiplex"},
               {"P11MUX_POOL_BIND", "state"},
               {"P11MUX_POOL_WAIT_MS", "5000"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  std::vector<CK_SESSION_HANDLE> sessions;
  for (int i = 0; i < 10; ++i) sessions.push_back(proxy.open());
  // Two digests active hold both backend sessions; a third call waits until
  // one ends.
  CK_MECHANISM mech = sha256();
  REQUIRE(p->C_DigestInit(sessions[0], &mech) == CKR_OK);
  REQUIRE(p->C_DigestInit(sessions[1], &mech) == CKR_OK);
  auto at = [&](const char* name) {
    auto m = http_get(endpoint_of(sock), "/metrics");
    REQUIRE(m);
    auto prom = parse_prometheus(m->body);
    for (const auto& e : prom.errors) FAIL_CHECK(e);
    return prom.at(std::string(name) + "{slot=\"0\"}");
  };
  CHECK(at("p11mux_pool_virtual_sessions") == 10);
  CHECK(at("p11mux_pool_sessions_in_use") == 2);
  CHECK(at("p11mux_pool_virtual_per_backend") == 5);
  std::thread waiter([&] {
    CK_BYTE random[8];
    CHECK(p->C_GenerateRandom(sessions[2], random, sizeof random) == CKR_OK);
  });
  // It counts itself as waiting before it sleeps.
  CHECK(eventually([&] { return at("p11mux_pool_waits_total") == 1; }));
  CK_BYTE data[] = "abc", digest[MOCK_DIGEST_LEN];
  CK_ULONG len = sizeof digest;
  REQUIRE(p->C_Digest(sessions[0], data, 3, digest, &len) == CKR_OK);
  waiter.join();
  CHECK(at("p11mux_pool_wait_duration_seconds_count") == 1);
  CHECK(at("p11mux_pool_waits_total") == 1);
  CHECK(at("p11mux_pool_sessions_in_use") == 1);  // the digest still active
  CHECK(at("p11mux_pool_sessions_idle") == 1);
  for (CK_SESSION_HANDLE h : sessions) REQUIRE(p->C_CloseSession(h) == CKR_OK);
  CHECK(at("p11mux_pool_virtual_sessions") == 0);
}

TEST_CASE("the endpoint answers over loopback TCP with valid Prometheus text and JSON") {
  std::string log = temp_path("tcp.log");
  ::unlink(log.c_str());
  Endpoint where;
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_METRICS_LISTEN", "127.0.0.1:0"},
                 {"P11MUX_LOG_LEVEL", "info"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CHECK(has_thread("p11mux-stats"));
    std::string address = logged_endpoint(log);
    REQUIRE_MESSAGE(!address.empty(), slurp(log));
    where = endpoint_of(address);
    CHECK(where.host == "127.0.0.1");
    CK_SESSION_HANDLE h = proxy.open();
    CK_BYTE buf[8];
    REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
    auto m = http_get(where, "/metrics");
    REQUIRE(m);
    CHECK(m->status == 200);
    CHECK(m->headers.find("content-type: text/plain; version=0.0.4") != std::string::npos);
    auto prom = parse_prometheus(m->body);
    for (const auto& e : prom.errors) FAIL_CHECK(e);
    CHECK(prom.at("p11mux_calls_total{function=\"C_GenerateRandom\"}") == 1);
    CHECK(prom.types["p11mux_call_duration_seconds"] == "histogram");
    auto s = http_get(where, "/stats");
    REQUIRE(s);
    CHECK(s->status == 200);
    CHECK(valid_json(s->body));
    CHECK(http_get(where, "/secrets")->status == 404);
  }
  // Stopped cleanly at C_Finalize: nothing listens, no thread left.
  CHECK(connect_to(where) == -1);
  CHECK_FALSE(has_thread("p11mux-stats"));
  ::unlink(log.c_str());
}

// Name -> SigBlk mask of every thread of this process whose name starts with prefix.
std::multimap<std::string, unsigned long long> blocked_signals_of_threads(
    const std::string& prefix) {
  std::multimap<std::string, unsigned long long> out;
  DIR* dir = ::opendir("/proc/self/task");
  REQUIRE(dir != nullptr);
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] == '.') continue;
    const std::string task = std::string("/proc/self/task/") + e->d_name;
    std::string comm = slurp(task + "/comm");
    if (!comm.empty() && comm.back() == '\n') comm.pop_back();
    if (!comm.starts_with(prefix)) continue;
    std::string status = slurp(task + "/status");
    std::smatch m;
    static const std::regex sigblk("SigBlk:\\s*([0-9a-f]+)");
    if (std::regex_search(status, m, sigblk))
      out.emplace(comm, std::stoull(m[1].str(), nullptr, 16));
  }
  ::closedir(dir);
  return out;
}

TEST_CASE("p11mux's threads are named and block every signal: pool maintenance, stats, async log") {
  std::string sock = temp_path("threads.sock");
  ::unlink(sock.c_str());
  Proxy proxy({}, nullptr,
              {{"P11MUX_POOL_IDLE_TIMEOUT_S", "60"},
               {"P11MUX_METRICS_LISTEN", sock.c_str()},
               {"P11MUX_LOG_ASYNC", "true"},
               {"P11MUX_LOG_LEVEL", "info"},
               {"P11MUX_LOG_FILE", "/dev/null"}});
  // The log thread names itself once it runs: wait for it (a liveness bound).
  auto threads = blocked_signals_of_threads("p11mux-");
  for (int i = 0; i < 250 && threads.count("p11mux-log") == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    threads = blocked_signals_of_threads("p11mux-");
  }
  CHECK(threads.count("p11mux-pool") == 1);
  CHECK(threads.count("p11mux-stats") == 1);
  CHECK(threads.count("p11mux-log") == 1);
  for (const auto& thread : threads) {
    const std::string& name =
        thread.first;  // not a structured binding: CAPTURE is a lambda (clang 14)
    const unsigned long long mask = thread.second;
    CAPTURE(name);
    for (int sig = 1; sig <= 64; ++sig) {
      // SIGKILL and SIGSTOP cannot be blocked; glibc keeps its own two (32, 33).
      if (sig == SIGKILL || sig == SIGSTOP || sig == 32 || sig == 33) continue;
      CAPTURE(sig);
      CHECK((mask >> (sig - 1) & 1) == 1);
    }
  }
  ::unlink(sock.c_str());
}

TEST_CASE("no endpoint and no p11mux thread by default") {
  Proxy proxy;
  CK_SESSION_HANDLE h = proxy.open();
  CK_BYTE buf[8];
  REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  for (const std::string& name : thread_names()) CHECK_FALSE(name.starts_with("p11mux-"));
}

TEST_CASE(
    "CKF_LIBRARY_CANT_CREATE_OS_THREADS: no endpoint, no async log thread, even when configured") {
  std::string sock = temp_path("nothreads.sock");
  std::string log = temp_path("nothreads.log");
  unsigned short port = free_tcp_port();
  std::string tcp = "127.0.0.1:" + std::to_string(port);
  for (const std::string& listen : {sock, tcp}) {
    CAPTURE(listen);
    {
      CK_C_INITIALIZE_ARGS args = no_threads_args();
      Proxy proxy({}, &args,
                  {{"P11MUX_METRICS_LISTEN", listen.c_str()},
                   {"P11MUX_LOG_ASYNC", "true"},
                   {"P11MUX_LOG_LEVEL", "trace"},
                   {"P11MUX_LOG_FILE", log.c_str()}});
      CK_SESSION_HANDLE h = proxy.open();
      CK_BYTE buf[8];
      REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
      for (const std::string& name : thread_names()) CHECK_FALSE(name.starts_with("p11mux-"));
      CHECK(connect_to(endpoint_of(listen)) == -1);
      struct stat st {};
      CHECK(::stat(sock.c_str(), &st) != 0);
    }
    // Tracing still works, synchronously, and says why async is off.
    std::string text = slurp(log);
    CHECK(text.find("C_GenerateRandom(") != std::string::npos);
    CHECK(text.find("[log] async is off: CKF_LIBRARY_CANT_CREATE_OS_THREADS") != std::string::npos);
  }
  ::unlink(log.c_str());
}

std::size_t occurrences(const std::string& text, const std::string& what) {
  std::size_t n = 0;
  for (auto at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

// Issue 12: GnuTLS initializes modules with CKF_LIBRARY_CANT_CREATE_OS_THREADS,
// and the endpoint the user asked for did not start with only an info line.
TEST_CASE(
    "CKF_LIBRARY_CANT_CREATE_OS_THREADS: each feature asked for and left off is a warning, once") {
  std::string sock = temp_path("nothreads-warn.sock");
  std::string log = temp_path("nothreads-warn.log");
  ::unlink(log.c_str());
  {
    CK_C_INITIALIZE_ARGS args = no_threads_args();
    Proxy proxy({}, &args,
                {{"P11MUX_METRICS_LISTEN", sock.c_str()},
                 {"P11MUX_LOG_ASYNC", "true"},
                 {"P11MUX_POOL_IDLE_TIMEOUT_S", "60"},
                 {"P11MUX_LOG_LEVEL", "warn"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CK_SESSION_HANDLE h = proxy.open();
    CK_BYTE buf[8];
    REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  }
  std::string text = slurp(log);
  INFO(text);
  CHECK(
      occurrences(text,
                  "warning: [metrics] listen: no endpoint: the application initialized p11mux with "
                  "CKF_LIBRARY_CANT_CREATE_OS_THREADS") == 1);
  CHECK(occurrences(text, "warning: [log] async is off: CKF_LIBRARY_CANT_CREATE_OS_THREADS") == 1);
  CHECK(occurrences(text, "warning: pool.idle_timeout_s and pool.keepalive_s are off") == 1);
  CHECK(occurrences(text, "CKF_LIBRARY_CANT_CREATE_OS_THREADS") == 3);
  ::unlink(log.c_str());
}

TEST_CASE("a remote listen address or an unknown traced function fails C_Initialize") {
  auto init_with = [](std::initializer_list<std::pair<const char*, const char*>> env) {
    reset_environment();
    for (auto [name, value] : env) ::setenv(name, value, 1);
    CK_RV rv = CKR_OK;
    std::string err = capture_stderr([&] { rv = libs().p11->C_Initialize(nullptr); });
    if (rv == CKR_OK) libs().p11->C_Finalize(nullptr);
    reset_environment();
    return std::pair{rv, err};
  };
  auto [rv, err] = init_with({{"P11MUX_METRICS_LISTEN", "0.0.0.0:9464"}});
  CHECK(rv == CKR_GENERAL_ERROR);
  CHECK(err.find("not a loopback address") != std::string::npos);
  std::tie(rv, err) =
      init_with({{"P11MUX_METRICS_LISTEN", "0.0.0.0:0"}, {"P11MUX_METRICS_ALLOW_REMOTE", "true"}});
  CHECK(rv == CKR_OK);
  std::tie(rv, err) = init_with({{"P11MUX_LOG_FUNCTIONS", "C_Sign,C_Sgn"}});
  CHECK(rv == CKR_GENERAL_ERROR);
  CHECK(err.find("unknown PKCS#11 function 'C_Sgn'") != std::string::npos);
}

// Runs the PIN and key calls of the masking test; every result is checked.
void secret_workout(CK_FUNCTION_LIST* p, const std::string& so_new, const std::string& user_new,
                    const std::string& user_newer, const std::string& wrong, const std::string& key,
                    const std::string& exponent) {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) == CKR_OK);
  std::string so = MOCK_SO_PIN;
  CHECK(p->C_Login(h, CKU_SO, utf8(so), so.size()) == CKR_OK);
  CHECK(p->C_SetPIN(h, utf8(so), so.size(), utf8(so_new), so_new.size()) == CKR_OK);
  CHECK(p->C_InitPIN(h, utf8(user_new), user_new.size()) == CKR_OK);
  CHECK(p->C_Logout(h) == CKR_OK);
  CHECK(p->C_Login(h, CKU_USER, utf8(wrong), wrong.size()) == CKR_PIN_INCORRECT);
  CHECK(p->C_Login(h, CKU_USER, utf8(user_new), user_new.size()) == CKR_OK);
  CHECK(p->C_SetPIN(h, utf8(user_new), user_new.size(), utf8(user_newer), user_newer.size()) ==
        CKR_OK);
  CK_OBJECT_CLASS secret_class = CKO_SECRET_KEY;
  CK_KEY_TYPE generic = CKK_GENERIC_SECRET;
  CK_BBOOL no = CK_FALSE;
  std::string label = "masking-test";
  CK_ATTRIBUTE secret[] = {{CKA_CLASS, &secret_class, sizeof secret_class},
                           {CKA_KEY_TYPE, &generic, sizeof generic},
                           {CKA_TOKEN, &no, sizeof no},
                           {CKA_LABEL, label.data(), label.size()},
                           {CKA_VALUE, const_cast<char*>(key.data()), key.size()}};
  CK_OBJECT_HANDLE key_handle = CK_INVALID_HANDLE;
  CHECK(p->C_CreateObject(h, secret, 5, &key_handle) == CKR_OK);
  CK_OBJECT_CLASS private_class = CKO_PRIVATE_KEY;
  CK_ATTRIBUTE rsa[] = {
      {CKA_CLASS, &private_class, sizeof private_class},
      {CKA_PRIVATE_EXPONENT, const_cast<char*>(exponent.data()), exponent.size()}};
  CK_OBJECT_HANDLE rsa_handle = CK_INVALID_HANDLE;
  CHECK(p->C_CreateObject(h, rsa, 2, &rsa_handle) == CKR_OK);
  // Reading the key back: the value in the output template must be masked too.
  std::string back(key.size(), '\0');
  CK_ATTRIBUTE get[] = {{CKA_VALUE, back.data(), back.size()}, {CKA_LABEL, nullptr, 0}};
  CHECK(p->C_GetAttributeValue(h, key_handle, get, 2) == CKR_OK);
  CHECK(back == key);
  CK_ATTRIBUTE find[] = {{CKA_VALUE, const_cast<char*>(key.data()), key.size()}};
  CHECK(p->C_FindObjectsInit(h, find, 1) == CKR_OK);
  CHECK(p->C_FindObjectsFinal(h) == CKR_OK);
  CHECK(p->C_Logout(h) == CKR_OK);
  CHECK(p->C_CloseSession(h) == CKR_OK);
  CK_UTF8CHAR token_label[32];
  std::fill(std::begin(token_label), std::end(token_label), ' ');
  CHECK(p->C_InitToken(0, utf8(wrong), wrong.size(), token_label) == CKR_PIN_INCORRECT);
  CHECK(p->C_InitToken(0, utf8(so_new), so_new.size(), token_label) == CKR_OK);
}

TEST_CASE("no PIN and no secret key value in the log, at any level, sync or async") {
  // Unique 8-character PINs (the mock takes 4 to 8) and key bytes, so a hit is ours.
  const std::string so_new = "Qz8#So7x", user_new = "Kp4!Us9w", user_newer = "Mv2%Nw5r",
                    wrong = "Wr0ng!Pn";
  const std::string key = "K3yV4lu3-S3cr3t!";
  const std::string exponent = "\x8e\x31\x5f\xa2\x77\x0c\xd4\x19";
  const std::vector<std::string> secrets = {so_new, user_new, user_newer, wrong, key, exponent};
  std::string log = temp_path("secrets.log");
  for (const char* level : {"trace", "debug", "info", "warn", "error", "off"}) {
    for (const char* async : {"false", "true"}) {
      CAPTURE(level);
      CAPTURE(async);
      ::unlink(log.c_str());
      {
        Proxy proxy({}, nullptr,
                    {{"P11MUX_LOG_LEVEL", level},
                     {"P11MUX_LOG_FILE", log.c_str()},
                     {"P11MUX_LOG_ASYNC", async},
                     {"P11MUX_METRICS_SUMMARY", "true"}});
        secret_workout(proxy.p11, so_new, user_new, user_newer, wrong, key, exponent);
      }
      std::string text = slurp(log);
      for (const std::string& s : secrets) {
        CHECK(text.find(s) == std::string::npos);
        std::string h = hex(s);
        CHECK(text.find(h) == std::string::npos);
        std::string upper = h;
        for (char& c : upper) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        CHECK(text.find(upper) == std::string::npos);
      }
      if (std::string_view(level) == "trace") {
        // The calls are there, masked: this test sees the records it checks.
        for (const char* f : {"C_Login(", "C_SetPIN(", "C_InitPIN(", "C_InitToken(",
                              "C_CreateObject(", "C_GetAttributeValue("}) {
          CHECK(text.find(f) != std::string::npos);
        }
        CHECK(text.find("CKA_VALUE=*** (16 bytes)") != std::string::npos);
        CHECK(text.find("CKA_PRIVATE_EXPONENT=*** (8 bytes)") != std::string::npos);
        CHECK(text.find("CKA_LABEL=\"masking-test\"") != std::string::npos);
      }
      if (std::string_view(level) == "info")
        CHECK(text.find("metrics summary") != std::string::npos);
    }
  }
  ::unlink(log.c_str());
}

TEST_CASE("trace records: pid and thread, virtual and backend handles, names, lengths") {
  std::string log = temp_path("records.log");
  ::unlink(log.c_str());
  {
    Proxy proxy({}, nullptr, {{"P11MUX_LOG_LEVEL", "trace"}, {"P11MUX_LOG_FILE", log.c_str()}});
    CK_FUNCTION_LIST* p = proxy.p11;
    CK_SESSION_HANDLE h = proxy.open();
    CK_MECHANISM mech = sha256();
    CK_BYTE data[] = "abc";
    CK_BYTE digest[64];
    CK_ULONG len = 0;
    REQUIRE(p->C_DigestInit(h, &mech) == CKR_OK);
    REQUIRE(p->C_Digest(h, data, 3, nullptr, &len) == CKR_OK);  // length query
    len = sizeof digest;
    REQUIRE(p->C_Digest(h, data, 3, digest, &len) == CKR_OK);
    CK_ATTRIBUTE by_label[] = {{CKA_LABEL, const_cast<char*>("k1"), 2}};
    REQUIRE(p->C_FindObjectsInit(h, by_label, 1) == CKR_OK);
    CK_OBJECT_HANDLE found[4];
    CK_ULONG n = 0;
    REQUIRE(p->C_FindObjects(h, found, 4, &n) == CKR_OK);
    REQUIRE(p->C_FindObjectsFinal(h) == CKR_OK);
  }
  std::string text = slurp(log);
  INFO(text);
  std::string pid = std::to_string(::getpid());
  auto has = [&](const std::string& pattern) {
    return std::regex_search(text, std::regex(pattern));
  };
  CHECK(has("\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d\\.\\d{6} p11mux\\[" + pid +
            ":\\d+\\] trace: C_OpenSession\\(0, 6, NULL, NULL, ->0x[0-9a-f]+\\) = CKR_OK "
            "\\[\\d+\\.\\d us\\]"));
  // The backend session: the mock's handles start at 0x5000.
  CHECK(has("C_DigestInit\\(0x[0-9a-f]+->0x5[0-9a-f]{3}, CKM_SHA256\\) = CKR_OK"));
  CHECK(has("C_Digest\\(0x[0-9a-f]+->0x5[0-9a-f]{3}, \\[3 bytes\\], NULL->32\\) = CKR_OK"));
  CHECK(has("C_Digest\\(0x[0-9a-f]+->0x5[0-9a-f]{3}, \\[3 bytes\\], \\[64\\]->32\\) = CKR_OK"));
  CHECK(has("C_FindObjectsInit\\(0x[0-9a-f]+->0x5[0-9a-f]{3}, \\{CKA_LABEL=\"k1\"\\}\\) = CKR_OK"));
  CHECK(has("C_FindObjects\\(0x[0-9a-f]+->0x5[0-9a-f]{3}, \\[max 4\\], ->0\\) = CKR_OK"));
  ::unlink(log.c_str());
}

TEST_CASE("trace filters: a function list, exclusions, and a minimum duration") {
  std::string log = temp_path("filters.log");
  auto run = [&](std::initializer_list<std::pair<const char*, const char*>> extra,
                 MockConfig mock = {}) {
    std::vector<std::pair<const char*, const char*>> env = {{"P11MUX_LOG_LEVEL", "trace"},
                                                            {"P11MUX_LOG_FILE", log.c_str()}};
    env.insert(env.end(), extra.begin(), extra.end());
    ::unlink(log.c_str());
    reset_environment();
    for (auto [name, value] : env) ::setenv(name, value, 1);
    CHECK(libs().mock->reset() == 0);
    REQUIRE(libs().mock->configure(&mock) == 0);
    REQUIRE(libs().p11->C_Initialize(nullptr) == CKR_OK);
    CK_FUNCTION_LIST* p = libs().p11;
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK);
    CK_BYTE buf[8];
    REQUIRE(p->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
    CK_MECHANISM mech = sha256();
    CK_BYTE data[] = "abc";
    CK_BYTE digest[MOCK_DIGEST_LEN];
    CK_ULONG len = sizeof digest;
    REQUIRE(p->C_DigestInit(h, &mech) == CKR_OK);
    REQUIRE(p->C_Digest(h, data, 3, digest, &len) == CKR_OK);
    REQUIRE(p->C_CloseSession(h) == CKR_OK);
    REQUIRE(p->C_Finalize(nullptr) == CKR_OK);
    reset_environment();
    return slurp(log);
  };
  std::string all = run({});
  for (const char* f :
       {"C_OpenSession(", "C_GenerateRandom(", "C_DigestInit(", "C_Digest(", "C_CloseSession("}) {
    CHECK(all.find(f) != std::string::npos);
  }
  std::string only = run({{"P11MUX_LOG_FUNCTIONS", "C_DigestInit, C_Digest"}});
  CHECK(only.find("C_DigestInit(") != std::string::npos);
  CHECK(only.find("C_Digest(") != std::string::npos);
  CHECK(only.find("C_GenerateRandom(") == std::string::npos);
  CHECK(only.find("C_OpenSession(") == std::string::npos);
  std::string but = run({{"P11MUX_LOG_FUNCTIONS", "-C_GenerateRandom,-C_OpenSession"}});
  CHECK(but.find("C_GenerateRandom(") == std::string::npos);
  CHECK(but.find("C_OpenSession(") == std::string::npos);
  CHECK(but.find("C_Digest(") != std::string::npos);
  CHECK(but.find("C_CloseSession(") != std::string::npos);
  // C_GenerateRandom and C_Digest sleep 30 ms in the mock; the rest are fast.
  MockConfig slow{};
  slow.slow_us = 30000;
  std::string slow_only = run({{"P11MUX_LOG_MIN_DURATION_US", "20000"}}, slow);
  CHECK(slow_only.find("C_GenerateRandom(") != std::string::npos);
  CHECK(slow_only.find("C_Digest(") != std::string::npos);
  CHECK(slow_only.find("C_DigestInit(") == std::string::npos);
  CHECK(slow_only.find("C_OpenSession(") == std::string::npos);
  ::unlink(log.c_str());
}

TEST_CASE("C_Finalize writes the summary table to the log with [metrics] summary = true") {
  std::string log = temp_path("summary.log");
  ::unlink(log.c_str());
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_METRICS_SUMMARY", "true"},
                 {"P11MUX_LOG_LEVEL", "info"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CK_SESSION_HANDLE h = proxy.open();
    CK_BYTE buf[8];
    for (int i = 0; i < 7; ++i) REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  }
  std::string text = slurp(log);
  INFO(text);
  CHECK(text.find("info: metrics summary:") != std::string::npos);
  CHECK(std::regex_search(text, std::regex("info:   C_GenerateRandom +7 +0 ")));
  CHECK(text.find("1 sessions open, 8 calls, 0 errors") != std::string::npos);
  ::unlink(log.c_str());
}

// Issue 12: every short-lived p11tool run printed an 11-line table labelled
// "warning:" because metrics were on for the endpoint.
TEST_CASE(
    "no summary at C_Finalize unless [metrics] summary asks for it, at the default level too") {
  std::string log = temp_path("no-summary.log");
  std::string sock = temp_path("no-summary.sock");
  for (const char* level : {"warn", "info"}) {
    CAPTURE(level);
    for (const char* summary : {"false", "true"}) {
      CAPTURE(summary);
      ::unlink(log.c_str());
      ::unlink(sock.c_str());
      {
        Proxy proxy({}, nullptr,
                    {{"P11MUX_METRICS_LISTEN", sock.c_str()},
                     {"P11MUX_METRICS_ENABLED", "true"},
                     {"P11MUX_METRICS_SUMMARY", summary},
                     {"P11MUX_LOG_LEVEL", level},
                     {"P11MUX_LOG_FILE", log.c_str()}});
        CK_SESSION_HANDLE h = proxy.open();
        CK_BYTE buf[8];
        REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
      }
      std::string text = slurp(log);
      INFO(text);
      CHECK((text.find("metrics summary:") != std::string::npos) ==
            (std::string_view(summary) == "true"));
      CHECK((text.find("C_GenerateRandom") != std::string::npos) ==
            (std::string_view(summary) == "true"));
    }
  }
  ::unlink(log.c_str());
  ::unlink(sock.c_str());
}

std::atomic<int> g_application_usr1{0};
extern "C" void application_usr1(int) { ++g_application_usr1; }

TEST_CASE(
    "SIGUSR1 writes the summary from the stats thread; the application's handler still runs") {
  std::string log = temp_path("usr1.log");
  ::unlink(log.c_str());
  struct sigaction app {
  }, saved{};
  app.sa_handler = application_usr1;
  sigemptyset(&app.sa_mask);
  REQUIRE(::sigaction(SIGUSR1, &app, &saved) == 0);
  g_application_usr1 = 0;
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_METRICS_SIGNAL", "true"},
                 {"P11MUX_LOG_LEVEL", "info"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CK_SESSION_HANDLE h = proxy.open();
    CK_BYTE buf[8];
    REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
    CHECK(has_thread("p11mux-stats"));
    CHECK(slurp(log).find("metrics summary") == std::string::npos);
    REQUIRE(::raise(SIGUSR1) == 0);
    CHECK(eventually_contains(log, "metrics summary"));
    CHECK(g_application_usr1 == 1);
  }
  // C_Finalize gave SIGUSR1 back to the application.
  struct sigaction now {};
  REQUIRE(::sigaction(SIGUSR1, nullptr, &now) == 0);
  CHECK(reinterpret_cast<void*>(now.sa_handler) == reinterpret_cast<void*>(application_usr1));
  REQUIRE(::sigaction(SIGUSR1, &saved, nullptr) == 0);
  ::unlink(log.c_str());
}

TEST_CASE("SIGUSR1 without threads: the next call writes the summary") {
  std::string log = temp_path("usr1-nothreads.log");
  ::unlink(log.c_str());
  struct sigaction ignore {
  }, saved{};
  ignore.sa_handler = SIG_IGN;
  REQUIRE(::sigaction(SIGUSR1, &ignore, &saved) == 0);
  {
    CK_C_INITIALIZE_ARGS args = no_threads_args();
    Proxy proxy({}, &args,
                {{"P11MUX_METRICS_SIGNAL", "true"},
                 {"P11MUX_LOG_LEVEL", "info"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CK_SESSION_HANDLE h = proxy.open();
    CHECK_FALSE(has_thread("p11mux-stats"));
    REQUIRE(::raise(SIGUSR1) == 0);
    std::this_thread::sleep_for(50ms);
    CHECK(slurp(log).find("metrics summary") == std::string::npos);  // nobody to write it yet
    CK_BYTE buf[8];
    REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
    CHECK(slurp(log).find("metrics summary") != std::string::npos);
  }
  REQUIRE(::sigaction(SIGUSR1, &saved, nullptr) == 0);
  ::unlink(log.c_str());
}

TEST_CASE("fork: the child neither serves nor waits for the parent's stats thread") {
  std::string sock = temp_path("fork.sock");
  Proxy proxy({}, nullptr,
              {{"P11MUX_METRICS_LISTEN", sock.c_str()},
               {"P11MUX_LOG_ASYNC", "true"},
               {"P11MUX_LOG_LEVEL", "trace"},
               {"P11MUX_LOG_FILE", "/dev/null"}});
  CK_SESSION_HANDLE h = proxy.open();
  CK_BYTE buf[8];
  REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  REQUIRE(http_get(endpoint_of(sock), "/metrics"));
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Exit codes say which check failed (doctest is not fork-safe). No new
    // threads in the child: ThreadSanitizer does not allow them after fork.
    // The child starts from the parent's configuration (endpoint and async
    // log included), so it says it may create none.
    ::alarm(20);  // a hang must not outlive the test
    if (proxy.p11->C_GenerateRandom(h, buf, sizeof buf) != CKR_CRYPTOKI_NOT_INITIALIZED) _exit(2);
    CK_C_INITIALIZE_ARGS no_threads{};
    no_threads.flags = CKF_LIBRARY_CANT_CREATE_OS_THREADS;
    if (proxy.p11->C_Initialize(&no_threads) != CKR_OK) _exit(3);
    CK_SESSION_HANDLE c = CK_INVALID_HANDLE;
    if (proxy.p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &c) != CKR_OK) _exit(4);
    if (proxy.p11->C_Finalize(nullptr) != CKR_OK) _exit(5);
    // The parent's endpoint still answers: the child did not remove it.
    int fd = connect_to(endpoint_of(sock));
    if (fd < 0) _exit(6);
    ::close(fd);
    _exit(0);
  }
  int status = 0;
  auto deadline = std::chrono::steady_clock::now() + 30s;
  pid_t done = 0;
  while ((done = ::waitpid(pid, &status, WNOHANG)) == 0 &&
         std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(10ms);
  }
  if (done == 0) ::kill(pid, SIGKILL);
  REQUIRE(done == pid);
  REQUIRE(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
  auto m = http_get(endpoint_of(sock), "/metrics");
  REQUIRE(m);
  CHECK(m->status == 200);
  CHECK(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
}

TEST_CASE("a rotating log file keeps the configured number of files") {
  std::string base = temp_path("rotate");
  auto file = [&](const std::string& suffix) { return base + suffix + ".log"; };
  for (const char* s : {"", ".1", ".2", ".3"}) ::unlink(file(s).c_str());
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_LOG_LEVEL", "trace"},
                 {"P11MUX_LOG_FILE", file("").c_str()},
                 {"P11MUX_LOG_ROTATE_SIZE_KB", "1"},
                 {"P11MUX_LOG_ROTATE_FILES", "2"}});
    CK_SESSION_HANDLE h = proxy.open();
    CK_BYTE buf[8];
    for (int i = 0; i < 200; ++i)
      REQUIRE(proxy.p11->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  }
  struct stat st {};
  CHECK(::stat(file("").c_str(), &st) == 0);
  CHECK(st.st_size <= 1024);
  CHECK(::stat(file(".1").c_str(), &st) == 0);
  CHECK(::stat(file(".2").c_str(), &st) == 0);
  CHECK(::stat(file(".3").c_str(), &st) != 0);
  for (const char* s : {"", ".1", ".2", ".3"}) ::unlink(file(s).c_str());
}

TEST_CASE("async logging: every record written by C_Finalize, from the callers' threads") {
  std::string log = temp_path("async.log");
  ::unlink(log.c_str());
  std::set<std::string> callers;
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_LOG_ASYNC", "true"},
                 {"P11MUX_LOG_LEVEL", "trace"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    // spdlog's writer names itself once it runs.
    bool named = false;
    for (int i = 0; i < 500 && !(named = has_thread("p11mux-log")); ++i)
      std::this_thread::sleep_for(10ms);
    CHECK(named);
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
      threads.emplace_back([&] {
        CK_SESSION_HANDLE h = proxy.open();
        CK_BYTE buf[8];
        for (int i = 0; i < 250; ++i) proxy.p11->C_GenerateRandom(h, buf, sizeof buf);
      });
    }
    for (auto& t : threads) t.join();
  }
  CHECK_FALSE(has_thread("p11mux-log"));
  std::string text = slurp(log);
  std::size_t records = 0;
  std::regex tid("p11mux\\[\\d+:(\\d+)\\] trace: C_GenerateRandom\\(");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), tid); it != std::sregex_iterator();
       ++it) {
    ++records;
    callers.insert((*it)[1].str());
  }
  CHECK(records == 1000);
  CHECK(callers.size() == 4);
  ::unlink(log.c_str());
}

// A /stats "slots" entry of the mock's slot 1 through `backend`, up to its open count.
std::string slot_entry(const std::string& backend, double open) {
  return "{\"backend\":\"" + backend +
         "\",\"slot\":1,\"open\":" + std::to_string(static_cast<long>(open)) + ",";
}

// docs/groups.md, "Per-member figures": two [backend.NAME] modules whose
// slot IDs coincide (the mock's slot 1, directly and through the faulty
// module) keep their pools' figures apart, by backend and slot, in /metrics,
// /stats and the summary.
TEST_CASE("pool metrics of two backends with one slot ID: apart, labelled by backend") {
  std::string sock = temp_path("backends.sock");
  const FaultyControl* faulty = faulty_control();
  REQUIRE(faulty->reset() == 0);
  GroupProxy proxy(std::string("[backend.a]\nmodule = ") + P11MUX_TEST_MOCK_PATH +
                       "\n[backend.b]\nmodule = " + P11MUX_TEST_FAULTY_PATH +
                       "\n[group.signing]\nmembers = a/serial:1, b/serial:1\n",
                   mock_tokens(3),
                   {{"P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH},
                    {"P11MUX_METRICS_LISTEN", sock.c_str()},
                    {"P11MUX_METRICS_SUMMARY", "true"},
                    {"P11MUX_LOG_LEVEL", "info"}});
  REQUIRE(proxy.initialize() == CKR_OK);
  // Least-busy: the three sessions on both members, two on one of them.
  for (int i = 0; i < 3; ++i) proxy.open();
  FaultySlotStats through_b{};
  faulty->slot_stats(1, &through_b);
  CK_TOKEN_INFO token{};
  REQUIRE(mock_functions()->C_GetTokenInfo(1, &token) == CKR_OK);
  const double on_b = static_cast<double>(through_b.sessions_open);
  const double on_a = static_cast<double>(token.ulSessionCount) - on_b;  // the mock counts both
  CHECK(on_a + on_b == 3);
  CHECK(on_a >= 1);
  CHECK(on_b >= 1);

  auto m = http_get(endpoint_of(sock), "/metrics");
  REQUIRE(m);
  auto prom = parse_prometheus(m->body);
  INFO(m->body);
  for (const auto& e : prom.errors) FAIL_CHECK(e);
  CHECK(prom.at("p11mux_pool_sessions_open{backend=\"a\",slot=\"1\"}") == on_a);
  CHECK(prom.at("p11mux_pool_sessions_open{backend=\"b\",slot=\"1\"}") == on_b);
  CHECK(prom.at("p11mux_pool_sessions_in_use{backend=\"a\",slot=\"1\"}") == on_a);
  CHECK(prom.at("p11mux_pool_sessions_in_use{backend=\"b\",slot=\"1\"}") == on_b);
  CHECK(prom.at("p11mux_pool_wait_duration_seconds_count{backend=\"b\",slot=\"1\"}") == 0);
  CHECK_FALSE(prom.has("p11mux_pool_sessions_open{slot=\"1\"}"));
  auto s = http_get(endpoint_of(sock), "/stats");
  REQUIRE(s);
  CHECK(valid_json(s->body));
  CHECK_MESSAGE(s->body.find(slot_entry("a", on_a)) != std::string::npos, s->body);
  CHECK_MESSAGE(s->body.find(slot_entry("b", on_b)) != std::string::npos, s->body);

  const std::string log = capture_stderr([&] { CHECK(proxy.p11->C_Finalize(nullptr) == CKR_OK); });
  proxy.finalized();
  CHECK_MESSAGE(log.find("backend a slot 1 pool: ") != std::string::npos, log);
  CHECK_MESSAGE(log.find("backend b slot 1 pool: ") != std::string::npos, log);
  faulty->reset();
}

}  // namespace
}  // namespace p11mux::test
