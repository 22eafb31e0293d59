#include "config/config.hpp"

#include <unistd.h>  // environ

#include <algorithm>
#include <array>
#include <cerrno>
#include <cstddef>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <system_error>
#include <type_traits>
#include <utility>

#ifndef P11MUX_DEFAULT_CONFIG_FILE
#error "P11MUX_DEFAULT_CONFIG_FILE: the build passes ${sysconfdir}/p11mux/p11mux.conf"
#endif

namespace p11mux {
namespace {

// ---- Value kinds -------------------------------------------------------------------------
// ValueKind<T> says how text becomes a T: parse() returns false for a bad value and
// expected() describes the accepted values for the error message. A Config field of a new
// type needs one specialization here (e.g. unsigned: digits only, range-checked; bool:
// true|false); the key table below picks the kind from the field's type.

template <typename T>
struct ValueKind;  // deliberately undefined

template <>
struct ValueKind<std::string> {
  static bool parse(std::string_view text, std::string& out) {
    out.assign(text);
    return true;
  }
  static std::string expected() { return "a string"; }
};

template <>
struct ValueKind<std::optional<std::string>> {
  // Empty means unset, so an environment override can clear a value set by the file.
  static bool parse(std::string_view text, std::optional<std::string>& out) {
    if (text.empty())
      out.reset();
    else
      out.emplace(text);
    return true;
  }
  static std::string expected() { return "a string"; }
};

// Decimal digits only: no sign, no spaces, no suffix; at most 12 digits, so no overflow.
bool parse_digits(std::string_view text, unsigned long& out) {
  if (text.empty() || text.size() > 12) return false;
  unsigned long value = 0;
  for (char c : text) {
    if (c < '0' || c > '9') return false;
    value = value * 10 + static_cast<unsigned long>(c - '0');
  }
  out = value;
  return true;
}

// A whole number from Min to Max. Every numeric key has its range (README,
// "Configuration"): a value beyond it is an error, never wrapped or clamped
// (idle_timeout_s = 10000000000 once overflowed its conversion to nanoseconds).
template <unsigned long Min, unsigned long Max>
struct Number {
  static_assert(Min <= Max && Max <= 999999999999UL);
  static bool parse(std::string_view text, unsigned long& out) {
    unsigned long value = 0;
    if (!parse_digits(text, value) || value < Min || value > Max) return false;
    out = value;
    return true;
  }
  // Empty means unset (e.g. pool.max_sessions: learn it from the token).
  static bool parse(std::string_view text, std::optional<unsigned long>& out) {
    if (text.empty()) {
      out.reset();
      return true;
    }
    unsigned long value = 0;
    if (!parse(text, value)) return false;
    out = value;
    return true;
  }
  static std::string expected() {
    return "a whole number from " + std::to_string(Min) + " to " + std::to_string(Max);
  }
  static std::string expected_or_empty() { return expected() + " or empty"; }
};

template <>
struct ValueKind<bool> {
  static bool parse(std::string_view text, bool& out) {
    if (text == "true")
      out = true;
    else if (text == "false")
      out = false;
    else
      return false;
    return true;
  }
  static std::string expected() { return "true|false"; }
};

template <typename E>
struct EnumName {
  std::string_view name;
  E value;
};

// The spelling of each enum value, one list per enum type (found by overload on the tag).
constexpr std::array<EnumName<SessionMode>, 2> names_of(std::type_identity<SessionMode>) {
  return {{{"serialize", SessionMode::serialize}, {"multiplex", SessionMode::multiplex}}};
}
constexpr std::array<EnumName<LockingMode>, 4> names_of(std::type_identity<LockingMode>) {
  return {{{"auto", LockingMode::automatic},
           {"os", LockingMode::os},
           {"callbacks", LockingMode::callbacks},
           {"none", LockingMode::none}}};
}
constexpr std::array<EnumName<BindMode>, 3> names_of(std::type_identity<BindMode>) {
  return {{{"auto", BindMode::automatic}, {"open", BindMode::open}, {"state", BindMode::state}}};
}
constexpr std::array<EnumName<VendorInterfaces>, 2> names_of(std::type_identity<VendorInterfaces>) {
  return {{{"hide", VendorInterfaces::hide}, {"pass", VendorInterfaces::pass}}};
}
constexpr std::array<EnumName<spdlog::level::level_enum>, 6> names_of(
    std::type_identity<spdlog::level::level_enum>) {
  namespace lv = spdlog::level;
  return {{{"off", lv::off},
           {"error", lv::err},
           {"warn", lv::warn},
           {"info", lv::info},
           {"debug", lv::debug},
           {"trace", lv::trace}}};
}

template <typename E>
requires std::is_enum_v<E>
struct ValueKind<E> {
  static constexpr auto names = names_of(std::type_identity<E>{});

