// p11mux configuration: an INI file named by P11MUX_CONFIG (or, when that is unset, the
// default file, ${sysconfdir}/p11mux/p11mux.conf, if it exists), overridden key by key by
// P11MUX_* environment variables.
//
// File syntax (keys and section names are case-sensitive, lower case):
//
//   # whole-line comment (also ';')
//   module = /usr/lib/softhsm/libsofthsm2.so      # trailing comment after whitespace
//   session_mode = multiplex
//   [backend]
//   locking = auto
//   init_reserved = "configdir='sql:/tmp/db' certPrefix='' keyPrefix='' secmod='secmod.db'"
//   [log]
//   level = debug
//   file = /var/log/p11mux.log
//   [metrics]
//   listen = 127.0.0.1:9464
//   [policy]
//   mechanisms_deny = CKM_RSA_PKCS, CKM_RSA_X_509
//
// Keys before any section are top-level. A value may be double-quoted (the quotes are
// stripped, there are no escapes, so a quoted value cannot contain '"'); an unquoted value
// ends at a '#' or ';' that follows whitespace. A key may appear once per file.
//
// Named sections (several HSMs as one slot, docs/groups.md; their slots served, not yet sessions):
//
//   [backend.hsm1]
//   module = /usr/lib/vendor/libvendor.so
//   [group.signing]
//   members = hsm1/label:signing, hsm1/serial:4711, hsm2/label:"EU, signing"
//   balance = least-busy
//
// In `members`, a label in double quotes may hold commas (the value as a whole is then not
// quoted). A label holding " #" or " ;" needs the whole value quoted (its labels then cannot
// be), or the environment, whose values have no comments.
//
// Environment overrides: P11MUX_<KEY> for top-level keys, P11MUX_<SECTION>_<KEY> otherwise
// (upper case), e.g. P11MUX_MODULE, P11MUX_BACKEND_LOCKING, P11MUX_LOG_LEVEL; for a named
// section P11MUX_<KIND>_<NAME>_<KEY>, e.g. P11MUX_BACKEND_HSM1_MODULE,
// P11MUX_GROUP_SIGNING_MEMBERS. A NAME is lower case ([a-z][a-z0-9_]*), so the mapping is
// one-to-one; a variable only overrides a key of a section the file defines (one naming
// any other section is an error). A set variable wins over the file; an empty value means
// "empty" (for module and init_reserved: not configured). Any other P11MUX_* variable is an
// error, like an unknown key in the file (a misspelled setting must not be silently
// ignored), except under the prefixes reserved for the project's own tools
// (kReservedEnvPrefixes), which p11mux never reads.
#pragma once

#include <spdlog/common.h>

#include <array>
#include <cstddef>
#include <functional>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace p11mux {

// How application sessions map onto backend sessions.
enum class SessionMode { serialize, multiplex };  // config text: serialize|multiplex

// What the proxy asks of the backend's C_Initialize for locking.
enum class LockingMode { automatic, os, callbacks, none };  // config text: auto|os|callbacks|none

// When a virtual session holds a backend session (README, "Session pool"):
// from C_OpenSession to C_CloseSession (open), or only while it has state to
// keep (state); auto is state in multiplex mode, open in serialize mode.
enum class BindMode { automatic, open, state };  // config text: auto|open|state

// Whether C_GetInterfaceList/C_GetInterface pass on the backend's vendor interfaces.
enum class VendorInterfaces { hide, pass };  // config text: hide|pass

// ---- Several HSMs as one slot (issue 15, docs/groups.md) -----------------
// Parsed and checked here; the runtime shows each group as a slot
// (group/group_runtime.hpp) but opens no session on it yet.

// Where a group's calls go: the member with the fewest calls in flight, each
// member in turn, or the first healthy member until it is at capacity.
enum class Balance { least_busy, round_robin, primary };  // least-busy|round-robin|primary

// How a token object is recognised on every member (always with its
// CKA_CLASS): by CKA_ID, or CKA_LABEL where CKA_ID is empty (id-or-label);
// by CKA_ID alone; by CKA_LABEL alone; by both.
enum class ObjectKey { id_or_label, id, label, id_and_label };  // id-or-label|id|label|id+label

// C_GenerateKey / C_GenerateKeyPair with CKA_TOKEN=true on a group: a key
// made on one HSM cannot in general be copied to the others, so refused
// (CKR_ATTRIBUTE_VALUE_INVALID and a log line), or made on the primary only.
enum class GenerateTokenKeys { refuse, primary };  // refuse|primary

