#include "observe/stats_server.hpp"

#include "sync/thread_signals.hpp"

#include <p11mux/ckr_error.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/posix/stream_descriptor.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/write.hpp>

#include <fcntl.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <array>
#include <atomic>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <thread>

namespace p11mux {
namespace {

namespace asio = boost::asio;
using boost::system::error_code;
using namespace std::chrono_literals;

constexpr std::size_t kMaxRequest = 8192;
constexpr auto kRequestTimeout = 5s;
constexpr int kMaxConnections = 32;
constexpr auto kAcceptRetry = 100ms;  // after an accept error such as EMFILE

// The fds a forked child must close: the listening socket and our copy of
// the summary eventfd. Written by the owning server, read by after_fork().
std::array<std::atomic<int>, 2> g_child_closes{-1, -1};

void forget_in_child(int slot, int fd) noexcept {
  g_child_closes[slot].store(fd, std::memory_order_release);
}

[[noreturn]] void bad_listen(std::string_view text, std::string_view why) {
  throw CkrError(CKR_GENERAL_ERROR,
                 "bad value '" + std::string(text) + "' for [metrics] listen: " + std::string(why));
}

std::string response(std::string_view status, std::string_view type, std::string_view body,
                     bool head) {
  std::string out = "HTTP/1.1 ";
  out += status;
  out += "\r\nContent-Type: ";
  out += type;
  out += "\r\nContent-Length: " + std::to_string(body.size());
  out += "\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n";
  if (!head) out += body;
  return out;
}

}  // namespace

ListenAddress parse_listen(std::string_view text, bool allow_remote) {
  ListenAddress out;
  if (text.starts_with("unix:") || text.starts_with("/")) {
    out.kind = ListenAddress::Kind::unix_socket;
    out.path = text.starts_with("unix:") ? text.substr(5) : text;
    if (out.path.empty()) bad_listen(text, "empty socket path");
    if (out.path.size() >= sizeof(sockaddr_un{}.sun_path)) bad_listen(text, "socket path too long");
    return out;
  }
  std::size_t colon = text.rfind(':');
  if (colon == std::string_view::npos) bad_listen(text, "expected HOST:PORT or a unix socket path");
  std::string_view host = text.substr(0, colon);
  std::string_view port = text.substr(colon + 1);
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (port.empty() || ec != std::errc() || end != port.data() + port.size() || value > 65535) {
    bad_listen(text, "the port must be a number from 0 to 65535");
  }
  out.port = static_cast<unsigned short>(value);
  if (host.starts_with("[") && host.ends_with("]")) host = host.substr(1, host.size() - 2);
  if (host == "localhost") host = "127.0.0.1";  // no resolver inside a PKCS#11 module
  error_code parse_error;
  asio::ip::address address = asio::ip::make_address(std::string(host), parse_error);
  if (parse_error) bad_listen(text, "the host must be an IP address or localhost");
  if (!address.is_loopback() && !allow_remote) {
    bad_listen(text,
               "not a loopback address; set [metrics] allow_remote = true to serve other hosts");
  }
  out.host = address.to_string();
  return out;
}

struct StatsServer::Impl {
  Handlers handlers;
  int connections = 0;  // touched only by the stats thread
  asio::io_context io{1};
  std::optional<asio::ip::tcp::acceptor> tcp;
  std::optional<asio::local::stream_protocol::acceptor> local;
  std::optional<asio::steady_timer> retry;
  std::optional<asio::posix::stream_descriptor> summary;
  std::uint64_t summary_count = 0;
  std::string unix_path;
  ino_t unix_inode = 0;
  std::thread thread;
  bool stopped = false;

  template <class Socket>
  class Connection : public std::enable_shared_from_this<Connection<Socket>> {
   public:
    Connection(Socket socket, Impl& server)
        : socket_(std::move(socket)), timer_(server.io), server_(server) {
      ++server_.connections;
    }
    ~Connection() { --server_.connections; }
    Connection(const Connection&) = delete;
    Connection& operator=(const Connection&) = delete;

