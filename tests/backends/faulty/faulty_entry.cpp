// The faulty module's entry points. Every function is generated from
// <p11mux/functions.h>: a session call (first argument letter 'h') maps the
// handle, any other call is forwarded as is, both after the removal check,
// the fault rules and the latency. Eight functions are hand-written, named
// in one place below (Handler<>): the lifecycle, the interfaces and the
// session lifecycle.
#include "faulty_state.hpp"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string_view>
#include <tuple>
#include <type_traits>

// ---- one descriptor per function ----
// (Outside the anonymous namespace: clang warns about members unused by some.)
namespace p11mux::faulty::desc {
#define FAULTY_DESCRIBE(name_, since_, dispatch_, args_)         \
  struct name_ {                                                 \
    static constexpr Fn fn = Fn::name_;                          \
    static constexpr std::string_view name = #name_;             \
    static constexpr std::string_view args = args_;              \
    static constexpr auto member = &CK_FUNCTION_LIST_3_0::name_; \
    using Pointer = CK_##name_;                                  \
    static_assert(args.find('h', 1) == std::string_view::npos,   \
                  "only a first argument is a session handle");  \
  };
P11MUX_FUNCTIONS(FAULTY_DESCRIBE)
#undef FAULTY_DESCRIBE
}  // namespace p11mux::faulty::desc

namespace p11mux::faulty {
namespace {

// Exceptions never cross the C boundary.
template <class F>
CK_RV guarded(F&& body) noexcept {
  try {
    return body();
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  } catch (...) {
    return CKR_GENERAL_ERROR;
  }
}

// Counts a call and the threads inside; lifecycle and interface calls are
// counted but not "inside" (C_Finalize must not see itself).
class CallScope {
 public:
  CallScope(Fn fn, bool tracked, bool waiter = false) : tracked_(tracked), waiter_(waiter) {
    Module& m = module();
    bump(m.counters.calls_total);
    bump(m.counters.calls[index(fn)]);
    if (!tracked_) return;
    auto relaxed = std::memory_order_relaxed;
    unsigned long now = (waiter_ ? m.waiting : m.active).fetch_add(1, relaxed) + 1 +
                        (waiter_ ? m.active : m.waiting).load(relaxed);
    raise_peak(m.counters.max_concurrent_calls, now);
  }
  ~CallScope() {
    if (tracked_)
      (waiter_ ? module().waiting : module().active).fetch_sub(1, std::memory_order_relaxed);
  }
  CallScope(const CallScope&) = delete;
  CallScope& operator=(const CallScope&) = delete;

 private:
  bool tracked_, waiter_;
};

CK_RV not_initialized() {
  bump(module().counters.calls_not_initialized);
  return CKR_CRYPTOKI_NOT_INITIALIZED;
}

// A call on one session: a second one at the same time is a violation.
class SessionUse {
 public:
  explicit SessionUse(Session& s) : s_(s) {
    if (s_.inside.fetch_add(1, std::memory_order_relaxed) != 0)
      bump(module().counters.session_violations);
  }
  ~SessionUse() { s_.inside.fetch_sub(1, std::memory_order_relaxed); }
  SessionUse(const SessionUse&) = delete;
  SessionUse& operator=(const SessionUse&) = delete;

