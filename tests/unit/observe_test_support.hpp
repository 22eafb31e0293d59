// Test helpers for observability: a strict Prometheus text-format checker, a
// JSON validator, and a small blocking HTTP client (TCP or unix socket) with
// timeouts. Shared by the unit tests and the module tests.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <map>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace p11mux::test {

// ---- Prometheus text exposition format (0.0.4) -------------------------------------------

struct PrometheusText {
  std::vector<std::string> errors;           // empty when valid
  std::map<std::string, double> samples;     // "name{labels}" (as written) -> value
  std::map<std::string, std::string> types;  // family -> type

  bool has(const std::string& key) const { return samples.count(key) != 0; }
  double at(const std::string& key) const {
    auto it = samples.find(key);
    return it == samples.end() ? std::nan("") : it->second;
  }
};

namespace detail {

inline bool metric_name(std::string_view s) {
  if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_' || s[0] == ':'))
    return false;
  for (char c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == ':')) return false;
  }
  return true;
}

inline bool label_name(std::string_view s) {
  if (s.empty() || !(std::isalpha(static_cast<unsigned char>(s[0])) || s[0] == '_')) return false;
  for (char c : s) {
    if (!(std::isalnum(static_cast<unsigned char>(c)) || c == '_')) return false;
  }
  return true;
}

// Parses `{a="x",b="y"}` at the start of s; returns the labels or nullopt.
inline std::optional<std::map<std::string, std::string>> labels(std::string_view s,
                                                                std::size_t& used) {
  std::map<std::string, std::string> out;
  std::size_t i = 1;  // after '{'
  while (i < s.size() && s[i] != '}') {
    std::size_t eq = s.find('=', i);
    if (eq == std::string_view::npos || !label_name(s.substr(i, eq - i))) return std::nullopt;
    std::string name(s.substr(i, eq - i));
    if (eq + 1 >= s.size() || s[eq + 1] != '"') return std::nullopt;
    std::string value;
    std::size_t j = eq + 2;
    for (; j < s.size() && s[j] != '"'; ++j) {
      if (s[j] == '\\') {
        if (++j >= s.size() || (s[j] != '\\' && s[j] != '"' && s[j] != 'n')) return std::nullopt;
      }
      value += s[j];
    }
    if (j >= s.size()) return std::nullopt;
    if (!out.emplace(name, value).second) return std::nullopt;  // duplicate label
    i = j + 1;
    if (i < s.size() && s[i] == ',') ++i;
  }
  if (i >= s.size()) return std::nullopt;
  used = i + 1;
  return out;
}

inline std::optional<double> number(std::string_view s) {
  if (s == "+Inf") return INFINITY;
  if (s == "-Inf") return -INFINITY;
  if (s == "NaN") return NAN;
  std::string text(s);
  char* end = nullptr;
  double v = std::strtod(text.c_str(), &end);
  if (text.empty() || end != text.c_str() + text.size()) return std::nullopt;
  return v;
}

}  // namespace detail

