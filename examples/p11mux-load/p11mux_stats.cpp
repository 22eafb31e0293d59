#include "p11mux_stats.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "plan.h"

namespace p11mux::load {
namespace {

[[noreturn]] void bad_url(std::string_view url, const std::string& why) {
  throw UsageError("--stats-url: '" + std::string(url) + "': " + why);
}

// Closes the socket on every path out.
struct Fd {
  int fd = -1;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// Waits until fd is ready for `events`, up to the deadline.
bool wait_for(int fd, short events, std::chrono::steady_clock::time_point deadline) {
  auto left =
      std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
  if (left.count() <= 0) return false;
  pollfd p{fd, events, 0};
  return ::poll(&p, 1, static_cast<int>(left.count())) == 1;
}

std::string rate(double per_second) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.0f", per_second);
  return buf;
}

}  // namespace

StatsUrl parse_stats_url(std::string_view url) {
  StatsUrl out;
  if (url.starts_with("unix:")) {
    out.socket_path = url.substr(5);
    if (out.socket_path.empty()) bad_url(url, "empty socket path");
    if (out.socket_path.size() >= sizeof(sockaddr_un{}.sun_path)) bad_url(url, "socket path too long");
    return out;
  }
  if (!url.starts_with("http://")) bad_url(url, "expected http://HOST:PORT or unix:PATH");
  std::string_view rest = url.substr(7);
  std::size_t slash = rest.find('/');
  std::string_view path = slash == std::string_view::npos ? "/" : rest.substr(slash);
  if (path != "/" && path != "/metrics")
    bad_url(url, "p11mux-load reads /metrics; give the endpoint or /metrics");
  std::string_view authority = rest.substr(0, slash);
  std::size_t colon = authority.rfind(':');
  if (colon == std::string_view::npos) bad_url(url, "no port");
  std::string_view host = authority.substr(0, colon);
  std::string_view port = authority.substr(colon + 1);
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || value == 0 || value > 65535) {
    bad_url(url, "the port must be a number from 1 to 65535");
  }
  out.port = static_cast<unsigned short>(value);
  out.host = host == "localhost" ? "127.0.0.1" : std::string(host);
  in_addr probe{};
  if (::inet_pton(AF_INET, out.host.c_str(), &probe) != 1)
    bad_url(url, "the host must be an IPv4 address or localhost");
  return out;
}

std::optional<P11muxFigures> parse_metrics(std::string_view text) {
  P11muxFigures f;
  bool seen = false;
  while (!text.empty()) {
    std::size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
    if (line.starts_with("# TYPE p11mux_calls_total ")) seen = true;
    if (line.empty() || line.front() == '#') continue;
    std::size_t name_end = line.find_first_of("{ ");
    std::size_t value_at = line.rfind(' ');
    if (name_end == std::string_view::npos || value_at == std::string_view::npos) continue;
    std::string_view name = line.substr(0, name_end);
    double value = std::strtod(std::string(line.substr(value_at + 1)).c_str(), nullptr);
    if (name == "p11mux_calls_total")
      f.calls += value;
    else if (name == "p11mux_call_errors_total")
      f.errors += value;
    else if (name == "p11mux_session_lock_wait_seconds_sum")
      f.lock_wait_s += value;
    else if (name == "p11mux_session_lock_wait_seconds_count")
      f.lock_acquisitions += value;
    else if (name == "p11mux_sessions_open")
      f.sessions_open += value;
    else if (name == "p11mux_pool_sessions_in_use")
      f.pool_in_use += value;
    else if (name == "p11mux_pool_sessions_idle")
      f.pool_idle += value;
    else if (name == "p11mux_pool_waits_total")
      f.pool_waits += value;
  }
  if (!seen) return std::nullopt;
  return f;
}