 private:
  Session& s_;
};

// Whether a call that can end its operation did: not a length query (NULL
// output buffer, letter 'o') and not CKR_BUFFER_TOO_SMALL.
template <class D, class... A>
bool ended_operation(CK_RV rv, A... a) {
  if (rv == CKR_BUFFER_TOO_SMALL) return false;
  constexpr std::size_t out = D::args.find('o');
  if constexpr (out != std::string_view::npos) {
    if (rv == CKR_OK && std::get<out>(std::tuple<A...>{a...}) == nullptr) return false;
  }
  return true;
}

// ---- generated forwarders ----
template <class D, class Pointer = typename D::Pointer>
struct Forward;

template <class D, class... A>
struct Forward<D, CK_RV (*)(A...)> {
  static CK_RV call(A... a) noexcept {
    constexpr bool waiter = D::fn == Fn::C_WaitForSlotEvent;
    CallScope scope(D::fn, true, waiter);
    return guarded([&]() -> CK_RV {
      Module& m = module();
      if (!m.initialized()) {
        // The spec lets C_WaitForSlotEvent race C_Finalize: not counted.
        if constexpr (waiter) return CKR_CRYPTOKI_NOT_INITIALIZED;
        return not_initialized();
      }
      auto target_fn = m.target().functions.*D::member;
      if constexpr (D::args[0] == 'h') {
        return [&](CK_SESSION_HANDLE handle, auto... rest) -> CK_RV {
          std::shared_ptr<Session> s;
          if (CK_RV rv = m.lookup(handle, s); rv != CKR_OK) return rv;
          SessionUse use(*s);
          if (m.removed()) return CKR_DEVICE_REMOVED;
          if (m.slot_faults.any()) {
            constexpr bool replace = op_effect(D::name) != OpEffect::ends;
            if (auto rv = m.slot_faults.enter(s->slot, SlotCall::session, replace)) return *rv;
          }
          if constexpr (op_effect(D::name) != OpEffect::ends) {
            if (auto rv = m.settings.inject(D::fn, m.counters, InjectAt::before)) return *rv;
          }
          m.settings.delay(D::fn, m.counters);
          if (target_fn == nullptr) return CKR_FUNCTION_NOT_SUPPORTED;
          CK_RV rv = target_fn(s->target_handle, rest...);
          if constexpr (op_effect(D::name) != OpEffect::ends) {
            if (auto late = m.settings.inject(D::fn, m.counters, InjectAt::after)) return *late;
          }
          if constexpr (op_effect(D::name) == OpEffect::ends) {
            if (ended_operation<D>(rv, a...)) {
              if (m.slot_faults.any()) {
                if (auto failed = m.slot_faults.failing(s->slot)) return *failed;
              }
              if (auto injected = m.settings.inject(D::fn, m.counters)) return *injected;
            }
          }
          return rv;
        }(a...);
      } else {
        if (needs_token(D::name) && m.removed()) return CKR_TOKEN_NOT_PRESENT;
        constexpr bool slot_info = D::fn == Fn::C_GetSlotInfo;
        bool token_removed = false;
        if constexpr (takes_slot(D::name)) {
          if (m.slot_faults.any()) {
            const CK_SLOT_ID slot = std::get<0>(std::tuple<A...>{a...});
            const SlotCall call = slot_info ? SlotCall::slot_info : SlotCall::token;
            if (auto rv = m.slot_faults.enter(slot, call, true)) return *rv;
            token_removed = slot_info && m.slot_faults.removed(slot);
          }
        }
        if (auto rv = m.settings.inject(D::fn, m.counters)) return *rv;
        m.settings.delay(D::fn, m.counters);
        if (target_fn == nullptr) return CKR_FUNCTION_NOT_SUPPORTED;
        CK_RV rv = target_fn(a...);
        if constexpr (slot_info) {
          // A slot whose token was removed (faulty_set_slot_removed) says so.
          CK_SLOT_INFO* info = std::get<1>(std::tuple<A...>{a...});
          if (rv == CKR_OK && token_removed && info != nullptr) info->flags &= ~CKF_TOKEN_PRESENT;
        }
        return rv;
      }
    });
  }
};

// ---- the hand-written functions ----
CK_RV initialize(CK_VOID_PTR init_args) {
  CallScope scope(Fn::C_Initialize, false);
  return guarded([&] { return module().initialize(init_args); });
}

CK_RV finalize(CK_VOID_PTR reserved) {
  CallScope scope(Fn::C_Finalize, false);
  return guarded([&] { return module().finalize(reserved); });
}

CK_RV get_function_list(CK_FUNCTION_LIST_PTR_PTR list);
CK_RV get_interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count);
CK_RV get_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR out,
                    CK_FLAGS flags);

CK_RV open_session(CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application, CK_NOTIFY notify,
                   CK_SESSION_HANDLE_PTR out) {
  CallScope scope(Fn::C_OpenSession, true);
  return guarded([&] {
    Module& m = module();
    if (!m.initialized()) return not_initialized();
    return m.open_session(Fn::C_OpenSession, slot, flags, application, notify, out);
  });
}

CK_RV close_session(CK_SESSION_HANDLE handle) {
  CallScope scope(Fn::C_CloseSession, true);
  return guarded([&] {
    Module& m = module();
    if (!m.initialized()) return not_initialized();
    return m.close_session(Fn::C_CloseSession, handle);
  });
}

CK_RV close_all_sessions(CK_SLOT_ID slot) {
  CallScope scope(Fn::C_CloseAllSessions, true);
  return guarded([&] {
    Module& m = module();
    if (!m.initialized()) return not_initialized();
    return m.close_all_sessions(Fn::C_CloseAllSessions, slot);
  });
}

// The hand-written functions, in one list. (A flag rather than comparing the
// function pointer with nullptr: GCC's UBSan builds do not treat that
// comparison as a constant expression.)
template <class D>
struct Handler {
  static constexpr bool hand_written = false;
};
#define FAULTY_HANDLED(name, function)         \
  template <>                                  \
  struct Handler<desc::name> {                 \
    static constexpr bool hand_written = true; \
    static constexpr CK_##name fn = &function; \
  };
FAULTY_HANDLED(C_Initialize, initialize)
FAULTY_HANDLED(C_Finalize, finalize)
FAULTY_HANDLED(C_GetFunctionList, get_function_list)
FAULTY_HANDLED(C_GetInterfaceList, get_interface_list)
FAULTY_HANDLED(C_GetInterface, get_interface)
FAULTY_HANDLED(C_OpenSession, open_session)
FAULTY_HANDLED(C_CloseSession, close_session)
FAULTY_HANDLED(C_CloseAllSessions, close_all_sessions)
#undef FAULTY_HANDLED

template <class D>
constexpr typename D::Pointer entry() {
  if constexpr (Handler<D>::hand_written) {
    return Handler<D>::fn;
  } else {
    return &Forward<D>::call;
  }
}

