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
constexpr std::array<EnumName<Balance>, 3> names_of(std::type_identity<Balance>) {
  return {{{"least-busy", Balance::least_busy},
           {"round-robin", Balance::round_robin},
           {"primary", Balance::primary}}};
}
constexpr std::array<EnumName<ObjectKey>, 4> names_of(std::type_identity<ObjectKey>) {
  return {{{"id-or-label", ObjectKey::id_or_label},
           {"id", ObjectKey::id},
           {"label", ObjectKey::label},
           {"id+label", ObjectKey::id_and_label}}};
}
constexpr std::array<EnumName<GenerateTokenKeys>, 2> names_of(
    std::type_identity<GenerateTokenKeys>) {
  return {{{"refuse", GenerateTokenKeys::refuse}, {"primary", GenerateTokenKeys::primary}}};
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

// ---- Named sections: [backend.NAME], [group.NAME] ----------------------------------------

// A NAME becomes part of environment variable names (upper-cased), so it is
// lower case: one spelling per variable. A group's NAME is also its token's label.
bool valid_name(std::string_view name) noexcept {
  if (name.empty() || name.size() > kMaxSectionName || name.front() < 'a' || name.front() > 'z')
    return false;
  return std::all_of(name.begin(), name.end(), [](char ch) {
    return (ch >= 'a' && ch <= 'z') || (ch >= '0' && ch <= '9') || ch == '_';
  });
}

std::string name_rule() {
  return "a name is a lower-case letter, then lower-case letters, digits or '_', at most " +
         std::to_string(kMaxSectionName) + " in all (it is part of P11MUX_* variable names)";
}

// Blanks around list entries, as the [policy] tokens list trims them (policy/filters.cpp).
constexpr std::string_view kEntryBlanks = " \t";

std::string_view trim_blanks(std::string_view s) {
  const auto first = s.find_first_not_of(kEntryBlanks);
  if (first == std::string_view::npos) return {};
  return s.substr(first, s.find_last_not_of(kEntryBlanks) - first + 1);
}

// `members`: BACKEND/label:LABEL or BACKEND/serial:SERIAL, comma-separated,
// blanks around each part ignored, empty entries skipped (as in [policy]
// tokens). A LABEL or SERIAL in double quotes is taken as written, commas
// and leading blanks included (no escapes: it cannot hold '"'). Trailing
// blanks can never match: a token's field is compared without its padding
// (policy/filters.hpp, unpadded), and the padding is blanks.
template <>
struct ValueKind<std::vector<GroupMember>> {
  // Throws ConfigError (without a location: the caller adds it) for a bad entry.
  static bool parse(std::string_view text, std::vector<GroupMember>& out) {
    std::vector<GroupMember> members;
    while (!(text = trim_blanks(text)).empty()) {
      if (text.front() == ',') {
        text.remove_prefix(1);
        continue;
      }
      members.push_back(parse_member(text));
      if (!text.empty()) text.remove_prefix(1);  // the ',' parse_member stopped at
    }
    out = std::move(members);
    return true;
  }
  static std::string expected() {
    return "BACKEND/label:LABEL or BACKEND/serial:SERIAL, comma-separated";
  }

 private:
  [[noreturn]] static void fail(std::string_view entry, const std::string& why) {
    throw ConfigError("'" + std::string(trim_blanks(entry)) + "' " + why);
  }

  // One entry from the front of `text`, which is left at the ',' after it (or empty).
  static GroupMember parse_member(std::string_view& text) {
    const std::string_view start = text;
    // The entry as far as parsed, up to the next ',': what a message quotes.
    auto entry = [&] {
      const std::size_t done = start.size() - text.size();
      return start.substr(0, done + std::min(text.find(','), text.size()));
    };
    const auto slash = text.find('/');
    if (slash == std::string_view::npos || slash > text.find(','))
      fail(entry(), "is not BACKEND/label:LABEL or BACKEND/serial:SERIAL");
    GroupMember m;
    m.backend = std::string(trim_blanks(text.substr(0, slash)));
    if (!valid_name(m.backend)) fail(entry(), "names backend '" + m.backend + "': " + name_rule());
    text = trim_blanks(text.substr(slash + 1));
    if (text.starts_with("label:")) {
      m.by = GroupMember::By::label;
    } else if (text.starts_with("serial:")) {
      m.by = GroupMember::By::serial;
    } else {
      fail(entry(), "names its token neither by label: nor by serial:");
    }
    text = trim_blanks(text.substr(text.find(':') + 1));
    std::string_view value;
    if (text.starts_with('"')) {
      const auto close = text.find('"', 1);
      if (close == std::string_view::npos) fail(start, "has no closing '\"'");
      value = text.substr(1, close - 1);
      text = trim_blanks(text.substr(close + 1));
      if (!text.empty() && text.front() != ',') fail(entry(), "has text after its closing '\"'");
      if (!value.empty() && kEntryBlanks.find(value.back()) != std::string_view::npos)
        fail(entry(), "ends in blanks: a token's padding is blanks, so it can never match");
    } else {
      const auto end = std::min(text.find(','), text.size());
      value = trim_blanks(text.substr(0, end));
      text.remove_prefix(end);
    }
    if (value.empty()) fail(entry(), "names no token");
    // A token's label is 32 bytes, its serial number 16 (CK_TOKEN_INFO).
    const bool label = m.by == GroupMember::By::label;
    const std::size_t most = label ? 32 : 16;
    if (value.size() > most) {
      fail(entry(), std::string("is longer than a token's ") + (label ? "label" : "serial number") +
                        " (" + std::to_string(most) + " bytes): it can never match");
    }
    m.token = std::string(value);
    return m;
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

// The keys of a named section, of Target (NamedBackend or Group), one table per kind.
template <class Target>
struct FieldSpec {
  std::string_view name;
  bool (*assign)(Target&, std::string_view text);  // false: bad value; may throw ConfigError
  std::string (*expected)();
};

template <class Target, auto Member>
constexpr FieldSpec<Target> field(std::string_view name) {
  using Field = std::remove_reference_t<decltype((std::declval<Target&>().*Member))>;
  static_assert(!std::is_same_v<Field, unsigned long>, "a numeric key has a range: number_field");
  using Kind = ValueKind<Field>;
  return {name, [](Target& t, std::string_view text) { return Kind::parse(text, t.*Member); },
          &Kind::expected};
}

template <class Target, unsigned long Min, unsigned long Max, auto Member>
constexpr FieldSpec<Target> number_field(std::string_view name) {
  using Kind = Number<Min, Max>;
  return {name, [](Target& t, std::string_view text) { return Kind::parse(text, t.*Member); },
          &Kind::expected};
}

// [backend.NAME]: the keys of the unnamed [backend] that belong to one module.
constexpr std::array kBackendKeys{
    field<NamedBackend, &NamedBackend::module>("module"),
    field<NamedBackend, &NamedBackend::locking>("locking"),
    field<NamedBackend, &NamedBackend::init_reserved>("init_reserved"),
};

constexpr unsigned long kOneDayS = 24UL * 3600;

constexpr std::array kGroupKeys{
    field<Group, &Group::members>("members"),
    field<Group, &Group::balance>("balance"),
    number_field<Group, 1, kOneDayS, &Group::recovery_interval_s>("recovery_interval_s"),
    number_field<Group, 1, kOneDayS, &Group::hang_timeout_s>("hang_timeout_s"),
    field<Group, &Group::hide_members>("hide_members"),
    field<Group, &Group::object_key>("object_key"),
    field<Group, &Group::generate_token_keys>("generate_token_keys"),
};

// What the parser needs to know of each kind of named section.
template <class Target>
struct Kind;
template <>
struct Kind<NamedBackend> {
  static constexpr std::string_view section = "backend";
  static constexpr const auto& keys = kBackendKeys;
  static std::vector<NamedBackend>& in(Config& c) { return c.backends; }
};
template <>
struct Kind<Group> {
  static constexpr std::string_view section = "group";
  static constexpr const auto& keys = kGroupKeys;
  static std::vector<Group>& in(Config& c) { return c.groups; }
};

// Where a value came from, as messages start: "FILE:LINE" or "environment variable NAME".
struct Setting {
  std::string text;
  std::string where;
};

// A named section as read, before its values are converted and checked.
template <class Target>
struct NamedSection {
  std::string name;
  std::string where;  // FILE:LINE of its header
  std::array<std::optional<Setting>, Kind<Target>::keys.size()> settings{};
};

// Where each setting came from, for messages that name two places.
struct Sources {
  std::array<std::string, kKeys.size()> fixed{};  // by index in kKeys; empty: not set
  std::vector<NamedSection<NamedBackend>> backends;
  std::vector<NamedSection<Group>> groups;

  template <class Target>
  std::vector<NamedSection<Target>>& of() {
    if constexpr (std::is_same_v<Target, Group>)
      return groups;
    else
      return backends;
  }
};

constexpr std::string_view kEnvPrefix = "P11MUX_";

std::string upper(std::string_view s) {
  std::string out(s);
  for (char& ch : out)
    if (ch >= 'a' && ch <= 'z') ch = static_cast<char>(ch - 'a' + 'A');
  return out;
}

// P11MUX_<KIND>_<NAME>_<KEY>: P11MUX_GROUP_SIGNING_MEMBERS.
std::string named_variable(std::string_view kind, std::string_view name, std::string_view key) {
  return std::string(kEnvPrefix) + upper(kind) + "_" + upper(name) + "_" + upper(key);
}
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

// What an unknown key of [backend.NAME] or [group.NAME] most likely meant (a
// key close to it, as check_variable_names guesses for a variable), else the
// keys such a section has: "unknown key 'balanse'" alone leaves the reader to
// find the spelling in the README.
template <class Target>
std::string named_key_hint(std::string_view unknown) {
  std::string best;
  std::size_t best_distance = std::max<std::size_t>(2, unknown.size() / 4) + 1;  // "close"
  std::string all;
  for (const FieldSpec<Target>& f : Kind<Target>::keys) {
    if (const std::size_t d = edit_distance(unknown, f.name); d < best_distance) {
      best_distance = d;
      best.assign(f.name);
    }
    all += (all.empty() ? "" : ", ") + std::string(f.name);
  }
  if (!best.empty()) return " (did you mean '" + best + "'?)";
  return " (the keys of [" + std::string(Kind<Target>::section) + ".NAME]: " + all + ")";
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
  IniParser(std::string_view file_name, Config& config, Sources& sources)
      : file_name_(file_name), config_(config), sources_(sources) {}

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
    throw ConfigError(at(line_no) + ": " + what);
  }
  std::string at(std::size_t line_no) const {
    return std::string(file_name_) + ":" + std::to_string(line_no);
  }

  void parse_line(std::string_view line, std::size_t line_no) {
    if (nothing_but_comment(line)) return;
    if (line.front() == '[') return parse_section(line, line_no);

    const auto eq = line.find('=');
    if (eq == std::string_view::npos)
      fail(line_no, "expected 'key = value' or '[section]', got '" + std::string(line) + "'");
    const std::string_view name = trim(line.substr(0, eq));
    if (name.empty()) fail(line_no, "missing key before '='");
    if (!sources_.backends.empty() && named_ == Named::backend)
      return named_key(sources_.backends.back(), name, line.substr(eq + 1), line_no);
    if (!sources_.groups.empty() && named_ == Named::group)
      return named_key(sources_.groups.back(), name, line.substr(eq + 1), line_no);
    const KeySpec* k = find_key(section_, name);
    if (k == nullptr) fail(line_no, "unknown " + key_in_section(section_, name));
    const auto index = static_cast<std::size_t>(k - kKeys.data());
    std::size_t& first = first_line_[index];
    if (first != 0)
      fail(line_no, "duplicate " + key_in_section(section_, name) + " (first set on line " +
                        std::to_string(first) + ")");
    first = line_no;
    sources_.fixed[index] = at(line_no);
    const std::string_view value = parse_value(line.substr(eq + 1), name, line_no);
    if (!k->assign(config_, value)) fail(line_no, bad_value(*k, value));
  }

  // A key of [backend.NAME] or [group.NAME]: kept as text (with where it was
  // set) until the environment has had its say; converted by finish_named.
  template <class Target>
  void named_key(NamedSection<Target>& section, std::string_view name, std::string_view raw,
                 std::size_t line_no) {
    const std::string full = std::string(Kind<Target>::section) + "." + section.name;
    const auto& keys = Kind<Target>::keys;
    const auto k = std::find_if(keys.begin(), keys.end(),
                                [name](const FieldSpec<Target>& f) { return f.name == name; });
    if (k == keys.end())
      fail(line_no, "unknown " + key_in_section(full, name) + named_key_hint<Target>(name));
    std::optional<Setting>& setting = section.settings[static_cast<std::size_t>(k - keys.begin())];
    if (setting) {
      fail(line_no,
           "duplicate " + key_in_section(full, name) + " (first set on " + setting->where + ")");
    }
    setting = Setting{std::string(parse_value(raw, full, name, line_no)), at(line_no)};
  }

  void parse_section(std::string_view line, std::size_t line_no) {
    const auto close = line.find(']');
    if (close == std::string_view::npos)
      fail(line_no, "unterminated section header '" + std::string(line) + "'");
    const std::string_view rest = trim(line.substr(close + 1));
    if (!nothing_but_comment(rest))
      fail(line_no, "unexpected text '" + std::string(rest) + "' after section header");
    const std::string_view name = trim(line.substr(1, close - 1));
    named_ = Named::none;
    if (name.starts_with("backend.")) return open_named(sources_.backends, name, line_no);
    if (name.starts_with("group.")) return open_named(sources_.groups, name, line_no);
    if (!known_section(name)) {
      fail(line_no, "unknown section [" + std::string(name) + "]" +
                        (name == "group" ? " (a group is [group.NAME])" : ""));
    }
    section_ = name;
  }

  template <class Target>
  void open_named(std::vector<NamedSection<Target>>& sections, std::string_view header,
                  std::size_t line_no) {
    const std::string_view name = header.substr(header.find('.') + 1);
    if (!valid_name(name)) {
      fail(line_no, "bad section name [" + std::string(header) + "]: " + name_rule() + " (e.g. [" +
                        std::string(Kind<Target>::section) + ".hsm1])");
    }
    for (const NamedSection<Target>& s : sections) {
      if (s.name == name)
        fail(line_no, "duplicate section [" + std::string(header) + "] (first on " + s.where + ")");
    }
    sections.push_back({std::string(name), at(line_no)});
    named_ = std::is_same_v<Target, Group> ? Named::group : Named::backend;
  }

  std::string_view parse_value(std::string_view raw, std::string_view name,
                               std::size_t line_no) const {
    return parse_value(raw, section_, name, line_no);
  }
  std::string_view parse_value(std::string_view raw, std::string_view section,
                               std::string_view name, std::size_t line_no) const {
    const std::string_view v = trim(raw);
    if (v.empty() || v.front() != '"') return trim(strip_trailing_comment(raw));
    const auto close = v.find('"', 1);
    if (close == std::string_view::npos)
      fail(line_no, "unterminated quoted value for " + key_in_section(section, name));
    const std::string_view rest = trim(v.substr(close + 1));
    if (!nothing_but_comment(rest))
      fail(line_no, "unexpected text '" + std::string(rest) + "' after quoted value for " +
                        key_in_section(section, name));
    return v.substr(1, close - 1);
  }

  enum class Named { none, backend, group };  // the section being read, if named

  std::string_view file_name_;
  Config& config_;
  Sources& sources_;
  std::string_view section_;  // empty: top-level
  Named named_ = Named::none;
  std::array<std::size_t, kKeys.size()> first_line_{};  // 0: not seen yet
};

// ---- Environment overrides ---------------------------------------------------------------

// The variables of the named sections the file defines, each with where it goes.
struct NamedVariable {
  std::string name;
  std::optional<Setting>* setting;
  std::string section;  // "[group.signing]", for messages
};

template <class Target>
void add_named_variables(std::vector<NamedSection<Target>>& sections,
                         std::vector<NamedVariable>& out) {
  for (NamedSection<Target>& s : sections) {
    for (std::size_t i = 0; i < Kind<Target>::keys.size(); ++i) {
      out.push_back({named_variable(Kind<Target>::section, s.name, Kind<Target>::keys[i].name),
                     &s.settings[i],
                     "[" + std::string(Kind<Target>::section) + "." + s.name + "] " +
                         std::string(Kind<Target>::keys[i].name)});
    }
  }
}

// Two sections whose keys map to one variable ([group.a] hide_members and
// [group.a_hide] members: P11MUX_GROUP_A_HIDE_MEMBERS) could not be told
// apart in the environment: an error, before any variable is read.
void check_distinct(const std::vector<NamedVariable>& vars) {
  for (std::size_t i = 0; i < vars.size(); ++i) {
    for (std::size_t j = i + 1; j < vars.size(); ++j) {
      if (vars[i].name == vars[j].name) {
        throw ConfigError(vars[i].section + " and " + vars[j].section +
                          " map to the same environment variable " + vars[i].name +
                          ": rename one of the sections");
      }
    }
    for (const KeySpec& k : kKeys) {
      if (EnvName(k).view() == vars[i].name) {
        throw ConfigError(vars[i].section + " and " + describe(k) +
                          " map to the same environment variable " + vars[i].name +
                          ": rename the section");
      }
    }
  }
}

// The variable a misspelled one most likely meant, or empty: the nearest known name by edit
// distance (case aside), when it is close; or the one key whose name the variable gives
// without its section (P11MUX_LOCKING: P11MUX_BACKEND_LOCKING).
std::string nearest_variable(std::string_view unknown, const std::vector<NamedVariable>& named) {
  const std::string upper_name = upper(unknown);
  const std::string_view rest = std::string_view(upper_name).substr(kEnvPrefix.size());
  std::string best;
  std::size_t best_distance = std::max<std::size_t>(2, rest.size() / 4) + 1;  // "close"
  auto consider = [&](std::string_view known) {
    const std::size_t d = edit_distance(upper_name, known);
    if (d < best_distance) {
      best_distance = d;
      best.assign(known);
    }
  };
  consider(kConfigFileVar);
  for (const KeySpec& k : kKeys) consider(EnvName(k).view());
  for (const NamedVariable& v : named) consider(v.name);
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

// P11MUX_<KIND>_<NAME>_<KEY> for a NAME the file does not define: the section
// it would set, e.g. "[group.signing]"; empty if the variable has not that form.
template <class Target>
std::string undefined_section(std::string_view var) {
  const std::string prefix = std::string(kEnvPrefix) + upper(Kind<Target>::section) + "_";
  if (!var.starts_with(prefix)) return {};
  const std::string_view rest = var.substr(prefix.size());
  std::string name;
  for (const FieldSpec<Target>& f : Kind<Target>::keys) {  // the longest key that fits
    const std::string suffix = "_" + upper(f.name);
    if (rest.size() <= suffix.size() || !rest.ends_with(suffix)) continue;
    const std::string_view candidate = rest.substr(0, rest.size() - suffix.size());
    if (name.empty() || candidate.size() < name.size()) name = std::string(candidate);
  }
  if (name.empty()) return {};
  for (char& ch : name)
    if (ch >= 'A' && ch <= 'Z') ch = static_cast<char>(ch - 'A' + 'a');
  return "[" + std::string(Kind<Target>::section) + "." + name + "]";
}

bool reserved_variable(std::string_view name) {
  return std::any_of(kReservedEnvPrefixes.begin(), kReservedEnvPrefixes.end(),
                     [name](std::string_view prefix) { return name.starts_with(prefix); });
}

bool known_variable(std::string_view name, const std::vector<NamedVariable>& named) {
  if (name == kConfigFileVar) return true;
  return std::any_of(kKeys.begin(), kKeys.end(),
                     [name](const KeySpec& k) { return EnvName(k).view() == name; }) ||
         std::any_of(named.begin(), named.end(),
                     [name](const NamedVariable& v) { return v.name == name; });
}

// A P11MUX_* variable that names no setting is an error, as an unknown key in the file is:
// ignored, a typo would leave the setting at its default without a word. So is one for a
// named section the file does not define: the environment overrides, it does not add.
void check_variable_names(const Environment& env, const std::vector<NamedVariable>& named) {
  std::vector<std::string> names = env.names();
  std::sort(names.begin(), names.end());  // the same variable reported whatever environ's order
  for (const std::string& name : names) {
    if (!name.starts_with(kEnvPrefix) || known_variable(name, named) || reserved_variable(name))
      continue;
    std::string message = "unknown environment variable " + name;
    if (const std::string guess = nearest_variable(name, named); !guess.empty()) {
      message += " (did you mean " + guess + "?)";
    } else if (std::string section = undefined_section<Group>(name);
               !section.empty() || !(section = undefined_section<NamedBackend>(name)).empty()) {
      message += ": the configuration has no " + section +
                 " (the environment sets keys of the sections the file defines; it adds none)";
    }
    throw ConfigError(message);
  }
}

void apply_env_overrides(Config& config, const Environment& env, Sources& sources) {
  std::vector<NamedVariable> named;
  add_named_variables(sources.backends, named);
  add_named_variables(sources.groups, named);
  check_distinct(named);
  check_variable_names(env, named);
  for (std::size_t i = 0; i < kKeys.size(); ++i) {
    const KeySpec& k = kKeys[i];
    const std::string var(EnvName(k).view());
    const char* value = env.get(var.c_str());
    if (value == nullptr) continue;
    sources.fixed[i] = "environment variable " + var;
    if (!k.assign(config, value))
      throw ConfigError("environment variable " + var + ": " + bad_value(k, value));
  }
  for (NamedVariable& v : named) {
    if (const char* value = env.get(v.name.c_str()); value != nullptr)
      *v.setting = Setting{value, "environment variable " + v.name};
  }
}

// ---- Named sections: converted, then checked as a whole ----------------------------------

template <class Target>
void convert_named(Config& config, std::vector<NamedSection<Target>>& sections) {
  for (const NamedSection<Target>& s : sections) {
    Target target;
    target.name = s.name;
    const std::string full = std::string(Kind<Target>::section) + "." + s.name;
    for (std::size_t i = 0; i < Kind<Target>::keys.size(); ++i) {
      const std::optional<Setting>& setting = s.settings[i];
      if (!setting) continue;
      const FieldSpec<Target>& f = Kind<Target>::keys[i];
      const std::string what = "[" + full + "] " + std::string(f.name);
      bool ok = false;
      try {
        ok = f.assign(target, setting->text);
      } catch (const ConfigError& e) {
        throw ConfigError(setting->where + ": " + what + ": " + e.what());
      }
      if (!ok) {
        throw ConfigError(setting->where + ": bad value '" + setting->text + "' for " + what +
                          " (expected " + f.expected() + ")");
      }
    }
    Kind<Target>::in(config).push_back(std::move(target));
  }
}

// Where a key of a named section was set, else where its section starts.
template <class Target>
const std::string& where_key(const NamedSection<Target>& s, std::string_view key) {
  for (std::size_t i = 0; i < Kind<Target>::keys.size(); ++i)
    if (Kind<Target>::keys[i].name == key && s.settings[i]) return s.settings[i]->where;
  return s.where;
}

std::string where_fixed(const Sources& sources, std::string_view section, std::string_view name) {
  const KeySpec* k = find_key(section, name);
  return sources.fixed[static_cast<std::size_t>(k - kKeys.data())];
}

ConfigError member_error(const std::string& where, const Group& group, const std::string& shown,
                         const std::string& what) {
  return ConfigError(where + ": [group." + group.name + "] members: '" + shown + "' " + what);
}

// The rules between sections (docs/groups.md, "Configuration"). A group's
// slot would stand beside the top-level module's slots with no rule for which
// settings apply where: one or the other.
void check_named(const Config& config, const Sources& sources) {
  if (!config.has_groups()) return;
  const std::string first_named =
      !sources.groups.empty()
          ? "[group." + sources.groups[0].name + "] (" + sources.groups[0].where + ")"
          : "[backend." + sources.backends[0].name + "] (" + sources.backends[0].where + ")";
  if (!config.module.empty()) {
    throw ConfigError(where_fixed(sources, "", "module") +
                      ": the top-level module cannot be combined with " + first_named +
                      ": a configuration has one backend (top-level module, [backend]) or named "
                      "backends in groups; move the module into a [backend.NAME] section");
  }
  if (config.backend.locking != LockingMode::automatic) {
    throw ConfigError(where_fixed(sources, "backend", "locking") +
                      ": [backend] locking is the top-level module's, and there is none with " +
                      first_named + ": set locking in each [backend.NAME]");
  }
  if (config.backend.init_reserved) {
    throw ConfigError(where_fixed(sources, "backend", "init_reserved") +
                      ": [backend] init_reserved is the top-level module's, and there is none "
                      "with " +
                      first_named + ": set init_reserved in each [backend.NAME]");
  }
  for (std::size_t i = 0; i < config.backends.size(); ++i) {
    if (config.backends[i].module.empty()) {
      const NamedSection<NamedBackend>& s = sources.backends[i];
      throw ConfigError(where_key(s, "module") + ": [backend." + s.name +
                        "] has no module (module = PATH, or " +
                        named_variable("backend", s.name, "module") + ")");
    }
  }
  std::vector<bool> used(config.backends.size(), false);
  for (std::size_t g = 0; g < config.groups.size(); ++g) {
    const Group& group = config.groups[g];
    const NamedSection<Group>& s = sources.groups[g];
    const std::string& where = where_key(s, "members");
    if (group.members.empty()) {
      throw ConfigError(where + ": [group." + group.name +
                        "] has no members (members = BACKEND/label:LABEL, ...)");
    }
    for (std::size_t m = 0; m < group.members.size(); ++m) {
      const GroupMember& member = group.members[m];
      const std::string shown = member.backend +
                                (member.by == GroupMember::By::label ? "/label:" : "/serial:") +
                                member.token;
      const NamedBackend* backend = config.find_backend(member.backend);
      if (backend == nullptr) {
        throw member_error(where, group, shown,
                           "names backend '" + member.backend + "', and there is no [backend." +
                               member.backend + "] section");
      }
      used[static_cast<std::size_t>(backend - config.backends.data())] = true;
      for (std::size_t earlier = 0; earlier < m; ++earlier) {
        const GroupMember& e = group.members[earlier];
        if (e.backend == member.backend && e.by == member.by && e.token == member.token) {
          throw member_error(where, group, shown, "is listed twice");
        }
      }
    }
  }
  for (std::size_t i = 0; i < config.backends.size(); ++i) {
    if (!used[i]) {
      throw ConfigError(sources.backends[i].where + ": [backend." + config.backends[i].name +
                        "] is a member of no group (a named backend serves groups only)");
    }
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
  Sources sources;
  IniParser(file_name, config, sources).parse(text);
  apply_env_overrides(config, env, sources);
  convert_named(config, sources.backends);
  convert_named(config, sources.groups);
  check_named(config, sources);
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
std::string_view to_string(Balance balance) noexcept { return ValueKind<Balance>::name(balance); }
std::string_view to_string(ObjectKey key) noexcept { return ValueKind<ObjectKey>::name(key); }
std::string_view to_string(GenerateTokenKeys what) noexcept {
  return ValueKind<GenerateTokenKeys>::name(what);
}

}  // namespace p11mux
