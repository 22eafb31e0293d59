// Loads libp11mux.so the way an application does, with the mock backend
// behind it, and gives tests the mock's counters.
#pragma once

#include <p11mux/pkcs11.h>

#include "mock_control.h"

#include <dlfcn.h>
#include <doctest/doctest.h>

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <initializer_list>
#include <map>
#include <sstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace p11mux::test {

// The whole of a file ("" if it cannot be read).
inline std::string slurp(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A path under /tmp unique to this suite and process: engineers and CI run
// suites side by side.
inline std::string unique_temp_path(std::string_view suite, const std::string& name) {
  return "/tmp/p11mux-" + std::string(suite) + "-" + std::to_string(::getpid()) + "-" + name;
}

// Every test starts from a clean environment: no config file (P11MUX_CONFIG set but
// empty: not even the default file of a p11mux installed on the host), the mock as backend.
// Variables a test pins for its whole scope: they survive reset_environment().
inline std::map<std::string, std::string>& pinned_environment() {
  static std::map<std::string, std::string> pinned;
  return pinned;
}

inline void reset_environment() {
  std::vector<std::string> names;
  for (char** e = environ; *e != nullptr; ++e) {
    std::string_view entry(*e);
    if (entry.rfind("P11MUX_", 0) == 0) names.emplace_back(entry.substr(0, entry.find('=')));
  }
  for (const auto& name : names) ::unsetenv(name.c_str());
  ::setenv("P11MUX_CONFIG", "", 1);
  ::setenv("P11MUX_MODULE", P11MUX_TEST_MOCK_PATH, 1);
  ::setenv("P11MUX_LOG_LEVEL", "off", 1);
  for (const auto& [name, value] : pinned_environment()) ::setenv(name.c_str(), value.c_str(), 1);
}

struct Libraries {
  Libraries() {
    void* mock_lib = ::dlopen(P11MUX_TEST_MOCK_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(mock_lib != nullptr, ::dlerror());
    mock = reinterpret_cast<MockGetControlFn>(::dlsym(mock_lib, "mock_get_control"))();
    void* lib = ::dlopen(P11MUX_TEST_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(lib != nullptr, ::dlerror());
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
    REQUIRE(static_cast<bool>(get_list));
    REQUIRE(get_list(&p11) == CKR_OK);
  }
  const MockControl* mock = nullptr;
  CK_FUNCTION_LIST* p11 = nullptr;
};

// Both libraries are loaded once (both are -z nodelete, like in real use).
inline Libraries& libs() {
  static Libraries instance;
  return instance;
}

inline MockStats mock_stats() {
  MockStats s{};
  libs().mock->stats(&s);
  return s;
}

// The spec bender's control (libp11mux-spec-bender.so: the mock bending the
// specification as real modules do), loaded once.
inline const MockControl& bender() {
  static const MockControl* control = [] {
    void* lib = ::dlopen(P11MUX_TEST_SPEC_BENDER_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(lib != nullptr, ::dlerror());
    return reinterpret_cast<MockGetControlFn>(::dlsym(lib, "mock_get_control"))();
  }();
  return *control;
}

inline MockStats bender_stats() {
  MockStats s{};
  bender().stats(&s);
  return s;
}

// A test's p11mux: resets the mock, configures it, initializes p11mux, and
// finalizes it at the end whatever happened.
class Proxy {
 public:
  using Environment = std::initializer_list<std::pair<const char*, const char*>>;

  explicit Proxy(MockConfig config = {}, CK_VOID_PTR init_args = nullptr, Environment env = {})
      : p11(libs().p11) {
    reset_environment();
    for (auto [name, value] : env) ::setenv(name, value, 1);
    CHECK(libs().mock->reset() == 0);
    REQUIRE(libs().mock->configure(&config) == 0);
    CK_C_INITIALIZE_ARGS os{};
    os.flags = CKF_OS_LOCKING_OK;
    REQUIRE(p11->C_Initialize(init_args != nullptr ? init_args : &os) == CKR_OK);
  }
  ~Proxy() { p11->C_Finalize(nullptr); }
  Proxy(const Proxy&) = delete;
  Proxy& operator=(const Proxy&) = delete;

  CK_SESSION_HANDLE open(CK_SLOT_ID slot = 0,
                         CK_FLAGS flags = CKF_SERIAL_SESSION | CKF_RW_SESSION) {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(p11->C_OpenSession(slot, flags, nullptr, nullptr, &h) == CKR_OK);
    return h;
  }

  // C_CreateObject of a CKO_DATA object, a session object unless on_token.
  CK_RV create_data_object(CK_SESSION_HANDLE h, bool on_token, CK_OBJECT_HANDLE& out) {
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_BBOOL token = on_token ? CK_TRUE : CK_FALSE;
    CK_ATTRIBUTE tmpl[] = {{CKA_CLASS, &cls, sizeof cls}, {CKA_TOKEN, &token, sizeof token}};
    return p11->C_CreateObject(h, tmpl, 2, &out);
  }

  CK_FUNCTION_LIST* p11;
};

// Runs fn with stderr redirected to a file; returns what was written.
template <class Fn>
std::string capture_stderr(Fn fn) {
  char path[] = "/tmp/p11mux-stderr-XXXXXX";
  int fd = ::mkstemp(path);
  REQUIRE(fd >= 0);
  std::fflush(stderr);
  int saved = ::dup(2);
  ::dup2(fd, 2);
  fn();
  std::fflush(stderr);
  ::dup2(saved, 2);
  ::close(saved);
  std::string text;
  ::lseek(fd, 0, SEEK_SET);
  char buf[4096];
  for (ssize_t n; (n = ::read(fd, buf, sizeof buf)) > 0;) text.append(buf, static_cast<size_t>(n));
  ::close(fd);
  ::unlink(path);
  return text;
}

inline CK_MECHANISM sha256() { return CK_MECHANISM{CKM_SHA256, nullptr, 0}; }

// Polls until pred() holds, for up to 10 s: a liveness check, not a timing assertion.
template <class Pred>
bool eventually(Pred pred) {
  for (int i = 0; i < 200; ++i) {
    if (pred()) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  }
  return false;
}

}  // namespace p11mux::test