// ---- function lists and interfaces ----
#define FAULTY_MEMBER(name, since, dispatch, args) .name = entry<desc::name>(),
constinit CK_FUNCTION_LIST list_v2 = {.version = {2, 40}, P11MUX_FUNCTIONS_V2(FAULTY_MEMBER)};
constinit CK_FUNCTION_LIST_3_0 list_v3 = {.version = {3, 0}, P11MUX_FUNCTIONS(FAULTY_MEMBER)};
#undef FAULTY_MEMBER

char interface_name[] = "PKCS 11";
CK_INTERFACE interface_v3{reinterpret_cast<CK_CHAR*>(interface_name), &list_v3, 0};
CK_INTERFACE interface_v2{reinterpret_cast<CK_CHAR*>(interface_name), &list_v2, 0};

// P11MUX_FAULTY_MISSING=C_CloseSession,C_Logout,...: the lists handed out
// have those entries NULL, like a vendor module that lacks functions. Read
// whenever a list is asked for; the copies are rewritten then (tests ask
// before initializing, from one thread).
CK_FUNCTION_LIST sparse_v2;
CK_FUNCTION_LIST_3_0 sparse_v3;

bool missing(std::string_view names, std::string_view name) {
  for (std::size_t at = 0; at <= names.size();) {
    std::size_t end = std::min(names.find(',', at), names.size());
    if (names.substr(at, end - at) == name) return true;
    at = end + 1;
  }
  return false;
}

template <class List>
void* as_listed(List& full, List& sparse) {
  const char* env = std::getenv("P11MUX_FAULTY_MISSING");
  if (env == nullptr || *env == '\0') return &full;
  std::string_view names(env);
  sparse = full;
#define FAULTY_CLEAR(name, since, dispatch, args) \
  if (missing(names, #name)) sparse.name = nullptr;
  if constexpr (std::is_same_v<List, CK_FUNCTION_LIST>) {
    P11MUX_FUNCTIONS_V2(FAULTY_CLEAR)
  } else {
    P11MUX_FUNCTIONS(FAULTY_CLEAR)
  }
#undef FAULTY_CLEAR
  return &sparse;
}

CK_RV get_function_list(CK_FUNCTION_LIST_PTR_PTR list) {
  CallScope scope(Fn::C_GetFunctionList, false);
  if (list == nullptr) return CKR_ARGUMENTS_BAD;
  *list = static_cast<CK_FUNCTION_LIST*>(as_listed(list_v2, sparse_v2));
  return CKR_OK;
}

// The 3.0 interface only when the target has one: its v3.0 calls would
// otherwise all be CKR_FUNCTION_NOT_SUPPORTED.
std::size_t offered(CK_INTERFACE* (&out)[2]) {
  const Target* t = module().probe_target();
  std::size_t n = 0;
  interface_v3.pFunctionList = as_listed(list_v3, sparse_v3);
  interface_v2.pFunctionList = as_listed(list_v2, sparse_v2);
  if (t != nullptr && t->v3) out[n++] = &interface_v3;
  out[n++] = &interface_v2;
  return n;
}

CK_RV get_interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  CallScope scope(Fn::C_GetInterfaceList, false);
  return guarded([&] {
    if (count == nullptr) return CKR_ARGUMENTS_BAD;
    CK_INTERFACE* ifaces[2];
    std::size_t n = offered(ifaces);
    if (list == nullptr) {
      *count = n;
      return CKR_OK;
    }
    if (*count < n) {
      *count = n;
      return CKR_BUFFER_TOO_SMALL;
    }
    for (std::size_t i = 0; i < n; ++i) list[i] = *ifaces[i];
    *count = n;
    return CKR_OK;
  });
}

CK_RV get_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR out,
                    CK_FLAGS flags) {
  CallScope scope(Fn::C_GetInterface, false);
  return guarded([&] {
    if (out == nullptr) return CKR_ARGUMENTS_BAD;
    if (name != nullptr && std::strcmp(reinterpret_cast<const char*>(name), interface_name) != 0)
      return CKR_ARGUMENTS_BAD;
    CK_INTERFACE* ifaces[2];
    std::size_t n = offered(ifaces);
    for (std::size_t i = 0; i < n; ++i) {  // highest version first
      auto v = static_cast<const CK_FUNCTION_LIST*>(ifaces[i]->pFunctionList)->version;
      if (version != nullptr && (version->major != v.major || version->minor != v.minor)) continue;
      if ((flags & ~ifaces[i]->flags) != 0) continue;
      *out = ifaces[i];
      return CKR_OK;
    }
    return CKR_ARGUMENTS_BAD;
  });
}

}  // namespace
}  // namespace p11mux::faulty

#define FAULTY_EXPORT extern "C" __attribute__((visibility("default")))

FAULTY_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
  return p11mux::faulty::get_function_list(list);
}

FAULTY_EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  return p11mux::faulty::get_interface_list(list, count);
}

FAULTY_EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                                   CK_INTERFACE_PTR_PTR out, CK_FLAGS flags) {
  return p11mux::faulty::get_interface(name, version, out, flags);
}