std::optional<std::string> fetch_metrics(const StatsUrl& url, std::chrono::milliseconds timeout,
                                         std::string* error) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  auto fail = [&](const std::string& what) -> std::optional<std::string> {
    if (error != nullptr) *error = what;
    return std::nullopt;
  };
  Fd s;
  int rc = -1;
  if (url.socket_path.empty()) {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(url.port);
    ::inet_pton(AF_INET, url.host.c_str(), &sa.sin_addr);
    s.fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s.fd >= 0) rc = ::connect(s.fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  } else {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, url.socket_path.c_str(), sizeof sa.sun_path - 1);
    s.fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
    if (s.fd >= 0) rc = ::connect(s.fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa);
  }
  if (s.fd < 0) return fail(std::string("socket: ") + std::strerror(errno));
  if (rc != 0 && errno != EINPROGRESS && errno != EAGAIN)
    return fail(std::string("connect: ") + std::strerror(errno));
  if (!wait_for(s.fd, POLLOUT, deadline)) return fail("connect: timed out");
  int so_error = 0;
  socklen_t len = sizeof so_error;
  ::getsockopt(s.fd, SOL_SOCKET, SO_ERROR, &so_error, &len);
  if (so_error != 0) return fail(std::string("connect: ") + std::strerror(so_error));

  const std::string request = "GET /metrics HTTP/1.1\r\nHost: p11mux\r\nConnection: close\r\n\r\n";
  for (std::size_t sent = 0; sent < request.size();) {
    if (!wait_for(s.fd, POLLOUT, deadline)) return fail("send: timed out");
    ssize_t n = ::send(s.fd, request.data() + sent, request.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno != EAGAIN) return fail(std::string("send: ") + std::strerror(errno));
    if (n > 0) sent += static_cast<std::size_t>(n);
  }
  std::string reply;
  char buf[8192];
  for (;;) {
    if (!wait_for(s.fd, POLLIN, deadline)) return fail("read: timed out");
    ssize_t n = ::recv(s.fd, buf, sizeof buf, 0);
    if (n == 0) break;
    if (n < 0 && errno != EAGAIN) return fail(std::string("read: ") + std::strerror(errno));
    if (n > 0) reply.append(buf, static_cast<std::size_t>(n));
    if (reply.size() > (8u << 20)) return fail("reply larger than 8 MiB");
  }
  std::size_t body = reply.find("\r\n\r\n");
  if (!reply.starts_with("HTTP/1.") || body == std::string::npos) return fail("not an HTTP reply");
  if (reply.compare(9, 3, "200") != 0) return fail("HTTP status " + reply.substr(9, 3));
  return reply.substr(body + 4);
}

std::string live_line(const P11muxFigures& before, const P11muxFigures& now, double seconds) {
  if (seconds <= 0) seconds = 1;
  double acquisitions = now.lock_acquisitions - before.lock_acquisitions;
  double wait_us = acquisitions > 0 ? (now.lock_wait_s - before.lock_wait_s) * 1e6 / acquisitions : 0.0;
  char wait[32];
  std::snprintf(wait, sizeof wait, "%.2f", wait_us);
  return "p11mux: " + rate((now.calls - before.calls) / seconds) + " calls/s, " +
         rate((now.errors - before.errors) / seconds) + " errors/s, lock wait " + wait + " us/call, " +
         rate(now.sessions_open) + " sessions, pool " + rate(now.pool_in_use) + " busy " +
         rate(now.pool_idle) + " idle " + rate(now.pool_waits - before.pool_waits) + " waits";
}

std::string final_line(const P11muxFigures& now) {
  char wait[32];
  std::snprintf(wait, sizeof wait, "%.2f ms", now.lock_wait_s * 1e3);
  return "p11mux   " + rate(now.calls) + " calls, " + rate(now.errors) + " errors, session lock wait " +
         wait + " in all, " + rate(now.sessions_open) + " sessions open, " + rate(now.pool_waits) +
         " pool waits";
}

}  // namespace p11mux::load