  static bool parse(std::string_view text, E& out) {
    for (const auto& n : names) {
      if (n.name == text) {
        out = n.value;
        return true;
      }
    }
    return false;
  }
  static std::string expected() {
    std::string s;
    for (const auto& n : names) {
      if (!s.empty()) s += '|';
      s += n.name;
    }
    return s;
  }
  static std::string_view name(E value) noexcept {
    for (const auto& n : names)
      if (n.value == value) return n.name;
    return "?";
  }
};

// ---- The key table -----------------------------------------------------------------------

struct KeySpec {
  std::string_view section;  // empty: top-level
  std::string_view name;
  bool (*assign)(Config&, std::string_view text);  // false: bad value
  std::string (*expected)();
};

// A key stored at config.*Path[0].*Path[1]...; its value kind follows from the field type.
template <auto... Path>
constexpr KeySpec key(std::string_view section, std::string_view name) {
  using Field = std::remove_reference_t<decltype((std::declval<Config&>().*....*Path))>;
  static_assert(
      !std::is_same_v<Field, unsigned long> && !std::is_same_v<Field, std::optional<unsigned long>>,
      "a numeric key is declared with number<Min, Max, ...>: every one has a range");
  using Kind = ValueKind<Field>;
  return {section, name,
          [](Config& c, std::string_view text) { return Kind::parse(text, (c.*....*Path)); },
          &Kind::expected};
}

// A numeric key, unsigned long (or optional: empty = unset), from Min to Max.
template <unsigned long Min, unsigned long Max, auto... Path>
constexpr KeySpec number(std::string_view section, std::string_view name) {
  using Field = std::remove_reference_t<decltype((std::declval<Config&>().*....*Path))>;
  using Kind = Number<Min, Max>;
  constexpr bool optional = std::is_same_v<Field, std::optional<unsigned long>>;
  static_assert(optional || std::is_same_v<Field, unsigned long>);
  return {section, name,
          [](Config& c, std::string_view text) { return Kind::parse(text, (c.*....*Path)); },
          optional ? &Kind::expected_or_empty : &Kind::expected};
}

// The ranges (README, "Configuration"). Durations stay far from any overflow
// when converted to nanoseconds; counts stay within what a process can hold.
constexpr unsigned long kOneHourMs = 3'600'000;
constexpr unsigned long kOneHourUs = 3'600'000'000;
constexpr unsigned long kThirtyDaysS = 30UL * 24 * 3600;

// Every configuration key, once. The file parser and the environment overrides both read it.
constexpr std::array kKeys{
    key<&Config::module>("", "module"),
    key<&Config::session_mode>("", "session_mode"),
    key<&Config::backend, &Config::Backend::locking>("backend", "locking"),
    key<&Config::backend, &Config::Backend::init_reserved>("backend", "init_reserved"),
    key<&Config::backend, &Config::Backend::vendor_interfaces>("backend", "vendor_interfaces"),
    key<&Config::log, &Config::Log::level>("log", "level"),
    key<&Config::log, &Config::Log::file>("log", "file"),
    key<&Config::log, &Config::Log::functions>("log", "functions"),
    number<0, kOneHourUs, &Config::log, &Config::Log::min_duration_us>("log", "min_duration_us"),
    key<&Config::log, &Config::Log::async>("log", "async"),
    number<0, 16 * 1024 * 1024, &Config::log, &Config::Log::rotate_size_kb>("log",
                                                                            "rotate_size_kb"),
    number<0, 1000, &Config::log, &Config::Log::rotate_files>("log", "rotate_files"),
    number<1, 1'000'000, &Config::pool, &Config::Pool::max_sessions>("pool", "max_sessions"),
    number<0, kOneHourMs, &Config::pool, &Config::Pool::wait_ms>("pool", "wait_ms"),
    number<0, 1024, &Config::pool, &Config::Pool::prewarm>("pool", "prewarm"),
    key<&Config::pool, &Config::Pool::keep_login>("pool", "keep_login"),
    number<0, kThirtyDaysS, &Config::pool, &Config::Pool::idle_timeout_s>("pool", "idle_timeout_s"),
    number<0, kThirtyDaysS, &Config::pool, &Config::Pool::keepalive_s>("pool", "keepalive_s"),
    key<&Config::pool, &Config::Pool::bind>("pool", "bind"),
    number<1, 10'000'000, &Config::pool, &Config::Pool::max_virtual_sessions>(
        "pool", "max_virtual_sessions"),
    key<&Config::metrics, &Config::Metrics::enabled>("metrics", "enabled"),
    key<&Config::metrics, &Config::Metrics::listen>("metrics", "listen"),
    key<&Config::metrics, &Config::Metrics::allow_remote>("metrics", "allow_remote"),
    key<&Config::metrics, &Config::Metrics::signal>("metrics", "signal"),
    key<&Config::metrics, &Config::Metrics::summary>("metrics", "summary"),
    key<&Config::policy, &Config::Policy::mechanisms_allow>("policy", "mechanisms_allow"),
    key<&Config::policy, &Config::Policy::mechanisms_deny>("policy", "mechanisms_deny"),
    key<&Config::policy, &Config::Policy::functions_deny>("policy", "functions_deny"),
    key<&Config::policy, &Config::Policy::read_only>("policy", "read_only"),
    key<&Config::policy, &Config::Policy::protect>("policy", "protect"),
    key<&Config::policy, &Config::Policy::tokens>("policy", "tokens"),
    key<&Config::policy, &Config::Policy::objects>("policy", "objects"),
};

constexpr std::string_view kEnvPrefix = "P11MUX_";
constexpr char kConfigFileVar[] = "P11MUX_CONFIG";

// P11MUX_[SECTION_]KEY. A fixed buffer rather than std::string so the table can be checked
// at compile time with compilers whose constexpr std::string support lags (clang 14).
class EnvName {
 public:
  constexpr explicit EnvName(const KeySpec& k) {
    append(kEnvPrefix);
    if (!k.section.empty()) {
      append(k.section);
      append("_");
    }
    append(k.name);
  }
  constexpr std::string_view view() const { return {buf_.data(), fits() ? len_ : buf_.size()}; }
  constexpr bool fits() const { return len_ <= buf_.size(); }

