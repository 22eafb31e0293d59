// Loading a PKCS#11 module, choosing its token, sessions and login: the setup
// steps, which report failure by throwing SetupError (exit status 2).
#pragma once

#include <p11mux/pkcs11.h>

#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

namespace p11mux::load {

// A setup failure: main prints "p11mux-load: error: <what>" and exits 2.
struct SetupError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Throws SetupError("<what>: CKR_NAME") unless rv is CKR_OK.
void check_rv(CK_RV rv, const std::string& what);

// "SoftHSM" and such: a blank-padded PKCS#11 string without its padding.
std::string padded_to_string(const CK_UTF8CHAR* text, std::size_t size);

// The loaded and initialized module. dlopen + C_GetFunctionList + C_Initialize
// in the constructor; C_Finalize in the destructor.
class Module {
 public:
  explicit Module(const std::string& path);
  ~Module();
  Module(const Module&) = delete;  // one owner calls C_Finalize
  Module& operator=(const Module&) = delete;

  CK_FUNCTION_LIST* fn() const noexcept { return fn_; }
  const std::string& path() const noexcept { return path_; }
  // "SoftHSM / Implementation of PKCS11 2.6, Cryptoki 2.40".
  const std::string& description() const noexcept { return description_; }
  // False when the module refused CKF_OS_LOCKING_OK and was initialized with
  // NULL arguments: it may not be safe to call from several threads.
  bool thread_safe() const noexcept { return thread_safe_; }

 private:
  std::string path_;
  void* handle_ = nullptr;
  CK_FUNCTION_LIST* fn_ = nullptr;
  bool finalize_ = false;
  bool thread_safe_ = true;
  std::string description_;
};

struct TokenInfo {
  CK_SLOT_ID slot;
  std::string slot_description;
  bool present;
  std::string label, manufacturer, model, serial;
  CK_FLAGS flags;
};

// All slots, with their token's details where one is present.
std::vector<TokenInfo> list_tokens(const Module& module);

// The token chosen by label or slot ID, else the first slot with a token.
TokenInfo select_token(const Module& module, const std::optional<std::string>& label,
                       const std::optional<CK_SLOT_ID>& slot);

// An open session, closed by the destructor.
class Session {
 public:
  Session() = default;
  // Throws SetupError naming `purpose` if C_OpenSession fails.
  Session(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, CK_FLAGS flags, const std::string& purpose);
  ~Session();
  Session(Session&& other) noexcept;
  Session& operator=(Session&& other) noexcept;
  Session(const Session&) = delete;  // one owner closes the handle
  Session& operator=(const Session&) = delete;

  CK_SESSION_HANDLE handle() const noexcept { return handle_; }
  bool is_open() const noexcept { return fn_ != nullptr; }

 private:
  void close() noexcept;
  CK_FUNCTION_LIST* fn_ = nullptr;
  CK_SESSION_HANDLE handle_ = CK_INVALID_HANDLE;
};

// C_Login(CKU_USER). An empty optional means the protected authentication
// path (PIN pad). Already logged in counts as success. Throws SetupError.
void login_user(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE session, const std::optional<std::string>& pin,
                const std::string& token_label);

}  // namespace p11mux::load
