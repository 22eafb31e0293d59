// Unit tests for proxy/stats_server: the listen syntax and loopback rule,
// and the HTTP server itself over TCP and a unix socket.
#include "observe/stats_server.hpp"
#include "observe_test_support.hpp"

#include <p11mux/ckr_error.hpp>

#include <doctest/doctest.h>
#include <sys/eventfd.h>
#include <sys/stat.h>

#include <atomic>
#include <chrono>
#include <fstream>
#include <thread>

namespace p11mux {
namespace {

using namespace std::chrono_literals;
using test::endpoint_of;
using test::http_get;
using test::http_request;

StatsServer::Handlers fixed_handlers(std::atomic<int>* summaries = nullptr) {
  return {[] { return std::string("# TYPE x counter\nx 1\n"); },
          [] { return std::string("{\"a\":1}"); },
          [summaries] {
            if (summaries != nullptr) ++*summaries;
          }};
}

std::string listen_error(std::string_view text, bool allow_remote = false) {
  try {
    parse_listen(text, allow_remote);
  } catch (const CkrError& e) {
    return e.what();
  }
  return "(accepted)";
}

std::string temp_socket_path(const char* name) {
  return "/tmp/p11mux-" + std::to_string(::getpid()) + "-" + name + ".sock";
}

TEST_CASE("listen: loopback addresses, ports and socket paths") {
  ListenAddress a = parse_listen("127.0.0.1:9464", false);
  CHECK(a.kind == ListenAddress::Kind::tcp);
  CHECK(a.host == "127.0.0.1");
  CHECK(a.port == 9464);
  CHECK(parse_listen("localhost:0", false).host == "127.0.0.1");
  CHECK(parse_listen("[::1]:9464", false).host == "::1");
  CHECK(parse_listen("127.1.2.3:1", false).host == "127.1.2.3");
  ListenAddress u = parse_listen("/run/p11mux.sock", false);
  CHECK(u.kind == ListenAddress::Kind::unix_socket);
  CHECK(u.path == "/run/p11mux.sock");
  CHECK(parse_listen("unix:rel.sock", false).path == "rel.sock");
}

TEST_CASE("listen: a remote address only with allow_remote; bad values named") {
  CHECK(listen_error("0.0.0.0:9464").find("not a loopback address") != std::string::npos);
  CHECK(listen_error("192.168.1.10:9464").find("allow_remote") != std::string::npos);
  CHECK(listen_error("0.0.0.0:9464", true) == "(accepted)");
  CHECK(listen_error("9464").find("expected HOST:PORT") != std::string::npos);
  CHECK(listen_error("127.0.0.1:99999").find("port") != std::string::npos);
  CHECK(listen_error("127.0.0.1:").find("port") != std::string::npos);
  CHECK(listen_error("example.com:80").find("IP address") != std::string::npos);
  CHECK(listen_error("unix:").find("empty") != std::string::npos);
  CHECK(listen_error("127.0.0.1:x").find("[metrics] listen") != std::string::npos);
}

TEST_CASE("TCP on loopback: /metrics, /stats, HEAD, 404, 405; stop closes the port") {
  auto server =
      std::make_unique<StatsServer>(parse_listen("127.0.0.1:0", false), -1, fixed_handlers());
  auto where = endpoint_of(server->address());
  REQUIRE(where.port != 0);
  auto metrics = http_get(where, "/metrics");
  REQUIRE(metrics);
  CHECK(metrics->status == 200);
  CHECK(metrics->headers.find("content-type: text/plain; version=0.0.4") != std::string::npos);
  CHECK(metrics->headers.find("content-length: 21") != std::string::npos);
  CHECK(metrics->body == "# TYPE x counter\nx 1\n");
  auto stats = http_get(where, "/stats?pretty=0");
  REQUIRE(stats);
  CHECK(stats->status == 200);
  CHECK(stats->headers.find("application/json") != std::string::npos);
  CHECK(stats->body == "{\"a\":1}");
  auto head = http_request(where, "HEAD /metrics HTTP/1.0\r\n\r\n");
  REQUIRE(head);
  CHECK(head->status == 200);
  CHECK(head->body.empty());
  CHECK(http_get(where, "/nope")->status == 404);
  CHECK(http_request(where, "POST /metrics HTTP/1.1\r\n\r\n")->status == 405);
  CHECK(http_request(where, "garbage\r\n\r\n")->status == 400);
  CHECK(http_request(where, std::string(8192, 'x'))->status == 431);

  server->stop();
  CHECK(test::connect_to(where) == -1);
  server.reset();  // a second stop is harmless
}

TEST_CASE("a silent client does not hold up the others") {
  StatsServer server(parse_listen("127.0.0.1:0", false), -1, fixed_handlers());
  auto where = endpoint_of(server.address());
  int idle = test::connect_to(where);
  REQUIRE(idle >= 0);
  auto start = std::chrono::steady_clock::now();
  auto reply = http_get(where, "/metrics");
  CHECK(reply);
  CHECK(std::chrono::steady_clock::now() - start < 2s);
  ::close(idle);
}

TEST_CASE("unix socket: serves, replaces a stale socket, removes it at stop") {
  std::string path = temp_socket_path("unit");
  ::unlink(path.c_str());
  {
    // A stale socket file left by a process that died.
    StatsServer first(parse_listen(path, false), -1, fixed_handlers());
  }
  {
    int fd = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, path.c_str(), sizeof sa.sun_path - 1);
    REQUIRE(::bind(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) == 0);
    ::close(fd);  // the file stays, nobody listens
  }
  StatsServer server(parse_listen(path, false), -1, fixed_handlers());
  CHECK(server.address() == path);
  auto reply = http_get(endpoint_of(path), "/stats");
  REQUIRE(reply);
  CHECK(reply->status == 200);
  server.stop();
  struct stat st {};
  CHECK(::stat(path.c_str(), &st) != 0);
}

TEST_CASE("a live endpoint is not taken over, and a regular file is left alone") {
  std::string path = temp_socket_path("busy");
  ::unlink(path.c_str());
  StatsServer owner(parse_listen(path, false), -1, fixed_handlers());
  CHECK_THROWS_AS(StatsServer(parse_listen(path, false), -1, fixed_handlers()), std::runtime_error);
  CHECK(http_get(endpoint_of(path), "/metrics"));
  owner.stop();

  std::string file = temp_socket_path("file");
  { std::ofstream(file) << "keep me"; }
  CHECK_THROWS_AS(StatsServer(parse_listen(file, false), -1, fixed_handlers()), std::runtime_error);
  struct stat st {};
  CHECK(::stat(file.c_str(), &st) == 0);
  ::unlink(file.c_str());
}

TEST_CASE("the summary eventfd calls the summary handler on the stats thread") {
  int efd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  REQUIRE(efd >= 0);
  std::atomic<int> summaries{0};
  StatsServer server(std::nullopt, efd, fixed_handlers(&summaries));
  CHECK(server.address().empty());
  std::uint64_t one = 1;
  REQUIRE(::write(efd, &one, sizeof one) == sizeof one);
  for (int i = 0; i < 500 && summaries == 0; ++i) std::this_thread::sleep_for(10ms);
  CHECK(summaries == 1);
  server.stop();
  // Our fd stays open: the server watched a copy.
  CHECK(::write(efd, &one, sizeof one) == sizeof one);
  ::close(efd);
}

}  // namespace
}  // namespace p11mux
