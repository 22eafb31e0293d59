// Call tracing: every call logged at trace level, PINs never.
#include "harness.hpp"
#include "recorder_control.h"

#include <sys/mman.h>

#include <algorithm>
#include <fstream>
#include <memory>
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

// The last CK_ATTRIBUTE of a readable page, before an inaccessible one: a
// reader that walks past it faults at once.
class GuardedTemplate {
 public:
  GuardedTemplate() {
    page_ = static_cast<std::size_t>(::sysconf(_SC_PAGESIZE));
    void* p = ::mmap(nullptr, 2 * page_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    REQUIRE(p != MAP_FAILED);
    base_ = static_cast<unsigned char*>(p);
    REQUIRE(::mprotect(base_ + page_, page_, PROT_NONE) == 0);
  }
  ~GuardedTemplate() { ::munmap(base_, 2 * page_); }
  GuardedTemplate(const GuardedTemplate&) = delete;
  GuardedTemplate& operator=(const GuardedTemplate&) = delete;
  CK_ATTRIBUTE* last() { return reinterpret_cast<CK_ATTRIBUTE*>(base_ + page_) - 1; }

 private:
  std::size_t page_ = 0;
  unsigned char* base_ = nullptr;
};

TEST_CASE("trace: a stale handle with a huge count over a short template is traced, not walked") {
  std::string log = "/tmp/p11mux-trace-stale-test.log";
  ::unlink(log.c_str());
  GuardedTemplate guarded;
  CK_OBJECT_CLASS cls = CKO_DATA;
  *guarded.last() = CK_ATTRIBUTE{CKA_CLASS, &cls, sizeof cls};
  {
    Proxy proxy({}, nullptr, {{"P11MUX_LOG_LEVEL", "trace"}, {"P11MUX_LOG_FILE", log.c_str()}});
    CK_FUNCTION_LIST* p = proxy.p11;
    CK_SESSION_HANDLE stale = proxy.open();
    REQUIRE(p->C_CloseSession(stale) == CKR_OK);
    CHECK(p->C_FindObjectsInit(stale, guarded.last(), 1'000'000) == CKR_SESSION_HANDLE_INVALID);
    CK_OBJECT_HANDLE obj = CK_INVALID_HANDLE;
    CHECK(p->C_CreateObject(stale, guarded.last(), 1'000'000, &obj) == CKR_SESSION_HANDLE_INVALID);
    CHECK(p->C_GetAttributeValue(stale, 1, guarded.last(), 1'000'000) == CKR_SESSION_HANDLE_INVALID);
    // The same template with its true count, on a live session: shown in full.
    CK_SESSION_HANDLE h = proxy.open();
    CHECK(p->C_FindObjectsInit(h, guarded.last(), 1) == CKR_OK);
    CHECK(p->C_FindObjectsFinal(h) == CKR_OK);
  }
  reset_environment();
  std::string text = read_file(log);
  CHECK(text.find("C_FindObjectsInit(") != std::string::npos);
  CHECK(text.find("{1000000 attributes}) = CKR_SESSION_HANDLE_INVALID") != std::string::npos);
  CHECK(text.find("{CKA_CLASS=CKO_DATA}) = CKR_OK") != std::string::npos);
  ::unlink(log.c_str());
}

TEST_CASE("trace: a backend that reports a length beyond the caller's buffer is not read past it") {
  void* recorder = ::dlopen(P11MUX_TEST_RECORDER_PATH, RTLD_NOW | RTLD_LOCAL);
  REQUIRE_MESSAGE(recorder != nullptr, ::dlerror());
  auto set_length = reinterpret_cast<RecorderSetAttributeLengthFn>(::dlsym(recorder, "recorder_set_attribute_length"));
  REQUIRE(static_cast<bool>(set_length));
  std::string log = "/tmp/p11mux-trace-length-test.log";
  ::unlink(log.c_str());
  // 4 bytes given to the call; the canary after them is the heap block's end
  // (ASan: any read further is an overflow) and must never reach the log.
  auto block = std::make_unique<unsigned char[]>(8);
  const unsigned char bytes[8] = {0x11, 0x22, 0x33, 0x44, 0xca, 0xfe, 0xba, 0xbe};
  std::copy_n(bytes, 8, block.get());
  CK_ATTRIBUTE t[] = {{CKA_ID, block.get(), 4}, {CKA_LABEL, block.get(), 4}};
  {
    Proxy proxy({}, nullptr,
                {{"P11MUX_MODULE", P11MUX_TEST_RECORDER_PATH}, {"P11MUX_LOG_LEVEL", "trace"},
                 {"P11MUX_LOG_FILE", log.c_str()}});
    CK_SESSION_HANDLE h = proxy.open();
    set_length(64);
    CHECK(proxy.p11->C_GetAttributeValue(h, 1, t, 2) == CKR_BUFFER_TOO_SMALL);
    set_length(0);
    CHECK(t[0].ulValueLen == 64);
  }
  reset_environment();
  std::string text = read_file(log);
  CHECK(text.find("{CKA_ID [4 bytes]->64, CKA_LABEL [4 bytes]->64}) = CKR_BUFFER_TOO_SMALL") != std::string::npos);
  CHECK(text.find("cafe") == std::string::npos);
  CHECK(text.find("\\xca") == std::string::npos);
  ::unlink(log.c_str());
}

}  // namespace
}  // namespace p11mux::test