// [backend.NAME]: one PKCS#11 module, which may serve several members.
struct NamedBackend {
  std::string name;                              // NAME: [a-z][a-z0-9_]*, at most kMaxSectionName
  std::string module;                            // module: path of the PKCS#11 library (required)
  LockingMode locking = LockingMode::automatic;  // locking, as [backend] locking
  std::optional<std::string> init_reserved;      // init_reserved, as [backend] init_reserved
};

// One member of a group: a token of a named backend, by label or serial
// number, compared without the token's padding (group/group_slot.hpp,
// member_token_matches).
struct GroupMember {
  enum class By { label, serial };
  std::string backend;  // a [backend.NAME]
  By by = By::label;
  std::string token;  // the label or serial number, without padding
};

// [group.NAME]: several members shown as one slot whose token is labelled NAME.
struct Group {
  std::string name;  // NAME: as a backend's; the group token's label
  // members: BACKEND/label:LABEL or BACKEND/serial:SERIAL, comma-separated;
  // a LABEL holding a comma is written in double quotes (label:"a, b").
  std::vector<GroupMember> members;
  Balance balance = Balance::least_busy;   // balance
  unsigned long recovery_interval_s = 60;  // recovery_interval_s: probe a down member
  // hang_timeout_s: a call in flight this long marks its member down
  // (group/member_health.hpp); above the slowest legitimate call (key generation).
  unsigned long hang_timeout_s = 60;
  bool hide_members = true;                       // hide_members: only the group's slot is seen
  ObjectKey object_key = ObjectKey::id_or_label;  // object_key
  GenerateTokenKeys generate_token_keys = GenerateTokenKeys::refuse;  // generate_token_keys
};

// The longest NAME of [backend.NAME] and [group.NAME]: a group's name is its
// token's label, 32 bytes.
inline constexpr std::size_t kMaxSectionName = 32;

struct Config {
  std::string
      module;  // top-level `module`: path of the backend PKCS#11 library; empty = not configured
  SessionMode session_mode = SessionMode::serialize;  // top-level `session_mode`
  struct Backend {
    LockingMode locking = LockingMode::automatic;  // [backend] locking
    // [backend] init_reserved: passed as pReserved to the backend's C_Initialize (NSS
    // softoken needs one). An empty value leaves it unset (pReserved = NULL).
    std::optional<std::string> init_reserved;
    // [backend] vendor_interfaces: pass lists the backend's non-standard interfaces and
    // returns them unchanged (their calls bypass p11mux: no virtual sessions, no serialization).
    VendorInterfaces vendor_interfaces = VendorInterfaces::hide;
  } backend;
  struct Log {
    spdlog::level::level_enum level =
        spdlog::level::warn;  // [log] level: off|error|warn|info|debug|trace
    std::string file;         // [log] file: path; empty = stderr
    // Trace filters. [log] functions: comma-separated names; "-C_X" leaves one out; empty = all.
    std::string functions;
    unsigned long min_duration_us =
        0;               // [log] min_duration_us: trace only calls at least this slow
    bool async = false;  // [log] async: a p11mux thread writes; callers never wait on I/O
    unsigned long rotate_size_kb =
        0;  // [log] rotate_size_kb: rotate the file at this size (0: never)
    unsigned long rotate_files = 5;  // [log] rotate_files: rotated files kept
  } log;
  // Metrics and the stats endpoint (README, "Observability").
  struct Metrics {
    bool enabled = false;  // [metrics] enabled (also on when listen, signal or summary is set)
    std::string listen;    // [metrics] listen: HOST:PORT or a unix socket path; empty = no endpoint
    bool allow_remote = false;  // [metrics] allow_remote: let listen name a non-loopback address
    bool signal = false;        // [metrics] signal: SIGUSR1 logs the summary table
    bool summary = false;       // [metrics] summary: C_Finalize logs the summary table
  } metrics;
  // The backend session pool (README, "Session pool").
  struct Pool {
    std::optional<unsigned long> max_sessions;  // [pool] max_sessions: unset = the token's limit
    unsigned long wait_ms = 5000;      // [pool] wait_ms: wait at the limit, then CKR_SESSION_COUNT
    unsigned long prewarm = 0;         // [pool] prewarm: sessions opened at C_Initialize
    bool keep_login = false;           // [pool] keep_login: stay logged in with no app session
    unsigned long idle_timeout_s = 0;  // [pool] idle_timeout_s: close idle sessions (0: never)
    unsigned long keepalive_s = 0;     // [pool] keepalive_s: ping idle sessions (0: never)
    BindMode bind = BindMode::automatic;  // [pool] bind
    // [pool] max_virtual_sessions: the application's sessions per token at
    // most; beyond it C_OpenSession answers CKR_SESSION_COUNT.
    unsigned long max_virtual_sessions = 100'000;
  } pool;
  // [pool] bind, with auto resolved by the session mode.
  bool binds_on_state() const noexcept {
    return pool.bind == BindMode::state ||
           (pool.bind == BindMode::automatic && session_mode == SessionMode::multiplex);
  }
  // What the application may do (README, "Policy"). Kept as written: the
  // names are checked, and turned into sets, by policy/ at C_Initialize.
  struct Policy {
    std::string mechanisms_allow;  // [policy] mechanisms_allow: CKM_ names or 0x hex; empty = all
    std::string mechanisms_deny;   // [policy] mechanisms_deny: CKM_ names or 0x hex
    std::string functions_deny;    // [policy] functions_deny: C_ names
    bool read_only = false;        // [policy] read_only: nothing on the token changes
    std::string protect;           // [policy] protect: attack rules (policy/protect.hpp), or all
    std::string tokens;            // [policy] tokens: labels or serials; empty = every token
    std::string objects;           // [policy] objects: label:/id: matchers; empty = every object
    // Any rule set: only then do calls take the policy's path.
    bool any() const noexcept {
      return !mechanisms_allow.empty() || !mechanisms_deny.empty() || !functions_deny.empty() ||
             read_only || !protect.empty() || !tokens.empty() || !objects.empty();
    }
  } policy;
  // [backend.NAME] and [group.NAME] sections, in file order. Either these or
  // the top-level module (with [backend]) configure the backends, never both.
  std::vector<NamedBackend> backends;
  std::vector<Group> groups;
  bool has_groups() const noexcept { return !backends.empty() || !groups.empty(); }
  const NamedBackend* find_backend(std::string_view name) const noexcept {
    for (const NamedBackend& b : backends)
      if (b.name == name) return &b;
    return nullptr;
  }
};