    void start() {
      timer_.expires_after(kRequestTimeout);
      timer_.async_wait([self = this->shared_from_this()](error_code ec) {
        if (!ec) self->close();  // too slow: drop it
      });
      read();
    }

   private:
    void read() {
      socket_.async_read_some(asio::buffer(buffer_.data() + used_, buffer_.size() - used_),
                              [self = this->shared_from_this()](error_code ec, std::size_t n) {
                                if (ec) return self->close();
                                self->used_ += n;
                                self->on_data();
                              });
    }

    void on_data() {
      std::string_view request(buffer_.data(), used_);
      if (request.find("\r\n\r\n") == std::string_view::npos &&
          request.find("\n\n") == std::string_view::npos) {
        if (used_ < buffer_.size()) return read();
        return reply(
            response("431 Request Header Fields Too Large", "text/plain", "too large\n", false));
      }
      reply(answer(request));
    }

    std::string answer(std::string_view request) {
      std::string_view line = request.substr(0, request.find_first_of("\r\n"));
      std::size_t sp1 = line.find(' ');
      std::size_t sp2 = sp1 == std::string_view::npos ? sp1 : line.find(' ', sp1 + 1);
      if (sp2 == std::string_view::npos)
        return response("400 Bad Request", "text/plain", "bad request\n", false);
      std::string_view method = line.substr(0, sp1);
      std::string_view target = line.substr(sp1 + 1, sp2 - sp1 - 1);
      target = target.substr(0, target.find('?'));
      bool head = method == "HEAD";
      if (method != "GET" && !head) {
        return response("405 Method Not Allowed", "text/plain", "GET or HEAD only\n", false);
      }
      try {
        if (target == "/metrics") {
          return response("200 OK", "text/plain; version=0.0.4; charset=utf-8",
                          server_.handlers.metrics(), head);
        }
        if (target == "/stats") {
          return response("200 OK", "application/json", server_.handlers.stats(), head);
        }
        if (target == "/") {
          return response("200 OK", "text/plain",
                          "p11mux: /metrics (Prometheus text format), /stats (JSON)\n", head);
        }
      } catch (const std::exception&) {
        return response("500 Internal Server Error", "text/plain", "error\n", head);
      }
      return response("404 Not Found", "text/plain", "not found: try /metrics or /stats\n", head);
    }

    void reply(std::string text) {
      reply_ = std::move(text);
      asio::async_write(
          socket_, asio::buffer(reply_),
          [self = this->shared_from_this()](error_code, std::size_t) { self->close(); });
    }

    void close() {
      error_code ignored;
      socket_.shutdown(Socket::shutdown_both, ignored);
      socket_.close(ignored);
      timer_.cancel();
    }

    Socket socket_;
    asio::steady_timer timer_;
    Impl& server_;
    std::array<char, kMaxRequest> buffer_;
    std::size_t used_ = 0;
    std::string reply_;
  };

  template <class Acceptor>
  void accept(Acceptor& acceptor) {
    acceptor.async_accept(
        [this, &acceptor](error_code ec, typename Acceptor::protocol_type::socket socket) {
          if (ec == asio::error::operation_aborted) return;
          if (ec) {
            // Out of file descriptors or similar: try again shortly, without spinning.
            retry->expires_after(kAcceptRetry);
            retry->async_wait([this, &acceptor](error_code e) {
              if (!e) accept(acceptor);
            });
            return;
          }
          if (connections < kMaxConnections) {
            std::make_shared<Connection<typename Acceptor::protocol_type::socket>>(
                std::move(socket), *this)
                ->start();
          }
          accept(acceptor);
        });
  }

  void watch_summary() {
    summary->async_read_some(asio::buffer(&summary_count, sizeof summary_count),
                             [this](error_code ec, std::size_t) {
                               if (ec) return;  // stopped, or a broken eventfd: stop watching
                               try {
                                 handlers.summary();
                               } catch (...) {
                                 // a summary that cannot be written is not worth a crash
                               }
                               watch_summary();
                             });
  }