// Checks every line: `# HELP name text`, `# TYPE name type`, or
// `name{labels} value`; families have one TYPE before their samples and are
// contiguous; histogram buckets are cumulative, end with le="+Inf", and match
// _count.
inline PrometheusText parse_prometheus(std::string_view text) {
  PrometheusText out;
  std::set<std::string> helped, finished;
  std::string current;                                    // family whose samples are being read
  std::map<std::string, double> last_bucket, inf_bucket;  // per histogram series (labels minus le)
  std::map<std::string, double> counts;
  std::size_t line_no = 0;
  auto fail = [&](const std::string& why, std::string_view line) {
    out.errors.push_back("line " + std::to_string(line_no) + ": " + why + ": " + std::string(line));
  };
  if (!text.empty() && text.back() != '\n') out.errors.push_back("no newline at the end");
  while (!text.empty()) {
    std::size_t eol = text.find('\n');
    std::string_view line = text.substr(0, eol);
    text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
    ++line_no;
    if (line.empty()) {
      fail("empty line", line);
      continue;
    }
    if (line.starts_with("# HELP ") || line.starts_with("# TYPE ")) {
      std::string_view rest = line.substr(7);
      std::size_t sp = rest.find(' ');
      std::string name(rest.substr(0, sp));
      if (!detail::metric_name(name) || sp == std::string_view::npos) {
        fail("bad HELP/TYPE", line);
        continue;
      }
      if (finished.count(name) != 0 || (name != current && out.types.count(name) != 0)) {
        fail("family not contiguous", line);
      }
      if (name != current && !current.empty()) finished.insert(current);
      current = name;
      if (line[2] == 'H') {
        if (!helped.insert(name).second) fail("second HELP", line);
      } else {
        std::string type(rest.substr(sp + 1));
        if (type != "counter" && type != "gauge" && type != "histogram" && type != "summary" &&
            type != "untyped") {
          fail("unknown type", line);
        }
        if (!out.types.emplace(name, type).second) fail("second TYPE", line);
      }
      continue;
    }
    if (line.starts_with("#")) continue;  // other comments are allowed
    std::size_t name_end = line.find_first_of("{ ");
    if (name_end == std::string_view::npos) {
      fail("no value", line);
      continue;
    }
    std::string name(line.substr(0, name_end));
    if (!detail::metric_name(name)) fail("bad metric name", line);
    std::map<std::string, std::string> lbl;
    std::size_t after = name_end;
    if (line[name_end] == '{') {
      std::size_t used = 0;
      auto parsed = detail::labels(line.substr(name_end), used);
      if (!parsed) {
        fail("bad labels", line);
        continue;
      }
      lbl = *parsed;
      after = name_end + used;
    }
    if (after >= line.size() || line[after] != ' ') {
      fail("no space before the value", line);
      continue;
    }
    std::string_view value_text = line.substr(after + 1);
    if (std::size_t sp = value_text.find(' '); sp != std::string_view::npos)
      value_text = value_text.substr(0, sp);
    auto value = detail::number(value_text);
    if (!value) {
      fail("bad value", line);
      continue;
    }
    // Which family does the sample belong to?
    std::string family = name;
    std::string suffix;
    for (std::string_view s : {"_bucket", "_sum", "_count"}) {
      if (name.size() > s.size() && name.ends_with(s)) {
        std::string base = name.substr(0, name.size() - s.size());
        if (out.types.count(base) != 0 && out.types[base] == "histogram") {
          family = base;
          suffix = s;
        }
      }
    }
    if (out.types.count(family) == 0) fail("sample without a TYPE", line);
    if (family != current) fail("sample outside its family", line);
    if (out.types[family] == "histogram") {
      if (suffix.empty()) fail("histogram sample without _bucket/_sum/_count", line);
      std::map<std::string, std::string> series = lbl;
      series.erase("le");
      std::string key;
      for (const auto& [k, v] : series) key += k + "=" + v + ",";
      if (suffix == "_bucket") {
        if (lbl.count("le") == 0) fail("bucket without le", line);
        if (last_bucket.count(key) != 0 && *value < last_bucket[key])
          fail("buckets not cumulative", line);
        last_bucket[key] = *value;
        if (lbl["le"] == "+Inf") inf_bucket[key] = *value;
      } else if (suffix == "_count") {
        counts[key] = *value;
      }
    } else if (out.types[family] == "counter" && *value < 0) {
      fail("negative counter", line);
    }
    std::string key(line.substr(0, after));
    if (!out.samples.emplace(key, *value).second) fail("duplicate sample", line);
  }
  for (const auto& [series, count] : counts) {
    if (inf_bucket.count(series) == 0 || inf_bucket[series] != count) {
      out.errors.push_back("histogram series {" + series + "}: +Inf bucket does not match _count");
    }
  }
  return out;
}

// ---- JSON ------------------------------------------------------------------------------

class JsonChecker {
 public:
  explicit JsonChecker(std::string_view text) : s_(text) {}
  bool valid() {
    skip();
    if (!value(0)) return false;
    skip();
    return i_ == s_.size();
  }

