#include "session.h"

#include "ck_error.h"

namespace p11test {

Session::Session(const CK_FUNCTION_LIST& fn, CK_SLOT_ID slot, Access access) : fn_(fn) {
  CK_FLAGS flags = CKF_SERIAL_SESSION;
  if (access == Access::read_write) flags |= CKF_RW_SESSION;
  ck_check(fn_.C_OpenSession(slot, flags, nullptr, nullptr, &handle_), "C_OpenSession");
  open_ = true;
}

Session::~Session() { close(); }

CK_RV Session::close() noexcept {
  if (!open_) return CKR_SESSION_HANDLE_INVALID;
  open_ = false;
  return fn_.C_CloseSession(handle_);
}

CK_RV login_user(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, std::string_view pin) {
  // C_Login takes a non-const pointer but does not write through it.
  auto* text = reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(pin.data()));
  return fn.C_Login(session, CKU_USER, text, pin.size());
}

}  // namespace p11test
