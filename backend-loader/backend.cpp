#include "backend.hpp"

#include "proxy_mutexes.hpp"

#include <p11mux/ckr_error.hpp>
#include <p11mux/rv_names.hpp>

#include <array>
#include <cstring>

namespace p11mux {

std::string_view to_string(BackendLocking locking) noexcept {
  switch (locking) {
    case BackendLocking::automatic:
      return "auto";
    case BackendLocking::os:
      return "os";
    case BackendLocking::callbacks:
      return "callbacks";
    case BackendLocking::none:
      return "none";
  }
  return "?";
}

namespace {

SharedLibrary open_module(const BackendOptions& options) {
  if (options.module != nullptr) return SharedLibrary(options.module);
  return SharedLibrary(options.path);
}

}  // namespace

Backend::Backend(const BackendOptions& options)
    : path_(options.path), library_(open_module(options)) {
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(library_.symbol("C_GetFunctionList"));
  if (get_list == nullptr) {
    throw CkrError(CKR_GENERAL_ERROR,
                   "backend module '" + path_ + "' is not a PKCS#11 module: no C_GetFunctionList");
  }
  if (is_self(library_, options.self)) {
    throw CkrError(CKR_GENERAL_ERROR,
                   "backend module '" + path_ + "' is p11mux itself; name the vendor module");
  }
  resolve_functions();
  initialize(options);
}

Backend::~Backend() { (void)finalize(); }

// Prefer the v3.0 interface; its list is sized by the interface, never by the
// version field of a 2.x list (docs/pkcs11-facts.md, "v3.0").
void Backend::resolve_functions() {
  interfaces_ = discover_interfaces(library_);
  if (interfaces_.v3 != nullptr) {
    functions_ = *interfaces_.v3;  // exactly the 3.0 part of a 3.x list
  } else {
    auto get_list = reinterpret_cast<CK_C_GetFunctionList>(library_.symbol("C_GetFunctionList"));
    CK_FUNCTION_LIST* list = nullptr;
    if (CK_RV rv = get_list(&list); rv != CKR_OK) {
      throw CkrError(rv, "backend module '" + path_ +
                             "': C_GetFunctionList failed: " + std::string(rv_name(rv)));
    }
    if (list == nullptr) {
      throw CkrError(CKR_GENERAL_ERROR, "backend module '" + path_ +
                                            "': C_GetFunctionList returned CKR_OK and no list");
    }
    // Copy exactly the v2.x list; the v3.0 tail stays NULL, so those calls
    // return CKR_FUNCTION_NOT_SUPPORTED. A list from C_GetFunctionList that
    // claims 3.x is still only known to be CK_FUNCTION_LIST-sized: record the
    // interface actually negotiated, which the forwarders go by.
    std::memcpy(&functions_, list, sizeof(CK_FUNCTION_LIST));
    if (functions_.version.major >= 3) functions_.version = CK_VERSION{2, 40};
  }
  if (functions_.C_Initialize == nullptr) {
    throw CkrError(CKR_GENERAL_ERROR,
                   "backend module '" + path_ + "' has no C_Initialize in its function list");
  }
}

// docs/pkcs11-facts.md, "Initializing the backend": OS locking, then p11mux's own
// callbacks, then no locking (the backend is then serialized by p11mux).
void Backend::initialize(const BackendOptions& options) {
  std::string reserved = options.init_reserved.value_or("");
  CK_C_INITIALIZE_ARGS args{};
  args.pReserved = options.init_reserved ? reserved.data() : nullptr;

  auto attempt = [&](BackendLocking how) {
    args.flags = how == BackendLocking::os ? CKF_OS_LOCKING_OK : 0;
    bool callbacks = how == BackendLocking::callbacks;
    args.CreateMutex = callbacks ? &proxy_mutexes::create : nullptr;
    args.DestroyMutex = callbacks ? &proxy_mutexes::destroy : nullptr;
    args.LockMutex = callbacks ? &proxy_mutexes::lock : nullptr;
    args.UnlockMutex = callbacks ? &proxy_mutexes::unlock : nullptr;
    // NULL args mean "no threads"; with an init string we still need the struct.
    bool null_args = how == BackendLocking::none && !options.init_reserved;
    return functions_.C_Initialize(null_args ? nullptr : &args);
  };

  std::array<BackendLocking, 3> order{BackendLocking::os, BackendLocking::callbacks,
                                      BackendLocking::none};
  size_t first = 0, last = order.size();
  if (options.locking != BackendLocking::automatic) {
    for (size_t i = 0; i < order.size(); ++i) {
      if (order[i] == options.locking) first = i, last = i + 1;
    }
  }
  CK_RV rv = CKR_GENERAL_ERROR;
  std::string tried;
  for (size_t i = first; i < last; ++i) {
    rv = attempt(order[i]);
    tried += std::string(tried.empty() ? "" : ", ") + std::string(to_string(order[i])) + " -> " +
             std::string(rv_name(rv));
    if (rv == CKR_OK) {
      locking_ = order[i];
      thread_safe_ = order[i] != BackendLocking::none;
      owns_initialization_ = true;
      return;
    }
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED && options.inherited) {
      // A forked child's copy of the backend p11mux initialized in the parent
      // (a backend that handles fork() itself answers CKR_OK above). Its
      // locking is what p11mux chose then: keep it rather than serialize.
      // And it is ours: nobody else in this process initialized it, and a
      // fork-unaware backend's state is a private copy of the parent's
      // memory, so the child's C_Finalize finalizes it (releasing that copy,
      // the parent's sessions included, in the child only). Leaving it
      // initialized would make the child's next C_Initialize find it
      // "already initialized by another user" and serialize every call.
      locking_ = *options.inherited;
      thread_safe_ = locking_ != BackendLocking::none;
      owns_initialization_ = true;
      inherited_ = true;
      return;
    }
    if (rv == CKR_CRYPTOKI_ALREADY_INITIALIZED) {
      // Someone else in this process initialized it with locking we cannot
      // see; assume the worst unless the configuration says it was OS locking.
      locking_ = options.locking == BackendLocking::os ? BackendLocking::os : BackendLocking::none;
      thread_safe_ = options.locking == BackendLocking::os;
      owns_initialization_ = false;
      return;
    }
    // Only "that kind of locking is not for me" moves on to the next kind.
    if (rv != CKR_CANT_LOCK && rv != CKR_ARGUMENTS_BAD) break;
  }
  // The backend's refusal of a locking kind is not the application's problem:
  // CKR_CANT_LOCK or CKR_ARGUMENTS_BAD would misdescribe its own arguments.
  bool misleading = rv == CKR_CANT_LOCK || rv == CKR_ARGUMENTS_BAD;
  throw CkrError(misleading ? CKR_GENERAL_ERROR : rv,
                 "backend module '" + path_ + "': C_Initialize failed: " +
                     std::string(rv_name(rv)) + " (tried " + tried + ")");
}

CK_RV Backend::finalize() noexcept {
  if (finalized_ || !owns_initialization_) {
    finalized_ = true;
    return CKR_OK;
  }
  finalized_ = true;
  return functions_.C_Finalize(nullptr);
}

void Backend::abandon() noexcept {
  finalized_ = true;
  library_.leak();
}

}  // namespace p11mux
