// Unit tests for proxy/config: INI parsing, P11MUX_* environment overrides, error messages.
#include "config/config.hpp"

#include "fake_environment.hpp"

#include <doctest/doctest.h>

#include <chrono>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <set>
#include <string>

using p11mux::Config;
using p11mux::ConfigError;
using p11mux::env_from;
using p11mux::Environment;
using p11mux::EnvLookup;
using p11mux::EnvMap;
using p11mux::LockingMode;
using p11mux::SessionMode;

namespace {

// load_config with no default file, so that the host's own never gets in.
Config load(EnvMap vars = {}) { return p11mux::load_config(env_from(std::move(vars)), ""); }

Config parse(std::string_view text, EnvMap vars = {}) {
  return p11mux::parse_config(text, "test.conf", env_from(std::move(vars)));
}

// The ConfigError message of parsing `text`, or "(no error)".
std::string error_of(std::string_view text, EnvMap vars = {}) {
  try {
    parse(text, std::move(vars));
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "(no error)";
}

// A file in a fresh temporary directory, removed with the directory at scope exit.
class TempDir {
 public:
  TempDir() {
    std::string tmpl =
        (std::filesystem::temp_directory_path() / "p11mux-config-test-XXXXXX").string();
    REQUIRE(::mkdtemp(tmpl.data()) != nullptr);
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;  // one owner removes the directory
  TempDir& operator=(const TempDir&) = delete;

  std::string write(const std::string& name, std::string_view content) const {
    const auto file = path_ / name;
    std::ofstream out(file, std::ios::binary);
    out << content;
    REQUIRE(out.good());
    return file.string();
  }
  std::string path() const { return path_.string(); }

 private:
  std::filesystem::path path_;
};

}  // namespace

TEST_CASE("defaults with no file and an empty environment") {
  const Config c = parse("");
  CHECK(c.module.empty());
  CHECK(c.session_mode == SessionMode::serialize);
  CHECK(c.backend.locking == LockingMode::automatic);
  CHECK_FALSE(c.backend.init_reserved.has_value());
  CHECK(c.log.level == spdlog::level::warn);
  CHECK(c.log.file.empty());

  const Config loaded = load();
  CHECK(loaded.module.empty());
  CHECK(loaded.session_mode == SessionMode::serialize);
  CHECK(loaded.backend.locking == LockingMode::automatic);
  CHECK_FALSE(loaded.backend.init_reserved.has_value());
  CHECK(loaded.log.level == spdlog::level::warn);
  CHECK(loaded.log.file.empty());
}

TEST_CASE("the file sets every key") {
  const Config c = parse(
      "module = /usr/lib/softhsm/libsofthsm2.so\n"
      "session_mode = multiplex\n"
      "[backend]\n"
      "locking = os\n"
      "init_reserved = secret\n"
      "[log]\n"
      "level = debug\n"
      "file = /var/log/p11mux.log\n");
  CHECK(c.module == "/usr/lib/softhsm/libsofthsm2.so");
  CHECK(c.session_mode == SessionMode::multiplex);
  CHECK(c.backend.locking == LockingMode::os);
  CHECK(c.backend.init_reserved == "secret");
  CHECK(c.log.level == spdlog::level::debug);
  CHECK(c.log.file == "/var/log/p11mux.log");
}

TEST_CASE("every enum spelling is accepted") {
  SUBCASE("session_mode") {
    CHECK(parse("session_mode = serialize").session_mode == SessionMode::serialize);
    CHECK(parse("session_mode = multiplex").session_mode == SessionMode::multiplex);
  }
  SUBCASE("[backend] locking") {
    CHECK(parse("[backend]\nlocking = auto").backend.locking == LockingMode::automatic);
    CHECK(parse("[backend]\nlocking = os").backend.locking == LockingMode::os);
    CHECK(parse("[backend]\nlocking = callbacks").backend.locking == LockingMode::callbacks);
    CHECK(parse("[backend]\nlocking = none").backend.locking == LockingMode::none);
  }
  SUBCASE("[log] level") {
    CHECK(parse("[log]\nlevel = off").log.level == spdlog::level::off);
    CHECK(parse("[log]\nlevel = error").log.level == spdlog::level::err);
    CHECK(parse("[log]\nlevel = warn").log.level == spdlog::level::warn);
    CHECK(parse("[log]\nlevel = info").log.level == spdlog::level::info);
    CHECK(parse("[log]\nlevel = debug").log.level == spdlog::level::debug);
    CHECK(parse("[log]\nlevel = trace").log.level == spdlog::level::trace);
  }
}

TEST_CASE("comments, blank lines and whitespace are ignored") {
  const Config c = parse(
      "# leading comment\n"
      "; semicolon comment\n"
      "\n"
      "   \t\n"
      "  module=/lib/a.so   # trailing comment\r\n"
      "\tsession_mode\t=\tmultiplex ; trailing semicolon comment\n"
      "  [ log ]   # section comment\n"
      "   # indented comment\n"
      "file = /tmp/a#b.log\n"
      "level = info");  // no final newline
  CHECK(c.module == "/lib/a.so");
  CHECK(c.session_mode == SessionMode::multiplex);
  CHECK(c.log.file == "/tmp/a#b.log");  // '#' not after whitespace is part of the value
  CHECK(c.log.level == spdlog::level::info);
}

TEST_CASE("a UTF-8 byte order mark and CRLF line ends are accepted") {
  const Config c = parse("\xEF\xBB\xBFmodule = /lib/a.so\r\n[log]\r\nlevel = debug\r\n");
  CHECK(c.module == "/lib/a.so");
  CHECK(c.log.level == spdlog::level::debug);
  CHECK(error_of("\xEF\xBB\xBFmodule = a\r\nbogus = 1\r\n") ==
        "test.conf:2: unknown top-level key 'bogus'");
}

TEST_CASE("quoted values keep spaces, quotes and comment characters") {
  const Config c = parse(
      "module = \"  /opt/my lib/p11.so  \"  # comment after quotes\n"
      "[backend]\n"
      "init_reserved = \"configdir='sql:/tmp/db' certPrefix='' keyPrefix='' secmod='secmod.db'\"\n"
      "[log]\n"
      "file = \"/tmp/x # not a comment.log\"\n");
  CHECK(c.module == "  /opt/my lib/p11.so  ");
  CHECK(c.backend.init_reserved ==
        "configdir='sql:/tmp/db' certPrefix='' keyPrefix='' secmod='secmod.db'");
  CHECK(c.log.file == "/tmp/x # not a comment.log");
}

TEST_CASE("empty values") {
  const Config c =
      parse("module =\n[backend]\ninit_reserved = \"\"\n[log]\nfile = # comment only\n");
  CHECK(c.module.empty());
  CHECK_FALSE(c.backend.init_reserved.has_value());  // empty init_reserved = not set
  CHECK(c.log.file.empty());
}

TEST_CASE("unknown key: message names file, line, key and section") {
  CHECK(error_of("[backend]\nlocking = os\n\nmax_sesions = 3\n") ==
        "test.conf:4: unknown key 'max_sesions' in section [backend]");
  CHECK(error_of("# c\nmodul = /lib/a.so\n") == "test.conf:2: unknown top-level key 'modul'");
  // A top-level key inside a section is not that section's key.
  CHECK(error_of("[log]\nmodule = /lib/a.so\n") ==
        "test.conf:2: unknown key 'module' in section [log]");
  // Keys are case-sensitive.
  CHECK(error_of("Module = /lib/a.so\n") == "test.conf:1: unknown top-level key 'Module'");
}

TEST_CASE("unknown section") {
  CHECK(error_of("module = a\n\n[poool]\nmax_sessions = 3\n") ==
        "test.conf:3: unknown section [poool]");
  CHECK(error_of("[Log]\n") == "test.conf:1: unknown section [Log]");
}

TEST_CASE("bad value: message names file, line, key and the accepted values") {
  CHECK(error_of("module = a\n\nsession_mode = fast\n") ==
        "test.conf:3: bad value 'fast' for session_mode (expected serialize|multiplex)");
  CHECK(
      error_of("[backend]\nlocking = automatic\n") ==
      "test.conf:2: bad value 'automatic' for [backend] locking (expected auto|os|callbacks|none)");
  CHECK(error_of("[log]\nlevel = loud\n") ==
        "test.conf:2: bad value 'loud' for [log] level (expected off|error|warn|info|debug|trace)");
  CHECK(error_of("[log]\nlevel = WARN\n") ==
        "test.conf:2: bad value 'WARN' for [log] level (expected off|error|warn|info|debug|trace)");
  CHECK(error_of("[log]\nlevel =\n") ==
        "test.conf:2: bad value '' for [log] level (expected off|error|warn|info|debug|trace)");
}

TEST_CASE("malformed lines") {
  CHECK(error_of("module = a\njust some words\n") ==
        "test.conf:2: expected 'key = value' or '[section]', got 'just some words'");
  CHECK(error_of("= value\n") == "test.conf:1: missing key before '='");
  CHECK(error_of("\n[backend\n") == "test.conf:2: unterminated section header '[backend'");
  CHECK(error_of("[backend] locking = os\n") ==
        "test.conf:1: unexpected text 'locking = os' after section header");
  CHECK(error_of("[backend]\ninit_reserved = \"abc\n") ==
        "test.conf:2: unterminated quoted value for key 'init_reserved' in section [backend]");
  CHECK(error_of("module = \"/lib/a.so\" extra\n") ==
        "test.conf:1: unexpected text 'extra' after quoted value for top-level key 'module'");
}

TEST_CASE("duplicate key in the same file") {
  CHECK(error_of("module = a\n# c\nmodule = b\n") ==
        "test.conf:3: duplicate top-level key 'module' (first set on line 1)");
  // A section may be reopened, but a key still appears once.
  CHECK(error_of("[log]\nlevel = info\n[backend]\nlocking = os\n[log]\nlevel = debug\n") ==
        "test.conf:6: duplicate key 'level' in section [log] (first set on line 2)");
  // The same key name in different sections is two keys.
  CHECK(error_of("[log]\nfile = a\n[backend]\nlocking = os\n") == "(no error)");
}

TEST_CASE("environment overrides beat the file") {
  const Config c = parse(
      "module = /lib/file.so\n"
      "session_mode = serialize\n"
      "[backend]\n"
      "locking = os\n"
      "init_reserved = from-file\n"
      "[log]\n"
      "level = info\n"
      "file = /tmp/file.log\n",
      {{"P11MUX_MODULE", "/lib/env.so"},
       {"P11MUX_SESSION_MODE", "multiplex"},
       {"P11MUX_BACKEND_LOCKING", "none"},
       {"P11MUX_BACKEND_INIT_RESERVED", "from-env"},
       {"P11MUX_LOG_LEVEL", "trace"},
       {"P11MUX_LOG_FILE", "/tmp/env.log"}});
  CHECK(c.module == "/lib/env.so");
  CHECK(c.session_mode == SessionMode::multiplex);
  CHECK(c.backend.locking == LockingMode::none);
  CHECK(c.backend.init_reserved == "from-env");
  CHECK(c.log.level == spdlog::level::trace);
  CHECK(c.log.file == "/tmp/env.log");
}

TEST_CASE("an unset variable leaves the file's value") {
  const Config c =
      parse("module = /lib/file.so\n[log]\nlevel = info\n", {{"P11MUX_LOG_FILE", "/tmp/env.log"}});
  CHECK(c.module == "/lib/file.so");
  CHECK(c.log.level == spdlog::level::info);
  CHECK(c.log.file == "/tmp/env.log");
}

TEST_CASE("environment alone configures everything") {
  const Config c = load({{"P11MUX_MODULE", "/lib/env.so"},
                         {"P11MUX_SESSION_MODE", "multiplex"},
                         {"P11MUX_BACKEND_LOCKING", "callbacks"},
                         {"P11MUX_BACKEND_INIT_RESERVED", "configdir='sql:/db'"},
                         {"P11MUX_LOG_LEVEL", "off"},
                         {"P11MUX_LOG_FILE", "/tmp/env.log"}});
  CHECK(c.module == "/lib/env.so");
  CHECK(c.session_mode == SessionMode::multiplex);
  CHECK(c.backend.locking == LockingMode::callbacks);
  CHECK(c.backend.init_reserved == "configdir='sql:/db'");
  CHECK(c.log.level == spdlog::level::off);
  CHECK(c.log.file == "/tmp/env.log");
}

TEST_CASE("an empty environment value sets the key to empty") {
  const Config c =
      parse("module = /lib/file.so\n[backend]\ninit_reserved = x\n[log]\nfile = /tmp/f.log\n",
            {{"P11MUX_MODULE", ""}, {"P11MUX_BACKEND_INIT_RESERVED", ""}, {"P11MUX_LOG_FILE", ""}});
  CHECK(c.module.empty());
  CHECK_FALSE(c.backend.init_reserved.has_value());
  CHECK(c.log.file.empty());
  // For an enum, empty is a bad value rather than "default".
  CHECK(error_of("", {{"P11MUX_SESSION_MODE", ""}}) ==
        "environment variable P11MUX_SESSION_MODE: bad value '' for session_mode (expected "
        "serialize|multiplex)");
}

TEST_CASE("bad environment value: message names the variable and the key") {
  CHECK(error_of("", {{"P11MUX_LOG_LEVEL", "loud"}}) ==
        "environment variable P11MUX_LOG_LEVEL: bad value 'loud' for [log] level "
        "(expected off|error|warn|info|debug|trace)");
  CHECK(error_of("", {{"P11MUX_BACKEND_LOCKING", "Auto"}}) ==
        "environment variable P11MUX_BACKEND_LOCKING: bad value 'Auto' for [backend] locking "
        "(expected auto|os|callbacks|none)");
  // Raised even when the file's own value is fine.
  CHECK_THROWS_WITH_AS(
      parse("session_mode = multiplex\n", {{"P11MUX_SESSION_MODE", "fast"}}),
      "environment variable P11MUX_SESSION_MODE: bad value 'fast' for session_mode "
      "(expected serialize|multiplex)",
      ConfigError);
}

TEST_CASE("[pool] bind: auto follows the session mode; open and state are chosen") {
  CHECK_FALSE(parse("").binds_on_state());
  CHECK(parse("session_mode = multiplex\n").binds_on_state());
  CHECK_FALSE(parse("session_mode = multiplex\n[pool]\nbind = open\n").binds_on_state());
  CHECK(parse("[pool]\nbind = state\n").binds_on_state());
  CHECK(parse("", {{"P11MUX_POOL_BIND", "state"}}).binds_on_state());
  CHECK_THROWS_WITH_AS(
      parse("[pool]\nbind = transaction\n"),
      "test.conf:2: bad value 'transaction' for [pool] bind (expected auto|open|state)",
      ConfigError);
  CHECK(parse("").pool.max_virtual_sessions == 100'000);
  CHECK(parse("[pool]\nmax_virtual_sessions = 7\n").pool.max_virtual_sessions == 7);
  CHECK_THROWS_AS(parse("[pool]\nmax_virtual_sessions = 0\n"), ConfigError);
}

TEST_CASE("only the table's P11MUX_* names and P11MUX_CONFIG are looked up") {
  std::set<std::string> asked;
  const EnvLookup recording = [&asked](const char* name) -> const char* {
    asked.insert(name);
    return std::string_view(name) == "P11MUX_TEST_MODULE" ? "whatever" : nullptr;
  };
  (void)p11mux::load_config(
      {recording, [] { return std::vector<std::string>{"P11MUX_TEST_MODULE"}; }}, "");
  CHECK(asked == std::set<std::string>{"P11MUX_CONFIG",
                                       "P11MUX_MODULE",
                                       "P11MUX_SESSION_MODE",
                                       "P11MUX_BACKEND_LOCKING",
                                       "P11MUX_BACKEND_INIT_RESERVED",
                                       "P11MUX_BACKEND_VENDOR_INTERFACES",
                                       "P11MUX_LOG_LEVEL",
                                       "P11MUX_LOG_FILE",
                                       "P11MUX_POOL_MAX_SESSIONS",
                                       "P11MUX_POOL_WAIT_MS",
                                       "P11MUX_POOL_BIND",
                                       "P11MUX_POOL_MAX_VIRTUAL_SESSIONS",
                                       "P11MUX_POOL_PREWARM",
                                       "P11MUX_POOL_KEEP_LOGIN",
                                       "P11MUX_POOL_IDLE_TIMEOUT_S",
                                       "P11MUX_POOL_KEEPALIVE_S",
                                       "P11MUX_LOG_FUNCTIONS",
                                       "P11MUX_LOG_MIN_DURATION_US",
                                       "P11MUX_LOG_ASYNC",
                                       "P11MUX_LOG_ROTATE_SIZE_KB",
                                       "P11MUX_LOG_ROTATE_FILES",
                                       "P11MUX_METRICS_ENABLED",
                                       "P11MUX_METRICS_LISTEN",
                                       "P11MUX_METRICS_ALLOW_REMOTE",
                                       "P11MUX_METRICS_SIGNAL",
                                       "P11MUX_METRICS_SUMMARY",
                                       "P11MUX_POLICY_MECHANISMS_ALLOW",
                                       "P11MUX_POLICY_MECHANISMS_DENY",
                                       "P11MUX_POLICY_FUNCTIONS_DENY",
                                       "P11MUX_POLICY_READ_ONLY",
                                       "P11MUX_POLICY_PROTECT",
                                       "P11MUX_POLICY_TOKENS",
                                       "P11MUX_POLICY_OBJECTS"});
}

TEST_CASE("load_config reads the file named by P11MUX_CONFIG, then applies overrides") {
  const TempDir dir;
  const std::string path = dir.write("p11mux.conf",
                                     "module = /lib/file.so\n"
                                     "[backend]\n"
                                     "init_reserved = \"configdir='sql:/tmp/db' certPrefix=''\"\n"
                                     "[log]\n"
                                     "level = debug\n");
  const Config c = load({{"P11MUX_CONFIG", path}, {"P11MUX_LOG_LEVEL", "error"}});
  CHECK(c.module == "/lib/file.so");
  CHECK(c.backend.init_reserved == "configdir='sql:/tmp/db' certPrefix=''");
  CHECK(c.log.level == spdlog::level::err);
}

TEST_CASE("load_config: errors in the file name the real path") {
  const TempDir dir;
  const std::string path = dir.write("bad.conf", "module = a\n[backend]\nlocking = fast\n");
  CHECK_THROWS_WITH_AS(
      load({{"P11MUX_CONFIG", path}}),
      (path + ":3: bad value 'fast' for [backend] locking (expected auto|os|callbacks|none)")
          .c_str(),
      ConfigError);
}

TEST_CASE("load_config: a missing or unreadable file is an error naming the path") {
  const TempDir dir;
  SUBCASE("missing") {
    const std::string path = dir.path() + "/nope.conf";
    CHECK_THROWS_WITH_AS(
        load({{"P11MUX_CONFIG", path}}),
        ("cannot read config file '" + path + "': No such file or directory").c_str(), ConfigError);
  }
  SUBCASE("a directory") {
    CHECK_THROWS_WITH_AS(load({{"P11MUX_CONFIG", dir.path()}}),
                         ("cannot read config file '" + dir.path() + "': Is a directory").c_str(),
                         ConfigError);
  }
}

TEST_CASE("load_config: an empty P11MUX_CONFIG means no file") {
  const Config c = load({{"P11MUX_CONFIG", ""}, {"P11MUX_MODULE", "/lib/env.so"}});
  CHECK(c.module == "/lib/env.so");
}

TEST_CASE(
    "load_config: with P11MUX_CONFIG unset, the default file is read, and the environment beats "
    "it") {
  const TempDir dir;
  const std::string path =
      dir.write("p11mux.conf", "module = /lib/default.so\n[log]\nlevel = debug\n");
  const Config c = p11mux::load_config(env_from({{"P11MUX_LOG_LEVEL", "error"}}), path);
  CHECK(c.module == "/lib/default.so");
  CHECK(c.log.level == spdlog::level::err);
  // P11MUX_CONFIG wins over the default file; set but empty, it means no file at all.
  const std::string other = dir.write("other.conf", "module = /lib/other.so\n");
  CHECK(p11mux::load_config(env_from({{"P11MUX_CONFIG", other}}), path).module == "/lib/other.so");
  CHECK(p11mux::load_config(env_from({{"P11MUX_CONFIG", ""}}), path).module.empty());
}

TEST_CASE("load_config: a missing default file is no error; an unreadable or malformed one is") {
  const TempDir dir;
  for (const std::string& missing : {dir.path() + "/nope.conf", dir.path() + "/none/p11mux.conf"}) {
    CAPTURE(missing);
    const Config c = p11mux::load_config(env_from({{"P11MUX_MODULE", "/lib/env.so"}}), missing);
    CHECK(c.module == "/lib/env.so");
    CHECK(c.session_mode == SessionMode::serialize);
  }
  // A path component that is a file (ENOTDIR) is a missing file too.
  const std::string file = dir.write("plain", "");
  CHECK_NOTHROW(p11mux::load_config(env_from(), file + "/p11mux.conf"));
  CHECK_THROWS_WITH_AS(p11mux::load_config(env_from(), dir.path()),
                       ("cannot read config file '" + dir.path() + "': Is a directory").c_str(),
                       ConfigError);
  const std::string bad = dir.write("bad.conf", "module = /lib/x.so\nsesion_mode = multiplex\n");
  CHECK_THROWS_WITH_AS(p11mux::load_config(env_from(), bad),
                       (bad + ":2: unknown top-level key 'sesion_mode'").c_str(), ConfigError);
  // A malformed default file is not read at all when P11MUX_CONFIG names another.
  CHECK_NOTHROW(p11mux::load_config(env_from({{"P11MUX_CONFIG", ""}}), bad));
}

TEST_CASE("the default file is under the build's sysconfdir") {
  CHECK(p11mux::default_config_file().ends_with("/p11mux/p11mux.conf"));
  CHECK(p11mux::default_config_file().starts_with("/"));
}

TEST_CASE("a P11MUX_* variable that names no setting is an error, with the likely one named") {
  CHECK(error_of("", {{"P11MUX_SESION_MODE", "multiplex"}}) ==
        "unknown environment variable P11MUX_SESION_MODE (did you mean P11MUX_SESSION_MODE?)");
  CHECK(error_of("", {{"P11MUX_LOG_LEVL", "debug"}}) ==
        "unknown environment variable P11MUX_LOG_LEVL (did you mean P11MUX_LOG_LEVEL?)");
  CHECK(error_of("", {{"P11MUX_log_level", "debug"}}) ==
        "unknown environment variable P11MUX_log_level (did you mean P11MUX_LOG_LEVEL?)");
  CHECK(error_of("", {{"P11MUX_CONFG", "/etc/x.conf"}}) ==
        "unknown environment variable P11MUX_CONFG (did you mean P11MUX_CONFIG?)");
  // The key without its section.
  CHECK(error_of("", {{"P11MUX_LOCKING", "os"}}) ==
        "unknown environment variable P11MUX_LOCKING (did you mean P11MUX_BACKEND_LOCKING?)");
  CHECK(
      error_of("", {{"P11MUX_MAX_SESSIONS", "4"}}) ==
      "unknown environment variable P11MUX_MAX_SESSIONS (did you mean P11MUX_POOL_MAX_SESSIONS?)");
  // Nothing close: no guess.
  CHECK(error_of("", {{"P11MUX_BOGUS", "1"}}) == "unknown environment variable P11MUX_BOGUS");
  CHECK(error_of("", {{"P11MUX_", ""}}) == "unknown environment variable P11MUX_");
  // Set but empty is still set; and a file does not hide it.
  CHECK(error_of("module = /lib/file.so\n", {{"P11MUX_MODUEL", ""}}) ==
        "unknown environment variable P11MUX_MODUEL (did you mean P11MUX_MODULE?)");
  CHECK_THROWS_AS(load({{"P11MUX_SESION_MODE", "multiplex"}, {"P11MUX_MODULE", "/lib/env.so"}}),
                  ConfigError);
}

TEST_CASE("the prefixes reserved for the project's tools are not settings, and are no error") {
  const Config c = parse("", {{"P11MUX_TEST_MODULE", "/lib/x.so"},
                              {"P11MUX_TEST_SEED", "42"},
                              {"P11MUX_LOAD_PIN", "123456"},
                              {"P11MUX_FAULTY_FAIL", "*:CKR_DEVICE_ERROR"},
                              {"P11MUX_MODULE", "/lib/env.so"},
                              {"P11MUXER", "x"},
                              {"OTHER", "y"}});
  CHECK(c.module == "/lib/env.so");
  for (std::string_view prefix : p11mux::kReservedEnvPrefixes) CHECK(prefix.starts_with("P11MUX_"));
}

TEST_CASE("to_string gives the configuration spelling") {
  CHECK(p11mux::to_string(SessionMode::serialize) == "serialize");
  CHECK(p11mux::to_string(SessionMode::multiplex) == "multiplex");
  CHECK(p11mux::to_string(LockingMode::automatic) == "auto");
  CHECK(p11mux::to_string(LockingMode::os) == "os");
  CHECK(p11mux::to_string(LockingMode::callbacks) == "callbacks");
  CHECK(p11mux::to_string(LockingMode::none) == "none");
  // Round trip: what to_string prints, the parser reads back.
  for (const auto mode :
       {LockingMode::automatic, LockingMode::os, LockingMode::callbacks, LockingMode::none})
    CHECK(parse("[backend]\nlocking = " + std::string(p11mux::to_string(mode))).backend.locking ==
          mode);
}

TEST_CASE("pool keys: whole numbers, booleans, and an optional limit") {
  const Config defaults = parse("");
  CHECK_FALSE(defaults.pool.max_sessions.has_value());
  CHECK(defaults.pool.wait_ms == 5000);
  CHECK_FALSE(defaults.pool.keep_login);

  const Config c = parse(
      "[pool]\nmax_sessions = 16\nwait_ms = 250\nprewarm = 4\n"
      "keep_login = true\nidle_timeout_s = 30\nkeepalive_s = 10\n");
  REQUIRE(c.pool.max_sessions.has_value());
  CHECK(*c.pool.max_sessions == 16);
  CHECK(c.pool.wait_ms == 250);
  CHECK(c.pool.prewarm == 4);
  CHECK(c.pool.keep_login);
  CHECK(c.pool.idle_timeout_s == 30);
  CHECK(c.pool.keepalive_s == 10);

  CHECK(parse("[pool]\nmax_sessions = 8\n", {{"P11MUX_POOL_MAX_SESSIONS", ""}}).pool.max_sessions ==
        std::nullopt);
  CHECK(parse("", {{"P11MUX_POOL_KEEP_LOGIN", "false"}}).pool.keep_login == false);
}

TEST_CASE("pool keys: bad numbers and booleans are errors naming the key") {
  for (const char* bad : {"-1", "12x", " ", "1e3", "0x10", "9999999999999"}) {
    CAPTURE(bad);
    const std::string err = error_of(std::string("[pool]\nwait_ms = \"") + bad + "\"\n");
    CHECK(err.find("test.conf:2") != std::string::npos);
    CHECK(err.find("wait_ms") != std::string::npos);
    CHECK(err.find("whole number") != std::string::npos);
  }
  const std::string err = error_of("[pool]\nkeep_login = yes\n");
  CHECK(err.find("true|false") != std::string::npos);
  CHECK(error_of("", {{"P11MUX_POOL_PREWARM", "many"}}).find("P11MUX_POOL_PREWARM") !=
        std::string::npos);
}

// Every numeric key, its environment variable and its range (README, "Configuration").
struct NumericKey {
  const char* section;
  const char* name;
  const char* env;
  unsigned long min, max;
};
constexpr NumericKey kNumericKeys[] = {
    {"log", "min_duration_us", "P11MUX_LOG_MIN_DURATION_US", 0, 3'600'000'000},
    {"log", "rotate_size_kb", "P11MUX_LOG_ROTATE_SIZE_KB", 0, 16'777'216},
    {"log", "rotate_files", "P11MUX_LOG_ROTATE_FILES", 0, 1000},
    {"pool", "max_sessions", "P11MUX_POOL_MAX_SESSIONS", 1, 1'000'000},
    {"pool", "wait_ms", "P11MUX_POOL_WAIT_MS", 0, 3'600'000},
    {"pool", "prewarm", "P11MUX_POOL_PREWARM", 0, 1024},
    {"pool", "idle_timeout_s", "P11MUX_POOL_IDLE_TIMEOUT_S", 0, 2'592'000},
    {"pool", "keepalive_s", "P11MUX_POOL_KEEPALIVE_S", 0, 2'592'000},
};

TEST_CASE(
    "every numeric key is bounded, in the file and in the environment, with an error naming it") {
  for (const NumericKey& k : kNumericKeys) {
    CAPTURE(k.name);
    const std::string section = std::string("[") + k.section + "]\n";
    auto line = [&](unsigned long v) {
      return section + k.name + " = " + std::to_string(v) + "\n";
    };
    const std::string expected =
        "(expected a whole number from " + std::to_string(k.min) + " to " + std::to_string(k.max);
    const std::string key = std::string("[") + k.section + "] " + k.name;
    CHECK(error_of(line(k.max)) == "(no error)");
    CHECK(error_of(line(k.min)) == "(no error)");
    CHECK(error_of("", {{k.env, std::to_string(k.max)}}) == "(no error)");
    for (unsigned long bad : {k.max + 1, 999'999'999'999UL}) {
      CAPTURE(bad);
      const std::string in_file = error_of(line(bad));
      CHECK(in_file.rfind(
                "test.conf:2: bad value '" + std::to_string(bad) + "' for " + key + " " + expected,
                0) == 0);
      const std::string in_env = error_of("", {{k.env, std::to_string(bad)}});
      CHECK(in_env.rfind(std::string("environment variable ") + k.env + ": bad value '" +
                             std::to_string(bad) + "' for " + key + " " + expected,
                         0) == 0);
    }
    if (k.min > 0) CHECK(error_of(line(k.min - 1)).find(expected) != std::string::npos);
  }
}

TEST_CASE("pool.idle_timeout_s and prewarm: the values that overflowed or ate memory are refused") {
  // 10000000000 s overflowed the conversion to nanoseconds (every idle session closed at once).
  CHECK(error_of("[pool]\nidle_timeout_s = 10000000000\n") ==
        "test.conf:2: bad value '10000000000' for [pool] idle_timeout_s (expected a whole number "
        "from 0 to 2592000)");
  CHECK(error_of("", {{"P11MUX_POOL_KEEPALIVE_S", "10000000000"}}).find("[pool] keepalive_s") !=
        std::string::npos);
  CHECK(error_of("[pool]\nprewarm = 999999999999\n") ==
        "test.conf:2: bad value '999999999999' for [pool] prewarm (expected a whole number from 0 "
        "to 1024)");
  // The largest accepted period still converts to nanoseconds without overflow.
  const Config c = parse("[pool]\nidle_timeout_s = 2592000\nkeepalive_s = 2592000\n");
  const auto ns = std::chrono::nanoseconds(std::chrono::seconds(c.pool.idle_timeout_s));
  CHECK(ns.count() == 2'592'000'000'000'000);
  CHECK(std::chrono::steady_clock::now() + std::chrono::seconds(c.pool.keepalive_s) >
        std::chrono::steady_clock::now());
  // An optional number: empty is still "unset", 0 is out of range.
  CHECK_FALSE(parse("[pool]\nmax_sessions =\n").pool.max_sessions.has_value());
  CHECK(error_of("[pool]\nmax_sessions = 0\n") ==
        "test.conf:2: bad value '0' for [pool] max_sessions (expected a whole number from 1 to "
        "1000000 or empty)");
}

TEST_CASE("observability keys: trace filters, log sinks, metrics") {
  const Config defaults = parse("");
  CHECK(defaults.log.functions.empty());
  CHECK(defaults.log.min_duration_us == 0);
  CHECK_FALSE(defaults.log.async);
  CHECK(defaults.log.rotate_size_kb == 0);
  CHECK(defaults.log.rotate_files == 5);
  CHECK_FALSE(defaults.metrics.enabled);
  CHECK(defaults.metrics.listen.empty());
  CHECK_FALSE(defaults.metrics.allow_remote);
  CHECK_FALSE(defaults.metrics.signal);
  CHECK_FALSE(defaults.metrics.summary);

  const Config c = parse(
      "[log]\nfunctions = C_Sign,-C_GenerateRandom\nmin_duration_us = 250\n"
      "async = true\nrotate_size_kb = 1024\nrotate_files = 2\n"
      "[metrics]\nenabled = true\nlisten = 127.0.0.1:9464\n"
      "allow_remote = true\nsignal = true\nsummary = true\n");
  CHECK(c.log.functions == "C_Sign,-C_GenerateRandom");
  CHECK(c.log.min_duration_us == 250);
  CHECK(c.log.async);
  CHECK(c.log.rotate_size_kb == 1024);
  CHECK(c.log.rotate_files == 2);
  CHECK(c.metrics.enabled);
  CHECK(c.metrics.listen == "127.0.0.1:9464");
  CHECK(c.metrics.allow_remote);
  CHECK(c.metrics.signal);
  CHECK(c.metrics.summary);

  const Config env =
      parse("[metrics]\nlisten = /run/p11mux.sock\n", {{"P11MUX_METRICS_LISTEN", ""},
                                                       {"P11MUX_LOG_ASYNC", "true"},
                                                       {"P11MUX_METRICS_SIGNAL", "true"},
                                                       {"P11MUX_LOG_MIN_DURATION_US", "7"}});
  CHECK(env.metrics.listen.empty());
  CHECK(env.log.async);
  CHECK(env.metrics.signal);
  CHECK(env.log.min_duration_us == 7);

  CHECK(error_of("[metrics]\nsignal = on\n").find("[metrics] signal") != std::string::npos);
  CHECK(error_of("", {{"P11MUX_METRICS_SUMMARY", "log"}}) ==
        "environment variable P11MUX_METRICS_SUMMARY: bad value 'log' for [metrics] summary "
        "(expected true|false)");
  CHECK(error_of("[log]\nmin_duration_us = 1.5\n").find("whole number") != std::string::npos);
  CHECK(error_of("[metrics]\nport = 9464\n") ==
        "test.conf:2: unknown key 'port' in section [metrics]");
}

TEST_CASE("[backend] vendor_interfaces: hide by default, pass from the file or the environment") {
  using p11mux::VendorInterfaces;
  CHECK(parse("").backend.vendor_interfaces == VendorInterfaces::hide);
  CHECK(parse("[backend]\nvendor_interfaces = pass\n").backend.vendor_interfaces ==
        VendorInterfaces::pass);
  CHECK(
      parse("[backend]\nvendor_interfaces = pass\n", {{"P11MUX_BACKEND_VENDOR_INTERFACES", "hide"}})
          .backend.vendor_interfaces == VendorInterfaces::hide);
  CHECK(parse("", {{"P11MUX_BACKEND_VENDOR_INTERFACES", "pass"}}).backend.vendor_interfaces ==
        VendorInterfaces::pass);
  CHECK(error_of("[backend]\nvendor_interfaces = yes\n") ==
        "test.conf:2: bad value 'yes' for [backend] vendor_interfaces (expected hide|pass)");
}

// ---- Named backends and groups (issue 15, docs/groups.md) ----------------------------------

namespace {

using p11mux::Balance;
using p11mux::GenerateTokenKeys;
using p11mux::GroupMember;
using p11mux::ObjectKey;

// Two backends, one group over both: the smallest valid configuration of its kind.
constexpr std::string_view kTwoHsms =
    "[backend.hsm1]\n"                                   // 1
    "module = /usr/lib/vendor1.so\n"                     // 2
    "[backend.hsm2]\n"                                   // 3
    "module = /usr/lib/vendor2.so\n"                     // 4
    "[group.signing]\n"                                  // 5
    "members = hsm1/label:signing, hsm2/serial:4711\n";  // 6

// kTwoHsms with one more line in [group.signing] (line 7).
std::string group_with(std::string_view line) {
  return std::string(kTwoHsms) + std::string(line) + "\n";
}

std::string members_error(std::string_view members) {
  return error_of(std::string(kTwoHsms.substr(0, kTwoHsms.find("[group"))) +
                  "[group.g]\nmembers = " + std::string(members) + "\n");
}

std::vector<GroupMember> members_of(std::string_view members) {
  const Config c = parse(std::string(kTwoHsms.substr(0, kTwoHsms.find("[group"))) +
                         "[group.g]\nmembers = " + std::string(members) + "\n");
  REQUIRE(c.groups.size() == 1);
  return c.groups[0].members;
}

}  // namespace

TEST_CASE("named backends and a group: every key, and the defaults") {
  const Config c = parse(kTwoHsms);
  CHECK(c.has_groups());
  CHECK(c.module.empty());
  REQUIRE(c.backends.size() == 2);
  CHECK(c.backends[0].name == "hsm1");
  CHECK(c.backends[0].module == "/usr/lib/vendor1.so");
  CHECK(c.backends[0].locking == LockingMode::automatic);
  CHECK_FALSE(c.backends[0].init_reserved.has_value());
  CHECK(c.find_backend("hsm2") == &c.backends[1]);
  CHECK(c.find_backend("hsm3") == nullptr);
  REQUIRE(c.groups.size() == 1);
  const p11mux::Group& g = c.groups[0];
  CHECK(g.name == "signing");
  REQUIRE(g.members.size() == 2);
  CHECK(g.members[0].backend == "hsm1");
  CHECK(g.members[0].by == GroupMember::By::label);
  CHECK(g.members[0].token == "signing");
  CHECK(g.members[1].backend == "hsm2");
  CHECK(g.members[1].by == GroupMember::By::serial);
  CHECK(g.members[1].token == "4711");
  CHECK(g.balance == Balance::least_busy);
  CHECK(g.recovery_interval_s == 60);
  CHECK(g.hang_timeout_s == 60);
  CHECK(g.hide_members);
  CHECK(g.object_key == ObjectKey::id_or_label);
  CHECK(g.generate_token_keys == GenerateTokenKeys::refuse);

  const Config all = parse(
      "session_mode = multiplex\n"
      "[backend.a]\nmodule = /a.so\nlocking = none\ninit_reserved = \"x='1'\"\n"
      "[group.g]\nmembers = a/label:one, a/label:two\nbalance = primary\n"
      "recovery_interval_s = 5\nhang_timeout_s = 7\nhide_members = false\n"
      "object_key = id+label\n"
      "generate_token_keys = primary\n"
      "[pool]\nmax_sessions = 4\n");
  CHECK(all.session_mode == SessionMode::multiplex);  // global keys still apply
  CHECK(all.pool.max_sessions == 4UL);
  CHECK(all.backends[0].locking == LockingMode::none);
  CHECK(all.backends[0].init_reserved == "x='1'");
  CHECK(all.groups[0].balance == Balance::primary);
  CHECK(all.groups[0].recovery_interval_s == 5);
  CHECK(all.groups[0].hang_timeout_s == 7);
  CHECK_FALSE(all.groups[0].hide_members);
  CHECK(all.groups[0].object_key == ObjectKey::id_and_label);
  CHECK(all.groups[0].generate_token_keys == GenerateTokenKeys::primary);
  // One module, several members.
  CHECK(all.groups[0].members.size() == 2);
  CHECK_FALSE(parse("module = /lib/x.so\n").has_groups());
}

TEST_CASE("group enums: every spelling, and a bad one names the section and the choices") {
  CHECK(parse(group_with("balance = least-busy")).groups[0].balance == Balance::least_busy);
  CHECK(parse(group_with("balance = round-robin")).groups[0].balance == Balance::round_robin);
  CHECK(parse(group_with("balance = primary")).groups[0].balance == Balance::primary);
  CHECK(parse(group_with("object_key = id")).groups[0].object_key == ObjectKey::id);
  CHECK(parse(group_with("object_key = label")).groups[0].object_key == ObjectKey::label);
  CHECK(parse(group_with("object_key = id-or-label")).groups[0].object_key ==
        ObjectKey::id_or_label);
  CHECK(parse(group_with("generate_token_keys = refuse")).groups[0].generate_token_keys ==
        GenerateTokenKeys::refuse);
  CHECK(error_of(group_with("balance = fastest")) ==
        "test.conf:7: bad value 'fastest' for [group.signing] balance (expected "
        "least-busy|round-robin|primary)");
  CHECK(error_of(group_with("object_key = cka_id")) ==
        "test.conf:7: bad value 'cka_id' for [group.signing] object_key (expected "
        "id-or-label|id|label|id+label)");
  CHECK(error_of(group_with("recovery_interval_s = 0")) ==
        "test.conf:7: bad value '0' for [group.signing] recovery_interval_s (expected a whole "
        "number from 1 to 86400)");
  CHECK(error_of(group_with("hang_timeout_s = 0")) ==
        "test.conf:7: bad value '0' for [group.signing] hang_timeout_s (expected a whole "
        "number from 1 to 86400)");
  CHECK(error_of(group_with("hang_timeout_s = 86401")) ==
        "test.conf:7: bad value '86401' for [group.signing] hang_timeout_s (expected a whole "
        "number from 1 to 86400)");
  CHECK(error_of(group_with("hide_members = yes")) ==
        "test.conf:7: bad value 'yes' for [group.signing] hide_members (expected true|false)");
  CHECK(error_of(group_with("members2 = x")) ==
        "test.conf:7: unknown key 'members2' in section [group.signing] (did you mean "
        "'members'?)");
  CHECK(error_of(group_with("balance = primary\nbalance = primary")) ==
        "test.conf:8: duplicate key 'balance' in section [group.signing] (first set on "
        "test.conf:7)");
  CHECK(
      error_of("[backend.a]\nmodule = /a.so\nlocking = maybe\n[group.g]\nmembers = a/label:x\n") ==
      "test.conf:3: bad value 'maybe' for [backend.a] locking (expected auto|os|callbacks|none)");
  CHECK(error_of("[backend.a]\nmodule = /a.so\nvendor_interfaces = pass\n") ==
        "test.conf:3: unknown key 'vendor_interfaces' in section [backend.a] (the keys of "
        "[backend.NAME]: module, locking, init_reserved)");
  CHECK(p11mux::to_string(Balance::round_robin) == "round-robin");
  CHECK(p11mux::to_string(ObjectKey::id_and_label) == "id+label");
  CHECK(p11mux::to_string(GenerateTokenKeys::primary) == "primary");
}

// A misspelled key of a named section names the key it most likely meant, as
// a misspelled variable does; one far from every key lists the section's keys.
TEST_CASE("an unknown key of a named section names the likely key, else the section's keys") {
  CHECK(error_of(group_with("balanse = primary")) ==
        "test.conf:7: unknown key 'balanse' in section [group.signing] (did you mean "
        "'balance'?)");
  CHECK(error_of(group_with("member = hsm1/label:x")) ==
        "test.conf:7: unknown key 'member' in section [group.signing] (did you mean 'members'?)");
  CHECK(error_of(group_with("recovery_interval = 5")) ==
        "test.conf:7: unknown key 'recovery_interval' in section [group.signing] (did you mean "
        "'recovery_interval_s'?)");
  CHECK(error_of(group_with("weight = 2")) ==
        "test.conf:7: unknown key 'weight' in section [group.signing] (the keys of "
        "[group.NAME]: members, balance, recovery_interval_s, hang_timeout_s, hide_members, "
        "object_key, generate_token_keys)");
  CHECK(error_of("[backend.a]\nmodule = /a.so\nlockng = os\n") ==
        "test.conf:3: unknown key 'lockng' in section [backend.a] (did you mean 'locking'?)");
}

TEST_CASE("members: label and serial, blanks, quotes, commas, empty entries") {
  auto m = members_of("hsm1/label:signing key ,  hsm2 / serial: 4711 ,, ");
  REQUIRE(m.size() == 2);
  CHECK(m[0].token == "signing key");  // inner blanks kept, outer ones trimmed
  CHECK(m[1].backend == "hsm2");
  CHECK(m[1].by == GroupMember::By::serial);
  CHECK(m[1].token == "4711");
  // Quotes: a comma, and leading blanks, belong to the label.
  m = members_of("hsm1/label:\"EU, signing\", hsm2/label:\"  padded left\" , hsm1/label:x");
  REQUIRE(m.size() == 3);
  CHECK(m[0].token == "EU, signing");
  CHECK(m[1].token == "  padded left");
  CHECK(m[2].token == "x");
  // Comment characters after a blank: the whole value quoted keeps them.
  m = members_of("\"hsm1/label:tls #1; eu, hsm2/label:b\"");
  REQUIRE(m.size() == 2);
  CHECK(m[0].token == "tls #1; eu");
  m = members_of("hsm1/label:a, hsm2/label:b   # a comment");
  CHECK(m[1].token == "b");
  // The same token through one module twice is no duplicate when named differently.
  CHECK(members_of("hsm1/label:a, hsm1/serial:a, hsm2/label:a").size() == 3);
  // A label of exactly 32 bytes, a serial of 16.
  CHECK(members_of("hsm1/label:" + std::string(32, 'L') + ", hsm2/serial:" + std::string(16, '9'))
            .size() == 2);
}

TEST_CASE("members: each malformed entry is named with what is wrong") {
  const std::string where = "test.conf:6: [group.g] members: ";
  CHECK(members_error("hsm1") ==
        where + "'hsm1' is not BACKEND/label:LABEL or BACKEND/serial:SERIAL");
  CHECK(members_error("hsm1, hsm2/label:x") ==
        where + "'hsm1' is not BACKEND/label:LABEL or BACKEND/serial:SERIAL");
  CHECK(members_error("hsm1/signing") ==
        where + "'hsm1/signing' names its token neither by label: nor by serial:");
  CHECK(members_error("HSM1/label:x") == where +
                                             "'HSM1/label:x' names backend 'HSM1': a name is a "
                                             "lower-case letter, then lower-case letters, digits "
                                             "or '_', at most 32 in all (it is part of P11MUX_* "
                                             "variable names)");
  CHECK(members_error("hsm1/label:") == where + "'hsm1/label:' names no token");
  CHECK(members_error("hsm1/label:\"\"") == where + "'hsm1/label:\"\"' names no token");
  CHECK(members_error("hsm1/label:\"a, b") == where + "'hsm1/label:\"a, b' has no closing '\"'");
  CHECK(members_error("hsm1/label:\"a\"b, hsm2/label:c") ==
        where + "'hsm1/label:\"a\"b' has text after its closing '\"'");
  CHECK(members_error("hsm1/label:\"a \"") ==
        where +
            "'hsm1/label:\"a \"' ends in blanks: a token's padding is blanks, so it can never "
            "match");
  CHECK(members_error("hsm1/label:" + std::string(33, 'L')) ==
        where + "'hsm1/label:" + std::string(33, 'L') +
            "' is longer than a token's label (32 bytes): it can never match");
  CHECK(members_error("hsm1/serial:" + std::string(17, '9')) ==
        where + "'hsm1/serial:" + std::string(17, '9') +
            "' is longer than a token's serial number (16 bytes): it can never match");
}

TEST_CASE("groups and backends: the whole is checked, each error naming where") {
  // A group without members, in the file or emptied by the environment.
  CHECK(error_of("[backend.a]\nmodule = /a.so\n[group.g]\nbalance = primary\n") ==
        "test.conf:3: [group.g] has no members (members = BACKEND/label:LABEL, ...)");
  CHECK(error_of("[backend.a]\nmodule = /a.so\n[group.g]\nmembers = , ,\n") ==
        "test.conf:4: [group.g] has no members (members = BACKEND/label:LABEL, ...)");
  CHECK(error_of(kTwoHsms, {{"P11MUX_GROUP_SIGNING_MEMBERS", ""}}) ==
        "environment variable P11MUX_GROUP_SIGNING_MEMBERS: [group.signing] has no members "
        "(members = BACKEND/label:LABEL, ...)");
  // A member naming a backend no section defines.
  CHECK(error_of(std::string(kTwoHsms) + "[group.other]\nmembers = hsm3/label:x\n") ==
        "test.conf:8: [group.other] members: 'hsm3/label:x' names backend 'hsm3', and there is "
        "no [backend.hsm3] section");
  // The same member twice.
  CHECK(members_error("hsm1/label:a, hsm2/label:b, hsm1/label:a") ==
        "test.conf:6: [group.g] members: 'hsm1/label:a' is listed twice");
  // A backend without a module; one no group uses.
  CHECK(error_of("[backend.a]\n[group.g]\nmembers = a/label:x\n") ==
        "test.conf:1: [backend.a] has no module (module = PATH, or P11MUX_BACKEND_A_MODULE)");
  CHECK(error_of(std::string(kTwoHsms) + "[backend.spare]\nmodule = /s.so\n") ==
        "test.conf:7: [backend.spare] is a member of no group (a named backend serves groups "
        "only)");
  CHECK(error_of("[backend.a]\nmodule = /a.so\n") ==
        "test.conf:1: [backend.a] is a member of no group (a named backend serves groups only)");
  // Duplicate sections.
  CHECK(error_of(std::string(kTwoHsms) + "[backend.hsm1]\n") ==
        "test.conf:7: duplicate section [backend.hsm1] (first on test.conf:1)");
  CHECK(error_of(std::string(kTwoHsms) + "[group.signing]\n") ==
        "test.conf:7: duplicate section [group.signing] (first on test.conf:5)");
  // A backend and a group may share a name: their variables differ.
  CHECK(
      parse("[backend.hsm]\nmodule = /a.so\n[group.hsm]\nmembers = hsm/label:x\n").groups.size() ==
      1);
}

TEST_CASE("section names: lower case, mappable to a variable, at most 32") {
  const std::string rule =
      ": a name is a lower-case letter, then lower-case letters, digits or '_', at most 32 in "
      "all (it is part of P11MUX_* variable names)";
  CHECK(error_of("[backend.HSM1]\n") ==
        "test.conf:1: bad section name [backend.HSM1]" + rule + " (e.g. [backend.hsm1])");
  CHECK(error_of("[group.hsm-1]\n") ==
        "test.conf:1: bad section name [group.hsm-1]" + rule + " (e.g. [group.hsm1])");
  CHECK(error_of("[group.]\n") ==
        "test.conf:1: bad section name [group.]" + rule + " (e.g. [group.hsm1])");
  CHECK(error_of("[group.1st]\n") ==
        "test.conf:1: bad section name [group.1st]" + rule + " (e.g. [group.hsm1])");
  CHECK(error_of("[group.a b]\n") ==
        "test.conf:1: bad section name [group.a b]" + rule + " (e.g. [group.hsm1])");
  CHECK(error_of("[group." + std::string(33, 'g') + "]\n")
            .starts_with("test.conf:1: bad section name [group.ggg"));
  CHECK(parse("[backend.a]\nmodule = /a.so\n[group." + std::string(32, 'g') +
              "]\nmembers = a/label:x\n")
            .groups[0]
            .name.size() == 32);
  CHECK(error_of("[group]\n") == "test.conf:1: unknown section [group] (a group is [group.NAME])");
  CHECK(error_of("[hsm.a]\n") == "test.conf:1: unknown section [hsm.a]");
}

TEST_CASE("a group with the top-level module, or [backend] keys of that module, is ambiguous") {
  CHECK(error_of("module = /lib/x.so\n" + std::string(kTwoHsms)) ==
        "test.conf:1: the top-level module cannot be combined with [group.signing] (test.conf:6): "
        "a configuration has one backend (top-level module, [backend]) or named backends in "
        "groups; move the module into a [backend.NAME] section");
  CHECK(error_of(kTwoHsms, {{"P11MUX_MODULE", "/lib/x.so"}}) ==
        "environment variable P11MUX_MODULE: the top-level module cannot be combined with "
        "[group.signing] (test.conf:5): a configuration has one backend (top-level module, "
        "[backend]) or named backends in groups; move the module into a [backend.NAME] section");
  // Emptied by the environment: not configured, so no conflict.
  CHECK(
      parse("module = /lib/x.so\n" + std::string(kTwoHsms), {{"P11MUX_MODULE", ""}}).has_groups());
  CHECK(error_of(std::string(kTwoHsms) + "[backend]\nlocking = os\n") ==
        "test.conf:8: [backend] locking is the top-level module's, and there is none with "
        "[group.signing] (test.conf:5): set locking in each [backend.NAME]");
  CHECK(error_of(kTwoHsms, {{"P11MUX_BACKEND_INIT_RESERVED", "x"}}) ==
        "environment variable P11MUX_BACKEND_INIT_RESERVED: [backend] init_reserved is the "
        "top-level module's, and there is none with [group.signing] (test.conf:5): set "
        "init_reserved in each [backend.NAME]");
  // vendor_interfaces is not the module's alone: kept.
  CHECK(parse(std::string(kTwoHsms) + "[backend]\nvendor_interfaces = pass\n").has_groups());
}

TEST_CASE("environment: named sections' keys are overridden as P11MUX_<KIND>_<NAME>_<KEY>") {
  const Config c =
      parse(kTwoHsms, {{"P11MUX_BACKEND_HSM1_MODULE", "/env/v1.so"},
                       {"P11MUX_BACKEND_HSM2_LOCKING", "os"},
                       {"P11MUX_BACKEND_HSM2_INIT_RESERVED", "x"},
                       {"P11MUX_GROUP_SIGNING_MEMBERS", "hsm2/label:\"a, b\", hsm1/label:x"},
                       {"P11MUX_GROUP_SIGNING_BALANCE", "round-robin"},
                       {"P11MUX_GROUP_SIGNING_RECOVERY_INTERVAL_S", "10"},
                       {"P11MUX_GROUP_SIGNING_HANG_TIMEOUT_S", "20"},
                       {"P11MUX_GROUP_SIGNING_HIDE_MEMBERS", "false"},
                       {"P11MUX_GROUP_SIGNING_OBJECT_KEY", "label"},
                       {"P11MUX_GROUP_SIGNING_GENERATE_TOKEN_KEYS", "primary"}});
  CHECK(c.backends[0].module == "/env/v1.so");
  CHECK(c.backends[1].locking == LockingMode::os);
  CHECK(c.backends[1].init_reserved == "x");
  REQUIRE(c.groups[0].members.size() == 2);
  CHECK(c.groups[0].members[0].token == "a, b");
  CHECK(c.groups[0].balance == Balance::round_robin);
  CHECK(c.groups[0].recovery_interval_s == 10);
  CHECK(c.groups[0].hang_timeout_s == 20);
  CHECK_FALSE(c.groups[0].hide_members);
  CHECK(c.groups[0].object_key == ObjectKey::label);
  CHECK(c.groups[0].generate_token_keys == GenerateTokenKeys::primary);
  // The unnamed [backend]'s variables are its own, and apply as before.
  CHECK(parse("module = /x.so\n", {{"P11MUX_BACKEND_LOCKING", "os"}}).backend.locking ==
        LockingMode::os);
  // Bad values name the variable.
  CHECK(error_of(kTwoHsms, {{"P11MUX_GROUP_SIGNING_BALANCE", "random"}}) ==
        "environment variable P11MUX_GROUP_SIGNING_BALANCE: bad value 'random' for "
        "[group.signing] balance (expected least-busy|round-robin|primary)");
  CHECK(error_of(kTwoHsms, {{"P11MUX_GROUP_SIGNING_MEMBERS", "hsm1"}}) ==
        "environment variable P11MUX_GROUP_SIGNING_MEMBERS: [group.signing] members: 'hsm1' is "
        "not BACKEND/label:LABEL or BACKEND/serial:SERIAL");
  CHECK(error_of(kTwoHsms, {{"P11MUX_BACKEND_HSM1_MODULE", ""}}) ==
        "environment variable P11MUX_BACKEND_HSM1_MODULE: [backend.hsm1] has no module (module "
        "= PATH, or P11MUX_BACKEND_HSM1_MODULE)");
}

TEST_CASE("environment: a variable for a section the file does not define is an error") {
  // Close to a defined one: the likely one is named.
  CHECK(error_of(kTwoHsms, {{"P11MUX_GROUP_SIGNNG_MEMBERS", "hsm1/label:x"}}) ==
        "unknown environment variable P11MUX_GROUP_SIGNNG_MEMBERS (did you mean "
        "P11MUX_GROUP_SIGNING_MEMBERS?)");
  // Not close to anything: the section it would set is named.
  CHECK(error_of(kTwoHsms, {{"P11MUX_GROUP_VERIFICATION_MEMBERS", "hsm1/label:x"}}) ==
        "unknown environment variable P11MUX_GROUP_VERIFICATION_MEMBERS: the configuration has "
        "no [group.verification] (the environment sets keys of the sections the file defines; "
        "it adds none)");
  CHECK(error_of("", {{"P11MUX_BACKEND_PRIMARYHSM_MODULE", "/x.so"}}) ==
        "unknown environment variable P11MUX_BACKEND_PRIMARYHSM_MODULE: the configuration has "
        "no [backend.primaryhsm] (the environment sets keys of the sections the file defines; "
        "it adds none)");
  // hide_members ends in _members: the shorter name is the likelier reading.
  CHECK(error_of("", {{"P11MUX_GROUP_PAYMENTS_EU_HIDE_MEMBERS", "true"}}) ==
        "unknown environment variable P11MUX_GROUP_PAYMENTS_EU_HIDE_MEMBERS: the configuration "
        "has no [group.payments_eu] (the environment sets keys of the sections the file "
        "defines; it adds none)");
  // Only the variables of defined sections are read.
  std::set<std::string> asked;
  const auto env = p11mux::env_from({});
  const p11mux::Environment recording{[&asked, env](const char* name) {
                                        asked.insert(name);
                                        return env.get(name);
                                      },
                                      env.names};
  (void)p11mux::parse_config(kTwoHsms, "test.conf", recording);
  CHECK(asked.count("P11MUX_BACKEND_HSM1_MODULE") == 1);
  CHECK(asked.count("P11MUX_GROUP_SIGNING_GENERATE_TOKEN_KEYS") == 1);
  CHECK(asked.count("P11MUX_BACKEND_HSM3_MODULE") == 0);
}

TEST_CASE("two sections whose variables would coincide are an error") {
  CHECK(error_of("[backend.a]\nmodule = /a.so\n"
                 "[group.x]\nmembers = a/label:x\n"
                 "[group.x_hide]\nmembers = a/label:y\n") ==
        "[group.x] hide_members and [group.x_hide] members map to the same environment variable "
        "P11MUX_GROUP_X_HIDE_MEMBERS: rename one of the sections");
}