  // A stale socket file from an earlier run (nobody accepts on it) is
  // removed; anything else at that path is left alone and binding fails.
  void remove_stale_socket(const std::string& path) {
    struct stat st {};
    if (::lstat(path.c_str(), &st) != 0 || !S_ISSOCK(st.st_mode)) return;
    asio::local::stream_protocol::socket probe(io);
    error_code ec;
    probe.connect(asio::local::stream_protocol::endpoint(path), ec);
    if (ec == asio::error::connection_refused) ::unlink(path.c_str());
  }
};

StatsServer::StatsServer(const std::optional<ListenAddress>& listen, int summary_fd,
                         Handlers handlers)
    : impl_(std::make_unique<Impl>()) {
  try {
    start(listen, summary_fd, std::move(handlers));
  } catch (...) {
    stop();  // closes what was opened, and forgets it for a later fork
    throw;
  }
}

void StatsServer::start(const std::optional<ListenAddress>& listen, int summary_fd,
                        Handlers handlers) {
  Impl& s = *impl_;
  s.handlers = std::move(handlers);
  s.retry.emplace(s.io);
  if (listen && listen->kind == ListenAddress::Kind::tcp) {
    asio::ip::tcp::endpoint endpoint(asio::ip::make_address(listen->host), listen->port);
    s.tcp.emplace(s.io, endpoint);  // reuse_address: a restart must not wait for TIME_WAIT
    asio::ip::tcp::endpoint bound = s.tcp->local_endpoint();
    address_ = bound.address().is_v6() ? "[" + bound.address().to_string() + "]"
                                       : bound.address().to_string();
    address_ += ":" + std::to_string(bound.port());
    forget_in_child(0, s.tcp->native_handle());
    s.accept(*s.tcp);
  } else if (listen) {
    s.remove_stale_socket(listen->path);
    s.local.emplace(s.io, asio::local::stream_protocol::endpoint(listen->path));
    s.unix_path = listen->path;
    struct stat st {};
    if (::lstat(listen->path.c_str(), &st) == 0) s.unix_inode = st.st_ino;
    address_ = listen->path;
    forget_in_child(0, s.local->native_handle());
    s.accept(*s.local);
  }
  if (summary_fd >= 0) {
    int copy = ::fcntl(summary_fd, F_DUPFD_CLOEXEC, 0);
    if (copy < 0)
      throw std::system_error(errno, std::generic_category(), "dup of the summary eventfd");
    s.summary.emplace(s.io, copy);
    forget_in_child(1, copy);
    s.watch_summary();
  }
  s.thread = with_signals_blocked([&s] {
    return std::thread([&s] {
      // Handlers catch what they can; anything else must not leave the thread.
      for (;;) {
        try {
          s.io.run();
          return;
        } catch (...) {
        }
      }
    });
  });
  pthread_setname_np(s.thread.native_handle(), "p11mux-stats");  // here, so it is named on return
}

StatsServer::~StatsServer() { stop(); }

void StatsServer::stop() noexcept {
  Impl& s = *impl_;
  if (s.stopped) return;
  s.stopped = true;
  s.io.stop();
  if (s.thread.joinable()) s.thread.join();
  forget_in_child(0, -1);
  forget_in_child(1, -1);
  error_code ignored;
  if (s.tcp) s.tcp->close(ignored);
  if (s.local) s.local->close(ignored);
  if (s.summary) s.summary->close(ignored);
  if (!s.unix_path.empty()) {
    struct stat st {};
    // Only our own socket: another process may have taken the path since.
    if (::lstat(s.unix_path.c_str(), &st) == 0 && S_ISSOCK(st.st_mode) &&
        st.st_ino == s.unix_inode) {
      ::unlink(s.unix_path.c_str());
    }
  }
}

void StatsServer::after_fork() noexcept {
  for (auto& fd : g_child_closes) {
    int f = fd.exchange(-1, std::memory_order_acq_rel);
    if (f >= 0) ::close(f);
  }
}

}  // namespace p11mux
