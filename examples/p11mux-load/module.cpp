#include "module.h"

#include <dlfcn.h>

#include <cstring>

#include "ckr_names.h"

namespace p11mux::load {

void check_rv(CK_RV rv, const std::string& what) {
  if (rv != CKR_OK) throw SetupError(what + ": " + ckr_name(rv));
}

std::string padded_to_string(const CK_UTF8CHAR* text, std::size_t size) {
  std::string s(reinterpret_cast<const char*>(text), size);
  while (!s.empty() && (s.back() == ' ' || s.back() == '\0')) s.pop_back();
  return s;
}

Module::Module(const std::string& path) : path_(path) {
  // A bare name ("libsofthsm2.so") is searched for by the dynamic linker, as
  // with every PKCS#11 consumer; a path with a slash is used as given.
  handle_ = ::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (!handle_) {
    const char* why = ::dlerror();
    throw SetupError("cannot load module " + path + ": " + (why ? why : "dlopen failed"));
  }
  // From here on the destructor does not run on a throw: clean up by hand.
  auto fail = [this](const std::string& message) {
    ::dlclose(handle_);
    handle_ = nullptr;
    throw SetupError(message);
  };
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(handle_, "C_GetFunctionList"));
  if (!get_list) fail(path + " is not a PKCS#11 module (it has no C_GetFunctionList)");
  CK_RV rv = get_list(&fn_);
  if (rv != CKR_OK || !fn_) fail("C_GetFunctionList of " + path + " failed: " + ckr_name(rv));

  // Prefer the OS's locks; a module that cannot use them gets NULL arguments
  // and is then only as thread-safe as it happens to be (we say so).
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  rv = fn_->C_Initialize(&args);
  if (rv == CKR_CANT_LOCK) {
    thread_safe_ = false;
    rv = fn_->C_Initialize(nullptr);
  }
  if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
    rv = CKR_OK;  // someone else in this process owns it: do not finalize
  } else if (rv == CKR_OK) {
    finalize_ = true;
  }
  if (rv != CKR_OK) fail("C_Initialize of " + path + " failed: " + ckr_name(rv));

  CK_INFO info{};
  if (fn_->C_GetInfo(&info) == CKR_OK) {
    description_ = padded_to_string(info.manufacturerID, sizeof info.manufacturerID) + " / " +
                   padded_to_string(info.libraryDescription, sizeof info.libraryDescription) + " " +
                   std::to_string(info.libraryVersion.major) + "." +
                   std::to_string(info.libraryVersion.minor) + ", Cryptoki " +
                   std::to_string(info.cryptokiVersion.major) + "." +
                   std::to_string(info.cryptokiVersion.minor);
  }
}

Module::~Module() {
  if (finalize_) fn_->C_Finalize(nullptr);
  // The library stays mapped: modules commonly register atexit handlers and
  // thread-exit destructors (OpenSSL, for one) that must not outlive their code.
}

std::vector<TokenInfo> list_tokens(const Module& module) {
  CK_FUNCTION_LIST* f = module.fn();
  std::vector<CK_SLOT_ID> slots;
  CK_RV rv;
  do {  // the list can grow between the two calls
    CK_ULONG n = 0;
    check_rv(f->C_GetSlotList(CK_FALSE, nullptr, &n), "C_GetSlotList");
    slots.resize(n);
    rv = f->C_GetSlotList(CK_FALSE, slots.data(), &n);
    slots.resize(n);
  } while (rv == CKR_BUFFER_TOO_SMALL);
  check_rv(rv, "C_GetSlotList");

  std::vector<TokenInfo> out;
  for (CK_SLOT_ID id : slots) {
    TokenInfo t{};
    t.slot = id;
    CK_SLOT_INFO si{};
    if (f->C_GetSlotInfo(id, &si) != CKR_OK) continue;
    t.slot_description = padded_to_string(si.slotDescription, sizeof si.slotDescription);
    t.present = (si.flags & CKF_TOKEN_PRESENT) != 0;
    if (t.present) {
      CK_TOKEN_INFO ti{};
      if (f->C_GetTokenInfo(id, &ti) == CKR_OK) {
        t.label = padded_to_string(ti.label, sizeof ti.label);
        t.manufacturer = padded_to_string(ti.manufacturerID, sizeof ti.manufacturerID);
        t.model = padded_to_string(ti.model, sizeof ti.model);
        t.serial = padded_to_string(ti.serialNumber, sizeof ti.serialNumber);
        t.flags = ti.flags;
      } else {
        t.present = false;
      }
    }
    out.push_back(std::move(t));
  }
  return out;
}

TokenInfo select_token(const Module& module, const std::optional<std::string>& label,
                       const std::optional<CK_SLOT_ID>& slot) {
  std::vector<TokenInfo> all = list_tokens(module);
  std::string known;
  for (const TokenInfo& t : all) {
    if (!t.present) continue;
    if (!known.empty()) known += ", ";
    known += "'" + t.label + "' (slot " + std::to_string(t.slot) + ")";
  }
  if (known.empty()) known = "none";
  for (const TokenInfo& t : all) {
    if (label && t.present && t.label == *label) return t;
    if (slot && t.slot == *slot) {
      if (!t.present)
        throw SetupError("slot " + std::to_string(*slot) + " has no token (tokens: " + known + ")");
      return t;
    }
  }
  if (!label && !slot) {
    // The first token, preferring initialized ones: SoftHSM2 always adds an
    // empty slot with an uninitialized token after the real ones.
    for (const TokenInfo& t : all) {
      if (t.present && (t.flags & CKF_TOKEN_INITIALIZED)) return t;
    }
    for (const TokenInfo& t : all) {
      if (t.present) return t;
    }
  }
  if (label)
    throw SetupError("no token labelled '" + *label + "' in " + module.path() + " (tokens: " + known + ")");
  if (slot)
    throw SetupError("no slot " + std::to_string(*slot) + " in " + module.path() + " (tokens: " + known +
                     ")");
  throw SetupError("no slot of " + module.path() + " has a token");
}

Session::Session(CK_FUNCTION_LIST* fn, CK_SLOT_ID slot, CK_FLAGS flags, const std::string& purpose) {
  CK_RV rv = fn->C_OpenSession(slot, flags | CKF_SERIAL_SESSION, nullptr, nullptr, &handle_);
  check_rv(rv, "C_OpenSession (" + purpose + ") on slot " + std::to_string(slot));
  fn_ = fn;
}

Session::~Session() { close(); }

Session::Session(Session&& other) noexcept : fn_(other.fn_), handle_(other.handle_) { other.fn_ = nullptr; }

Session& Session::operator=(Session&& other) noexcept {
  if (this != &other) {
    close();
    fn_ = other.fn_;
    handle_ = other.handle_;
    other.fn_ = nullptr;
  }
  return *this;
}

void Session::close() noexcept {
  if (fn_) fn_->C_CloseSession(handle_);
  fn_ = nullptr;
}

void login_user(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE session, const std::optional<std::string>& pin,
                const std::string& token_label) {
  // The PIN goes to the module and nowhere else: not into messages or logs.
  CK_RV rv =
      pin ? fn->C_Login(session, CKU_USER, reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(pin->data())),
                        static_cast<CK_ULONG>(pin->size()))
          : fn->C_Login(session, CKU_USER, nullptr, 0);
  if (rv == CKR_USER_ALREADY_LOGGED_IN) return;
  check_rv(rv, "C_Login as user on token '" + token_label + "' failed");
}

}  // namespace p11mux::load
