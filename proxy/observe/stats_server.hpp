// The stats thread: a small HTTP server (Boost.Asio, one p11mux thread)
// answering GET /metrics (Prometheus text) and GET /stats (JSON) on a
// loopback TCP address or a unix socket, and the reader of SIGUSR1 requests
// for a summary in the log. The thread blocks every signal and touches only
// what its handlers read (atomics and lock-free lists).
//
// Requests: one per connection (HTTP/1.0 style, "Connection: close"), GET or
// HEAD, at most 8 KiB of headers, answered or dropped within 5 s; at most 32
// connections at once. Nothing else is served.
#pragma once

#include <spdlog/logger.h>

#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <string_view>

namespace p11mux {

// [metrics] listen, parsed: "HOST:PORT" with HOST an IP literal (IPv6 in
// brackets) or "localhost", or a unix socket path (starting with '/' or
// "unix:"). Port 0 picks a free one (see StatsServer::address).
struct ListenAddress {
  enum class Kind { tcp, unix_socket };
  Kind kind = Kind::tcp;
  std::string host;  // tcp: an IP literal
  unsigned short port = 0;
  std::string path;  // unix_socket
};

// Throws CkrError(CKR_GENERAL_ERROR) naming the key for a malformed value,
// and for an address that is not loopback unless `allow_remote`.
ListenAddress parse_listen(std::string_view text, bool allow_remote);

class StatsServer {
 public:
  struct Handlers {
    std::function<std::string()> metrics;  // GET /metrics
    std::function<std::string()> stats;    // GET /stats
    std::function<void()> summary;         // a byte was written to summary_fd
  };

  // Binds `listen` (if any), watches `summary_fd` (if not -1; it is dup'ed,
  // the caller keeps its own), and starts the thread. Throws a
  // std::runtime_error (Asio's system_error) when it cannot bind or start.
  StatsServer(const std::optional<ListenAddress>& listen, int summary_fd, Handlers handlers);
  ~StatsServer();                            // stop()
  StatsServer(const StatsServer&) = delete;  // owns a thread
  StatsServer& operator=(const StatsServer&) = delete;

  // Stops the thread and joins it, closes the sockets, removes the unix
  // socket file. Idempotent. Never called in a forked child (the thread does
  // not exist there): see after_fork().
  void stop() noexcept;

  // Where it listens: "127.0.0.1:41234", "[::1]:9464", or the socket path.
  const std::string& address() const noexcept { return address_; }

  // In a forked child (atfork handler: no locks, no allocation): closes the
  // child's copies of the listening sockets so that the parent's endpoint
  // goes away with the parent, and the child never answers on it.
  static void after_fork() noexcept;

 private:
  void start(const std::optional<ListenAddress>& listen, int summary_fd, Handlers handlers);

  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string address_;
};

}  // namespace p11mux
