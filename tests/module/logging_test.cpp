// Call tracing: every call logged at trace level, PINs never.
#include "harness.hpp"

#include <fstream>
#include <sstream>

namespace p11mux::test {
namespace {

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

TEST_CASE("trace logs each call with its return code name and never a PIN") {
  std::string log = "/tmp/p11mux-trace-test.log";
  ::unlink(log.c_str());
  const std::string secret = "Zq7-s3cr";
  {
    Proxy proxy({}, nullptr, {{"P11MUX_LOG_LEVEL", "trace"}, {"P11MUX_LOG_FILE", log.c_str()}});
    CK_FUNCTION_LIST* p = proxy.p11;
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(p->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
            CKR_OK);
    auto pin = [](const std::string& s) {
      return reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(s.data()));
    };
    std::string user = MOCK_USER_PIN;
    REQUIRE(p->C_Login(h, CKU_USER, pin(user), user.size()) == CKR_OK);
    REQUIRE(p->C_SetPIN(h, pin(user), user.size(), pin(secret), secret.size()) == CKR_OK);
    REQUIRE(p->C_Logout(h) == CKR_OK);
    CHECK(p->C_Login(h, CKU_USER, pin(secret), secret.size()) == CKR_OK);
    CHECK(p->C_Login(h, CKU_USER, pin(secret), secret.size()) == CKR_USER_ALREADY_LOGGED_IN);
  }
  reset_environment();
  std::string text = read_file(log);
  CHECK(text.find("C_OpenSession(") != std::string::npos);
  CHECK(text.find("C_Login(") != std::string::npos);
  CHECK(text.find("= CKR_USER_ALREADY_LOGGED_IN") != std::string::npos);
  CHECK(text.find("***") != std::string::npos);
  CHECK(text.find(secret) == std::string::npos);
  CHECK(text.find(MOCK_USER_PIN ",") == std::string::npos);
  ::unlink(log.c_str());
}

}  // namespace
}  // namespace p11mux::test
