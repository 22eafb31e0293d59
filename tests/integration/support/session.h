// A PKCS#11 session closed on destruction, and the login helper.
#pragma once

#include <p11mux/pkcs11.h>

#include <string_view>

namespace p11test {

enum class Access { read_only, read_write };

class Session {
 public:
  // C_OpenSession (serial, R/O or R/W); throws CkError on failure.
  Session(const CK_FUNCTION_LIST& fn, CK_SLOT_ID slot, Access access);
  ~Session();
  // Copying would close the session twice.
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;

  CK_SESSION_HANDLE handle() const noexcept { return handle_; }
  operator CK_SESSION_HANDLE() const noexcept { return handle_; }

  // C_CloseSession now; the destructor then does nothing. Returns the module's answer.
  CK_RV close() noexcept;

 private:
  const CK_FUNCTION_LIST& fn_;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
  bool open_ = false;
};

// C_Login(CKU_USER) with pin; returns the module's answer.
CK_RV login_user(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, std::string_view pin);

}  // namespace p11test
