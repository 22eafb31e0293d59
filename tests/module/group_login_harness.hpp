// What the module tests of a group's login share (issue 15; docs/groups.md,
// "Keeping the PIN"): p11mux over the faulty module in front of the mock's
// three tokens, one group of all three, every token's PIN kPin; and the mock
// reached behind both to read and change each token's login and PIN.
#pragma once

#include "group_harness.hpp"

#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <string_view>
#include <thread>
#include <utility>

namespace p11mux::test {

// A PIN unlike anything else in a log line (the mock's own is "1234").
inline constexpr std::string_view kPin = "Zq8xW3pn";

inline CK_UTF8CHAR_PTR utf8(std::string_view text) {
  return reinterpret_cast<CK_UTF8CHAR_PTR>(const_cast<char*>(text.data()));
}

// The login state of the mock's token in `slot`, read on a session of its own.
inline CK_STATE token_state(CK_SLOT_ID slot) {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  CK_SESSION_INFO info{};
  REQUIRE(mock_functions()->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h) ==
          CKR_OK);
  REQUIRE(mock_functions()->C_GetSessionInfo(h, &info) == CKR_OK);
  REQUIRE(mock_functions()->C_CloseSession(h) == CKR_OK);
  return info.state;
}

// Changes the user PIN of the mock's token in `slot` behind p11mux's back.
inline void set_token_pin(CK_SLOT_ID slot, std::string_view from, std::string_view to) {
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  REQUIRE(mock_functions()->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr,
                                          nullptr, &h) == CKR_OK);
  REQUIRE(mock_functions()->C_Login(h, CKU_USER, utf8(from), from.size()) == CKR_OK);
  REQUIRE(mock_functions()->C_SetPIN(h, utf8(from), from.size(), utf8(to), to.size()) == CKR_OK);
  REQUIRE(mock_functions()->C_Logout(h) == CKR_OK);
  REQUIRE(mock_functions()->C_CloseSession(h) == CKR_OK);
}

// The mock's three tokens as GroupLoginProxy configures them, C_OpenSession
// taking `open_us` in the mock (after the faulty module's own checks).
inline bool mock_open_takes(unsigned long open_us) {
  MockConfig config{};
  config.slot_count = 3;
  config.provide_v3 = 1;
  config.open_session_us = open_us;
  return libs().mock->configure(&config) == 0;
}

// p11mux over the faulty module over the mock's three tokens, one group of
// all three (member i is the mock's slot i), every token's PIN kPin.
// `group`: more of the group's settings.
class GroupLoginProxy {
 public:
  explicit GroupLoginProxy(std::initializer_list<std::pair<const char*, const char*>> env = {},
                           std::string_view group = "")
      : path_(unique_temp_path("group-login", "conf")) {
    reset_environment();
    std::ofstream(path_) << "[backend.f]\nmodule = " << P11MUX_TEST_FAULTY_PATH
                         << "\n[group.signing]\nmembers = f/label:mock-token-0, "
                            "f/label:mock-token-1, f/label:mock-token-2\n"
                         << group;
    ::setenv("P11MUX_CONFIG", path_.c_str(), 1);
    ::setenv("P11MUX_MODULE", "", 1);
    ::setenv("P11MUX_FAULTY_TARGET", P11MUX_TEST_MOCK_PATH, 1);
    ::setenv("P11MUX_LOG_LEVEL", "info", 1);
    for (auto [name, value] : env) ::setenv(name, value, 1);
    CHECK(libs().mock->reset() == 0);
    MockConfig config{};
    config.slot_count = 3;
    config.provide_v3 = 1;  // C_LoginUser
    REQUIRE(libs().mock->configure(&config) == 0);
    REQUIRE(faulty_control()->reset() == 0);
    CK_C_INITIALIZE_ARGS os{};
    os.flags = CKF_OS_LOCKING_OK;
    CK_RV rv = CKR_OK;
    log_ += capture_stderr([&] { rv = p11->C_Initialize(&os); });
    REQUIRE(rv == CKR_OK);
    for (CK_SLOT_ID slot = 0; slot < 3; ++slot) set_token_pin(slot, MOCK_USER_PIN, kPin);
  }
  ~GroupLoginProxy() {
    faulty_control()->reset();
    p11->C_Finalize(nullptr);
    ::unlink(path_.c_str());
    reset_environment();
  }
  GroupLoginProxy(const GroupLoginProxy&) = delete;
  GroupLoginProxy& operator=(const GroupLoginProxy&) = delete;

  // What the call returns; what p11mux logged meanwhile goes to log().
  template <class Call>
  CK_RV logged(Call&& call) {
    CK_RV rv = CKR_OK;
    log_ += capture_stderr([&] { rv = call(); });
    return rv;
  }
  CK_RV open(CK_SESSION_HANDLE& h, CK_FLAGS flags = CKF_SERIAL_SESSION) {
    return logged([&] { return p11->C_OpenSession(0, flags, nullptr, nullptr, &h); });
  }
  CK_RV login(CK_SESSION_HANDLE h, std::string_view pin = kPin) {
    return logged([&] { return p11->C_Login(h, CKU_USER, utf8(pin), pin.size()); });
  }
  CK_STATE state(CK_SESSION_HANDLE h) {
    CK_SESSION_INFO info{};
    REQUIRE(p11->C_GetSessionInfo(h, &info) == CKR_OK);
    return info.state;
  }
  const std::string& log() const { return log_; }
  // Waits up to `limit` for done(log), `log` being log() with what p11mux
  // logged since (its p11mux-members thread's lines too), which stays in log().
  template <class Done>
  bool log_until(Done done, std::chrono::milliseconds limit = std::chrono::seconds(5)) {
    char path[] = "/tmp/p11mux-group-login-XXXXXX";
    const int fd = ::mkstemp(path);
    REQUIRE(fd >= 0);
    ::unlink(path);
    std::fflush(stderr);
    const int saved = ::dup(2);
    ::dup2(fd, 2);
    const auto deadline = std::chrono::steady_clock::now() + limit;
    const std::size_t before = log_.size();
    bool met = false;
    for (;;) {
      log_.resize(before);
      char buf[4096];
      for (off_t at = 0;;) {
        const ssize_t n = ::pread(fd, buf, sizeof buf, at);
        if (n <= 0) break;
        log_.append(buf, static_cast<std::size_t>(n));
        at += n;
      }
      if ((met = done(std::as_const(log_))) || std::chrono::steady_clock::now() > deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    ::dup2(saved, 2);
    ::close(saved);
    ::close(fd);
    return met;
  }

  CK_FUNCTION_LIST* p11 = libs().p11;

 private:
  std::string path_;
  std::string log_;
};

}  // namespace p11mux::test