 private:
  void skip() {
    while (i_ < s_.size() && (s_[i_] == ' ' || s_[i_] == '\n' || s_[i_] == '\r' || s_[i_] == '\t'))
      ++i_;
  }
  bool literal(std::string_view w) {
    if (s_.substr(i_, w.size()) != w) return false;
    i_ += w.size();
    return true;
  }
  bool string() {
    if (i_ >= s_.size() || s_[i_] != '"') return false;
    for (++i_; i_ < s_.size(); ++i_) {
      char c = s_[i_];
      if (c == '"') {
        ++i_;
        return true;
      }
      if (static_cast<unsigned char>(c) < 0x20) return false;
      if (c == '\\') {
        if (++i_ >= s_.size()) return false;
        if (s_[i_] == 'u') {
          for (int k = 0; k < 4; ++k) {
            if (++i_ >= s_.size() || !std::isxdigit(static_cast<unsigned char>(s_[i_])))
              return false;
          }
        } else if (std::string_view("\"\\/bfnrt").find(s_[i_]) == std::string_view::npos) {
          return false;
        }
      }
    }
    return false;
  }
  bool number() {
    std::size_t start = i_;
    if (i_ < s_.size() && s_[i_] == '-') ++i_;
    if (i_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[i_]))) return false;
    if (s_[i_] == '0') {
      ++i_;
    } else {
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    if (i_ < s_.size() && s_[i_] == '.') {
      ++i_;
      if (i_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[i_]))) return false;
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    if (i_ < s_.size() && (s_[i_] == 'e' || s_[i_] == 'E')) {
      ++i_;
      if (i_ < s_.size() && (s_[i_] == '+' || s_[i_] == '-')) ++i_;
      if (i_ >= s_.size() || !std::isdigit(static_cast<unsigned char>(s_[i_]))) return false;
      while (i_ < s_.size() && std::isdigit(static_cast<unsigned char>(s_[i_]))) ++i_;
    }
    return i_ > start;
  }
  bool value(int depth) {
    if (depth > 64 || i_ >= s_.size()) return false;
    char c = s_[i_];
    if (c == '{' || c == '[') {
      char close = c == '{' ? '}' : ']';
      ++i_;
      skip();
      if (i_ < s_.size() && s_[i_] == close) {
        ++i_;
        return true;
      }
      for (;;) {
        skip();
        if (c == '{') {
          if (!string()) return false;
          skip();
          if (i_ >= s_.size() || s_[i_++] != ':') return false;
          skip();
        }
        if (!value(depth + 1)) return false;
        skip();
        if (i_ >= s_.size()) return false;
        if (s_[i_] == ',') {
          ++i_;
          continue;
        }
        if (s_[i_] == close) {
          ++i_;
          return true;
        }
        return false;
      }
    }
    if (c == '"') return string();
    if (c == 't') return literal("true");
    if (c == 'f') return literal("false");
    if (c == 'n') return literal("null");
    return number();
  }

  std::string_view s_;
  std::size_t i_ = 0;
};

inline bool valid_json(std::string_view text) { return JsonChecker(text).valid(); }

// ---- HTTP ------------------------------------------------------------------------------

struct Endpoint {
  std::string host;  // IPv4 literal; empty for a unix socket
  unsigned short port = 0;
  std::string path;  // unix socket
};

// "127.0.0.1:41234" or a socket path, as p11mux logs it.
inline Endpoint endpoint_of(const std::string& address) {
  Endpoint e;
  if (!address.empty() && address[0] == '/') {
    e.path = address;
  } else {
    std::size_t colon = address.rfind(':');
    e.host = address.substr(0, colon);
    e.port = static_cast<unsigned short>(std::atoi(address.c_str() + colon + 1));
  }
  return e;
}

// A connected socket, or -1 (refused, absent...). Timeouts of 5 s both ways.
inline int connect_to(const Endpoint& e) {
  int fd = -1;
  if (e.path.empty()) {
    sockaddr_in sa{};
    sa.sin_family = AF_INET;
    sa.sin_port = htons(e.port);
    if (::inet_pton(AF_INET, e.host.c_str(), &sa.sin_addr) != 1) return -1;
    fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      ::close(fd);
      return -1;
    }
  } else {
    sockaddr_un sa{};
    sa.sun_family = AF_UNIX;
    std::strncpy(sa.sun_path, e.path.c_str(), sizeof sa.sun_path - 1);
    fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&sa), sizeof sa) != 0) {
      ::close(fd);
      return -1;
    }
  }
  if (fd < 0) return -1;
  timeval tv{5, 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  return fd;
}

struct HttpReply {
  int status = 0;
  std::string headers;  // lower-cased
  std::string body;
};

// Sends one request and reads to EOF; nullopt when the connection fails or
// the reply is not HTTP.
inline std::optional<HttpReply> http_request(const Endpoint& e, std::string_view request) {
  int fd = connect_to(e);
  if (fd < 0) return std::nullopt;
  std::string req(request);
  for (std::size_t sent = 0; sent < req.size();) {
    ssize_t n = ::send(fd, req.data() + sent, req.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) {
      ::close(fd);
      return std::nullopt;
    }
    sent += static_cast<std::size_t>(n);
  }
  std::string raw;
  char buf[4096];
  for (ssize_t n; (n = ::recv(fd, buf, sizeof buf, 0)) > 0;)
    raw.append(buf, static_cast<std::size_t>(n));
  ::close(fd);
  std::size_t end = raw.find("\r\n\r\n");
  if (!raw.starts_with("HTTP/1.") || end == std::string::npos) return std::nullopt;
  HttpReply reply;
  reply.status = std::atoi(raw.c_str() + 9);
  reply.headers = raw.substr(0, end);
  for (char& c : reply.headers) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  reply.body = raw.substr(end + 4);
  return reply;
}

inline std::optional<HttpReply> http_get(const Endpoint& e, std::string_view path) {
  return http_request(e, "GET " + std::string(path) + " HTTP/1.1\r\nHost: localhost\r\n\r\n");
}

}  // namespace p11mux::test