 private:
  constexpr void append(std::string_view part) {
    for (char ch : part) {
      if (len_ < buf_.size())
        buf_[len_] = (ch >= 'a' && ch <= 'z') ? static_cast<char>(ch - 'a' + 'A') : ch;
      ++len_;  // past the end: fits() is false and the table check fails
    }
  }
  std::array<char, 64> buf_{};
  std::size_t len_ = 0;
};

// Names are lower-case identifiers, so upper-casing them is one-to-one; the joined
// environment names must still be distinct ("a_b"+"c" vs "a"+"b_c"), not P11MUX_CONFIG,
// and outside the prefixes reserved for the project's tools.
constexpr bool lower_identifier(std::string_view s) {
  for (char ch : s)
    if (!((ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_')) return false;
  return true;
}
constexpr bool table_is_consistent() {
  for (std::size_t i = 0; i < kKeys.size(); ++i) {
    const KeySpec& a = kKeys[i];
    if (a.name.empty() || !lower_identifier(a.name) || !lower_identifier(a.section)) return false;
    const EnvName env(a);
    if (!env.fits() || env.view() == kConfigFileVar) return false;
    for (std::string_view reserved : kReservedEnvPrefixes)
      if (env.view().starts_with(reserved)) return false;
    for (std::size_t j = i + 1; j < kKeys.size(); ++j)
      if (env.view() == EnvName(kKeys[j]).view()) return false;
  }
  return true;
}
static_assert(table_is_consistent(),
              "config keys must be lower-case and map to distinct P11MUX_* names");

const KeySpec* find_key(std::string_view section, std::string_view name) {
  for (const KeySpec& k : kKeys)
    if (k.section == section && k.name == name) return &k;
  return nullptr;
}

bool known_section(std::string_view section) {
  for (const KeySpec& k : kKeys)
    if (!k.section.empty() && k.section == section) return true;
  return false;
}

// "session_mode" or "[log] level": how messages name a key.
std::string describe(const KeySpec& k) {
  if (k.section.empty()) return std::string(k.name);
  return "[" + std::string(k.section) + "] " + std::string(k.name);
}

std::string bad_value(const KeySpec& k, std::string_view text) {
  return "bad value '" + std::string(text) + "' for " + describe(k) + " (expected " + k.expected() +
         ")";
}

// "top-level key 'x'" or "key 'x' in section [s]"
std::string key_in_section(std::string_view section, std::string_view name) {
  if (section.empty()) return "top-level key '" + std::string(name) + "'";
  return "key '" + std::string(name) + "' in section [" + std::string(section) + "]";
}

// ---- INI parsing -------------------------------------------------------------------------

constexpr std::string_view kSpace = " \t\r\v\f";

std::string_view trim(std::string_view s) {
  const auto first = s.find_first_not_of(kSpace);
  if (first == std::string_view::npos) return {};
  const auto last = s.find_last_not_of(kSpace);
  return s.substr(first, last - first + 1);
}

bool is_comment_start(char ch) { return ch == '#' || ch == ';'; }

// Empty, or a comment (after trimming).
bool nothing_but_comment(std::string_view rest) {
  return rest.empty() || is_comment_start(rest.front());
}

// Cuts a trailing comment: a '#' or ';' that follows whitespace.
std::string_view strip_trailing_comment(std::string_view s) {
  for (std::size_t i = 1; i < s.size(); ++i)
    if (is_comment_start(s[i]) && kSpace.find(s[i - 1]) != std::string_view::npos)
      return s.substr(0, i);
  return s;
}

class IniParser {
 public:
  IniParser(std::string_view file_name, Config& config) : file_name_(file_name), config_(config) {}

  void parse(std::string_view text) {
    if (text.starts_with("\xEF\xBB\xBF")) text.remove_prefix(3);  // UTF-8 byte order mark
    std::size_t line_no = 0;
    while (!text.empty()) {
      const auto eol = text.find('\n');
      const std::string_view line = text.substr(0, eol);
      text.remove_prefix(eol == std::string_view::npos ? text.size() : eol + 1);
      ++line_no;
      parse_line(trim(line), line_no);
    }
  }

 private:
  [[noreturn]] void fail(std::size_t line_no, const std::string& what) const {
    throw ConfigError(std::string(file_name_) + ":" + std::to_string(line_no) + ": " + what);
  }

  void parse_line(std::string_view line, std::size_t line_no) {
    if (nothing_but_comment(line)) return;
    if (line.front() == '[') return parse_section(line, line_no);

    const auto eq = line.find('=');
    if (eq == std::string_view::npos)
      fail(line_no, "expected 'key = value' or '[section]', got '" + std::string(line) + "'");
    const std::string_view name = trim(line.substr(0, eq));
    if (name.empty()) fail(line_no, "missing key before '='");
    const KeySpec* k = find_key(section_, name);
    if (k == nullptr) fail(line_no, "unknown " + key_in_section(section_, name));
    std::size_t& first = first_line_[static_cast<std::size_t>(k - kKeys.data())];
    if (first != 0)
      fail(line_no, "duplicate " + key_in_section(section_, name) + " (first set on line " +
                        std::to_string(first) + ")");
    first = line_no;
    const std::string_view value = parse_value(line.substr(eq + 1), name, line_no);
    if (!k->assign(config_, value)) fail(line_no, bad_value(*k, value));
  }

  void parse_section(std::string_view line, std::size_t line_no) {
    const auto close = line.find(']');
    if (close == std::string_view::npos)
      fail(line_no, "unterminated section header '" + std::string(line) + "'");
    const std::string_view rest = trim(line.substr(close + 1));
    if (!nothing_but_comment(rest))
      fail(line_no, "unexpected text '" + std::string(rest) + "' after section header");
    const std::string_view name = trim(line.substr(1, close - 1));
    if (!known_section(name)) fail(line_no, "unknown section [" + std::string(name) + "]");
    section_ = name;
  }

  std::string_view parse_value(std::string_view raw, std::string_view name,
                               std::size_t line_no) const {
    const std::string_view v = trim(raw);
    if (v.empty() || v.front() != '"') return trim(strip_trailing_comment(raw));
    const auto close = v.find('"', 1);
    if (close == std::string_view::npos)
      fail(line_no, "unterminated quoted value for " + key_in_section(section_, name));
    const std::string_view rest = trim(v.substr(close + 1));
    if (!nothing_but_comment(rest))
      fail(line_no, "unexpected text '" + std::string(rest) + "' after quoted value for " +
                        key_in_section(section_, name));
    return v.substr(1, close - 1);
  }

  std::string_view file_name_;
  Config& config_;
  std::string_view section_;                            // empty: top-level
  std::array<std::size_t, kKeys.size()> first_line_{};  // 0: not seen yet
};

// ---- Environment overrides ---------------------------------------------------------------

// Edit distance (insertions, deletions, substitutions), for "did you mean".
std::size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<std::size_t> row(b.size() + 1);
  for (std::size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (std::size_t i = 1; i <= a.size(); ++i) {
    std::size_t diagonal = row[0];
    row[0] = i;
    for (std::size_t j = 1; j <= b.size(); ++j) {
      const std::size_t above = row[j];
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diagonal + (a[i - 1] == b[j - 1] ? 0 : 1)});
      diagonal = above;
    }
  }
  return row[b.size()];
}

// The variable a misspelled one most likely meant, or empty: the nearest known name by edit
// distance (case aside), when it is close; or the one key whose name the variable gives
// without its section (P11MUX_LOCKING: P11MUX_BACKEND_LOCKING).
std::string nearest_variable(std::string_view unknown) {
  std::string upper(unknown);
  for (char& ch : upper)
    if (ch >= 'a' && ch <= 'z') ch = static_cast<char>(ch - 'a' + 'A');
  const std::string_view rest = std::string_view(upper).substr(kEnvPrefix.size());
  std::string best;
  std::size_t best_distance = std::max<std::size_t>(2, rest.size() / 4) + 1;  // "close"
  auto consider = [&](std::string_view known) {
    const std::size_t d = edit_distance(upper, known);
    if (d < best_distance) {
      best_distance = d;
      best.assign(known);
    }
  };
  consider(kConfigFileVar);
  for (const KeySpec& k : kKeys) consider(EnvName(k).view());
  if (!best.empty() || rest.empty()) return best;
  for (const KeySpec& k : kKeys) {
    const EnvName env(k);
    const std::string_view known = env.view();
    if (known.size() > kEnvPrefix.size() + rest.size() && known.ends_with(rest) &&
        known[known.size() - rest.size() - 1] == '_') {
      if (!best.empty()) return {};  // several sections have it: no guess
      best.assign(known);
    }
  }
  return best;
}

bool reserved_variable(std::string_view name) {
  return std::any_of(kReservedEnvPrefixes.begin(), kReservedEnvPrefixes.end(),
                     [name](std::string_view prefix) { return name.starts_with(prefix); });
}

bool known_variable(std::string_view name) {
  if (name == kConfigFileVar) return true;
  return std::any_of(kKeys.begin(), kKeys.end(),
                     [name](const KeySpec& k) { return EnvName(k).view() == name; });
}

// A P11MUX_* variable that names no setting is an error, as an unknown key in the file is:
// ignored, a typo would leave the setting at its default without a word.
void check_variable_names(const Environment& env) {
  std::vector<std::string> names = env.names();
  std::sort(names.begin(), names.end());  // the same variable reported whatever environ's order
  for (const std::string& name : names) {
    if (!name.starts_with(kEnvPrefix) || known_variable(name) || reserved_variable(name)) continue;
    std::string message = "unknown environment variable " + name;
    if (const std::string guess = nearest_variable(name); !guess.empty())
      message += " (did you mean " + guess + "?)";
    throw ConfigError(message);
  }
}

void apply_env_overrides(Config& config, const Environment& env) {
  check_variable_names(env);
  for (const KeySpec& k : kKeys) {
    const std::string var(EnvName(k).view());
    const char* value = env.get(var.c_str());
    if (value == nullptr) continue;
    if (!k.assign(config, value))
      throw ConfigError("environment variable " + var + ": " + bad_value(k, value));
  }
}

struct FileCloser {
  void operator()(std::FILE* f) const noexcept { std::fclose(f); }
};

// The file's text; nullopt when `missing_ok` and the file does not exist.
std::optional<std::string> read_file(const std::string& path, bool missing_ok = false) {
  auto fail = [&path](int err) -> ConfigError {
    const std::string reason = err != 0 ? std::generic_category().message(err) : "read error";
    return ConfigError("cannot read config file '" + path + "': " + reason);
  };
  errno = 0;
  const std::unique_ptr<std::FILE, FileCloser> f{std::fopen(path.c_str(), "rb")};
  if (!f && missing_ok && (errno == ENOENT || errno == ENOTDIR)) return std::nullopt;
  if (!f) throw fail(errno);
  std::string text;
  std::array<char, 4096> buf;
  std::size_t n = 0;
  while ((n = std::fread(buf.data(), 1, buf.size(), f.get())) > 0) text.append(buf.data(), n);
  if (std::ferror(f.get())) throw fail(errno);
  return text;
}

}  // namespace

Environment process_environment() {
  return {[](const char* name) { return std::getenv(name); },
          [] {
            std::vector<std::string> names;
            for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
              const std::string_view entry(*e);
              if (entry.starts_with(kEnvPrefix))
                names.emplace_back(entry.substr(0, entry.find('=')));
            }
            return names;
          }};
}

std::string_view default_config_file() noexcept { return P11MUX_DEFAULT_CONFIG_FILE; }

Config parse_config(std::string_view text, std::string_view file_name, const Environment& env) {
  Config config;
  IniParser(file_name, config).parse(text);
  apply_env_overrides(config, env);
  return config;
}

Config load_config(const Environment& env, std::string_view default_file) {
  if (const char* path = env.get(kConfigFileVar); path != nullptr) {
    if (*path == '\0') return parse_config({}, {}, env);  // set but empty: no file at all
    return parse_config(*read_file(path), path, env);
  }
  const std::string path(default_file);
  if (path.empty()) return parse_config({}, {}, env);
  const std::optional<std::string> text = read_file(path, true);
  return parse_config(text.value_or(std::string()), path, env);
}

std::string_view to_string(SessionMode mode) noexcept { return ValueKind<SessionMode>::name(mode); }
std::string_view to_string(LockingMode mode) noexcept { return ValueKind<LockingMode>::name(mode); }
std::string_view to_string(BindMode mode) noexcept { return ValueKind<BindMode>::name(mode); }

}  // namespace p11mux