// Every configuration problem; the message names the file and line or the environment
// variable, the key, and what was expected.
class ConfigError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// getenv-like: returns nullptr when `name` is unset.
using EnvLookup = std::function<const char*(const char* name)>;

// The environment as the configuration reads it. Injected so tests need no real environment.
struct Environment {
  EnvLookup get;
  // The names of every variable set (only the P11MUX_* ones matter).
  std::function<std::vector<std::string>()> names;
};

// The process's own environment (getenv and environ).
Environment process_environment();

// P11MUX_* variables that belong to the project's tools and tests, never to the module:
// P11MUX_TEST_* (test suites), P11MUX_LOAD_* (the load tester), P11MUX_FAULTY_* (the faulty
// and slow test backends). No configuration key may map to a name under them.
inline constexpr std::array<std::string_view, 3> kReservedEnvPrefixes{
    "P11MUX_TEST_", "P11MUX_LOAD_", "P11MUX_FAULTY_"};

// ${sysconfdir}/p11mux/p11mux.conf of the build (/etc/p11mux/p11mux.conf for prefix /usr).
std::string_view default_config_file() noexcept;

// Reads the file named by P11MUX_CONFIG if it is set and non-empty; with P11MUX_CONFIG set but
// empty, no file; with it unset, `default_file` if that exists (a missing default file is no
// error, an unreadable or malformed one is). Then applies the P11MUX_* env overrides.
// Throws ConfigError.
Config load_config(const Environment& env, std::string_view default_file = default_config_file());

// Parses INI text (file_name is used in messages only), then applies env overrides.
// Throws ConfigError.
Config parse_config(std::string_view text, std::string_view file_name, const Environment& env);

// The configuration spelling of a value, for log messages.
std::string_view to_string(SessionMode mode) noexcept;
std::string_view to_string(LockingMode mode) noexcept;
std::string_view to_string(BindMode mode) noexcept;
std::string_view to_string(Balance balance) noexcept;
std::string_view to_string(ObjectKey key) noexcept;
std::string_view to_string(GenerateTokenKeys what) noexcept;

}  // namespace p11mux
