// libFuzzer target: decodes its input into a sequence of PKCS#11 calls with
// hostile arguments and runs them through libp11mux.so over one of three test
// backends, the first byte of the input choosing: the null backend
// (libp11mux-null.so: every call succeeds, with plausible outputs, so
// p11mux's success paths run with whatever arguments got through its
// checks), the race detector (libp11mux-race-detector.so: a token that is
// not thread-safe, so p11mux must serialize, and that counts overlaps) or the
// spec bender (libp11mux-spec-bender.so: the same token, thread-safe, bending
// the spec as real modules do: operations kept after errors, ulValueLen
// filled on CKR_BUFFER_TOO_SMALL, handles reused at once, TLS keys returned
// in the mechanism parameter, transient CKR_SESSION_COUNT).
//
// Hostile, but never a lie about memory: every buffer is exactly as long as
// the length passed with it (allocated to that size, so AddressSanitizer sees
// any access beyond), and a pointer is NULL only where p11mux's argument
// table (<p11mux/functions.h>) says it checks or allows it. Within that:
// wrong and huge lengths (length queries with any length, buffers too small,
// zero-length buffers), bogus, stale, closed and other-generation session
// handles, random object handles, invalid mechanisms with parameters of any
// size, attribute templates with random types and value lengths, wrong PINs,
// every C_Initialize argument form, C_Finalize and re-initialization in the
// middle, simulated HSM restarts and backend failures injected into any
// function (mock_configure), Notify callbacks (these last over the race
// detector and the spec bender only).
//
// The call table is generated from <p11mux/functions.h>: every function of
// CK_FUNCTION_LIST_3_0, its arguments built from its letters and its types.
//
// After each input (p11mux finalized): every code returned was a real CKR
// code, and the race detector (or the spec bender) saw no overlapping calls,
// no call while it was not initialized, and no session left open. A failure aborts (libFuzzer
// keeps the input).
#include <p11mux/functions.h>
#include <p11mux/pkcs11.h>
#include <p11mux/rv_names.hpp>

#include "mock_control.h"
#include "null_backend.h"
#include "std_mutex_callbacks.hpp"

#include <dlfcn.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// ---- the libraries, loaded before fuzzing starts (so coverage sees them) ----

struct Libraries {
  CK_FUNCTION_LIST* v2 = nullptr;
  CK_FUNCTION_LIST_3_0 v2_as_3{};  // the 2.40 list's members, the 3.0 ones NULL
  CK_C_GetInterfaceList get_interface_list = nullptr;
  CK_C_GetInterface get_interface = nullptr;
  const MockControl* mock = nullptr;    // the race detector's controls
  const MockControl* bender = nullptr;  // the spec bender's
};
Libraries libs;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "p11mux-fuzz: %s\n", what);
  std::abort();
}

// Every backend is loaded here, so that coverage sees them from the start.
void load_libraries() {
  ::setenv("P11MUX_LOG_LEVEL", "off", 1);
  void* mock = ::dlopen(P11MUX_FUZZ_RACE_DETECTOR_PATH, RTLD_NOW | RTLD_LOCAL);
  void* bender = ::dlopen(P11MUX_FUZZ_SPEC_BENDER_PATH, RTLD_NOW | RTLD_LOCAL);
  void* null = ::dlopen(P11MUX_FUZZ_NULL_PATH, RTLD_NOW | RTLD_LOCAL);
  void* lib = ::dlopen(P11MUX_FUZZ_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
  if (mock == nullptr || bender == nullptr || null == nullptr || lib == nullptr) die(::dlerror());
  libs.mock = reinterpret_cast<MockGetControlFn>(::dlsym(mock, "mock_get_control"))();
  libs.bender = reinterpret_cast<MockGetControlFn>(::dlsym(bender, "mock_get_control"))();
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
  if (get_list == nullptr || get_list(&libs.v2) != CKR_OK) die("C_GetFunctionList");
  std::memcpy(&libs.v2_as_3, libs.v2, sizeof(CK_FUNCTION_LIST));
  libs.get_interface_list =
      reinterpret_cast<CK_C_GetInterfaceList>(::dlsym(lib, "C_GetInterfaceList"));
  libs.get_interface = reinterpret_cast<CK_C_GetInterface>(::dlsym(lib, "C_GetInterface"));
}

// ---- reading the input ----

class Input {
 public:
  Input(const std::uint8_t* data, std::size_t size) : p_(data), end_(data + size) {}
  bool empty() const { return p_ == end_; }
  std::uint8_t byte() { return p_ == end_ ? 0 : *p_++; }
  std::uint64_t u64() {
    std::uint64_t v = 0;
    for (int i = 0; i < 8; ++i) v = (v << 8) | byte();
    return v;
  }
  std::size_t below(std::size_t n) { return n == 0 ? 0 : byte() % n; }
  template <class T, std::size_t N>
  T pick(const T (&choices)[N]) {
    return choices[below(N)];
  }

 private:
  const std::uint8_t* p_;
  const std::uint8_t* end_;
};

// ---- what one input builds up ----

CK_RV fuzz_notify(CK_SESSION_HANDLE, CK_NOTIFICATION, CK_VOID_PTR) { return CKR_OK; }

// The application's mutex callbacks (C_Initialize with callbacks): real ones.
using p11mux::test_backends::create_mutex;
using p11mux::test_backends::destroy_mutex;
using p11mux::test_backends::lock_mutex;
using p11mux::test_backends::unlock_mutex;

struct State {
  Input in;
  CK_FUNCTION_LIST_3_0* v3 = nullptr;                  // p11mux's 3.0 list, when it offers one
  std::vector<std::unique_ptr<std::uint8_t[]>> arena;  // every buffer of this input
  std::vector<CK_SESSION_HANDLE> sessions, closed;
  std::vector<CK_OBJECT_HANDLE> objects;
  CK_C_INITIALIZE_ARGS init_args{};
  bool race_detector = false;  // the race detector or the spec bender; else the null backend
  const MockControl* control = nullptr;  // that one's controls
  MockConfig backend{};                  // its configuration for this input
  unsigned long calls = 0;

  explicit State(Input i) : in(i) {}

  // A zeroed buffer of exactly n bytes (n may be 0: a pointer to nothing).
  void* bytes(std::size_t n) {
    arena.push_back(std::make_unique<std::uint8_t[]>(n));
    return arena.back().get();
  }
  void* filled(std::size_t n) {
    auto* b = static_cast<std::uint8_t*>(bytes(n));
    for (std::size_t i = 0; i < n; ++i) b[i] = in.byte();
    return b;
  }
  template <class T>
  T* objects_of(std::size_t n) {
    return static_cast<T*>(bytes(n * sizeof(T)));
  }

  // A length: mostly small, sometimes 0, huge or random.
  CK_ULONG length(std::size_t small_max) {
    // clang-format off
    switch (in.below(8)) {
      case 0: return 0;
      case 1: return ~0UL;
      case 2: return in.u64();
      case 3: return 1UL << (in.byte() % 64);
      default: return in.below(small_max + 1);
    }
    // clang-format on
  }

  CK_SESSION_HANDLE session() {
    // clang-format off
    switch (in.below(10)) {
      case 0: return CK_INVALID_HANDLE;
      case 1: return in.u64();
      case 2: return closed.empty() ? ~0UL : closed[in.below(closed.size())];
      case 3:  // the same entry, another generation
        return sessions.empty() ? 1 : sessions[in.below(sessions.size())] ^ (1UL << (24 + in.byte() % 8));
      default: return sessions.empty() ? in.byte() : sessions[in.below(sessions.size())];
    }
    // clang-format on
  }

  CK_ULONG value() {
    static const CK_ULONG interesting[] = {0,
                                           1,
                                           2,
                                           3,
                                           CKU_SO,
                                           CKU_USER,
                                           CKU_CONTEXT_SPECIFIC,
                                           CKF_SERIAL_SESSION,
                                           CKF_SERIAL_SESSION | CKF_RW_SESSION,
                                           CKF_DONT_BLOCK,
                                           ~0UL,
                                           0x80000000UL,
                                           MOCK_OBJECT_HANDLE_BASE,
                                           MOCK_SESSION_HANDLE_BASE,
                                           NULL_OBJECT_HANDLE_BASE,
                                           NULL_SESSION_HANDLE_BASE};
    // clang-format off
    switch (in.below(6)) {
      case 0: return in.u64();
      case 1: return in.pick(interesting);
      case 2:
      case 3: return objects.empty() ? in.byte() : objects[in.below(objects.size())];
      default: return in.byte() % 4;
    }
    // clang-format on
  }

  CK_MECHANISM* mechanism() {
    static const CK_MECHANISM_TYPE types[] = {CKM_SHA256,
                                              CKM_SHA_1,
                                              CKM_ECDSA,
                                              CKM_ECDSA_SHA256,
                                              CKM_EC_KEY_PAIR_GEN,
                                              CKM_RSA_PKCS,
                                              CKM_RSA_PKCS_KEY_PAIR_GEN,
                                              CKM_AES_KEY_GEN,
                                              CKM_AES_CBC,
                                              CKM_AES_CBC_PAD,
                                              CKM_AES_GCM,
                                              CKM_ECDH1_DERIVE,
                                              CKM_GENERIC_SECRET_KEY_GEN,
                                              CKM_VENDOR_DEFINED,
                                              CKM_TLS_KEY_AND_MAC_DERIVE,
                                              CKM_TLS12_KEY_AND_MAC_DERIVE};
    if (in.below(12) == 0) return nullptr;  // v3.0's "cancel"; refused on v2.40
    auto* m = objects_of<CK_MECHANISM>(1);
    m->mechanism = in.below(4) == 0 ? in.u64() : in.pick(types);
    std::size_t n = in.below(4) == 0 ? in.below(65) : 0;
    m->pParameter = n == 0 && in.below(2) == 0 ? nullptr : filled(n);
    m->ulParameterLen = n;
    if (m->mechanism == CKM_TLS_KEY_AND_MAC_DERIVE || m->mechanism == CKM_TLS12_KEY_AND_MAC_DERIVE)
      key_material(*m, n);
    return m;
  }

  // The key-and-MAC derivations' parameter carries a pointer (to where the
  // module returns the keys): always a real one, its size from n.
  void key_material(CK_MECHANISM& m, std::size_t n) {
    auto* out = objects_of<CK_SSL3_KEY_MAT_OUT>(1);
    CK_ULONG mac_bits = (n & 1) != 0 ? 256 : 0, key_bits = (n & 2) != 0 ? 128 : 0;
    if (m.mechanism == CKM_TLS12_KEY_AND_MAC_DERIVE) {
      auto* p = objects_of<CK_TLS12_KEY_MAT_PARAMS>(1);
      p->ulMacSizeInBits = mac_bits;
      p->ulKeySizeInBits = key_bits;
      p->pReturnedKeyMaterial = out;
      p->prfHashMechanism = CKM_SHA256;
      m.pParameter = p;
      m.ulParameterLen = sizeof *p;
    } else {
      auto* p = objects_of<CK_SSL3_KEY_MAT_PARAMS>(1);
      p->ulMacSizeInBits = mac_bits;
      p->ulKeySizeInBits = key_bits;
      p->pReturnedKeyMaterial = out;
      m.pParameter = p;
      m.ulParameterLen = sizeof *p;
    }
  }

  // An attribute template; `count` is its length.
  CK_ATTRIBUTE* attributes(CK_ULONG& count) {
    static const CK_ATTRIBUTE_TYPE types[] = {CKA_CLASS,
                                              CKA_TOKEN,
                                              CKA_PRIVATE,
                                              CKA_LABEL,
                                              CKA_ID,
                                              CKA_VALUE,
                                              CKA_KEY_TYPE,
                                              CKA_SIGN,
                                              CKA_VERIFY,
                                              CKA_ENCRYPT,
                                              CKA_DECRYPT,
                                              CKA_EC_PARAMS,
                                              CKA_MODULUS_BITS,
                                              CKA_VALUE_LEN,
                                              CKA_SENSITIVE,
                                              CKA_EXTRACTABLE,
                                              CKA_ALWAYS_AUTHENTICATE,
                                              CKA_MODIFIABLE,
                                              CKA_VENDOR_DEFINED};
    count = in.below(7);
    if (count == 0 && in.below(2) == 0) return nullptr;
    auto* t = objects_of<CK_ATTRIBUTE>(count);
    for (CK_ULONG i = 0; i < count; ++i) {
      CK_ATTRIBUTE_TYPE type = in.below(5) == 0 ? in.u64() : in.pick(types);
      // Array attributes hold pointers to nested templates: never random bytes.
      if ((type & CKF_ARRAY_ATTRIBUTE) != 0) type = CKA_LABEL;
      t[i].type = type;
      if (in.below(4) == 0) {  // a length query: NULL value, any length
        t[i].pValue = nullptr;
        t[i].ulValueLen = length(64);
      } else {
        std::size_t n = in.below(4) == 0 ? in.below(65) : in.pick({1, 8, 10, 32});
        t[i].pValue = filled(n);
        t[i].ulValueLen = n;
      }
    }
    return t;
  }

  CK_UTF8CHAR* pin(CK_ULONG& len) {
    static const char* pins[] = {MOCK_USER_PIN, MOCK_SO_PIN, "", "12345678901234567890"};
    if (in.below(8) == 0) {  // the protected authentication path
      len = in.below(2) == 0 ? 0 : length(16);
      return nullptr;
    }
    if (in.below(3) == 0) {
      len = in.below(33);
      return static_cast<CK_UTF8CHAR*>(filled(len));
    }
    const char* p = in.pick(pins);
    len = std::strlen(p);
    auto* out = static_cast<CK_UTF8CHAR*>(bytes(len));
    std::memcpy(out, p, len);
    return out;
  }

  void keep_session(CK_SESSION_HANDLE h) {
    if (sessions.size() < 16) sessions.push_back(h);
  }
  void keep_object(CK_OBJECT_HANDLE h) {
    if (h != CK_INVALID_HANDLE && objects.size() < 32) objects.push_back(h);
  }
  void forget_session(CK_SESSION_HANDLE h) {
    for (auto it = sessions.begin(); it != sessions.end(); ++it) {
      if (*it == h) {
        sessions.erase(it);
        if (closed.size() < 16) closed.push_back(h);
        return;
      }
    }
  }

  CK_VOID_PTR initialize_args() {
    // clang-format off
    switch (in.below(7)) {
      case 0: return nullptr;
      case 1: init_args = {nullptr, nullptr, nullptr, nullptr, CKF_OS_LOCKING_OK, nullptr}; break;
      case 2:
        init_args = {&create_mutex, &destroy_mutex, &lock_mutex, &unlock_mutex, 0, nullptr};
        break;
      case 3:
        init_args = {&create_mutex, &destroy_mutex, &lock_mutex, &unlock_mutex,
                     CKF_OS_LOCKING_OK, nullptr};
        break;
      case 4:  // some but not all callbacks: CKR_ARGUMENTS_BAD
        init_args = {&create_mutex, nullptr, &lock_mutex, nullptr, 0, nullptr};
        break;
      case 5:  // pReserved set: CKR_ARGUMENTS_BAD
        init_args = {nullptr, nullptr, nullptr, nullptr, CKF_OS_LOCKING_OK, bytes(8)};
        break;
      default:
        init_args = {nullptr, nullptr, nullptr, nullptr, in.u64(), nullptr};
        init_args.flags &= ~CKF_LIBRARY_CANT_CREATE_OS_THREADS;  // allowed, just dull
        break;
    }
    // clang-format on
    return &init_args;
  }
};

}  // namespace

// ---- one descriptor per function, from the table ----
// (Outside the anonymous namespace: clang would warn about members unused
// by some functions.)
namespace p11mux_fuzz::desc {
#define FUZZ_DESCRIBE(name_, since_, dispatch_, args_)           \
  struct name_ {                                                 \
    static constexpr std::string_view name = #name_;             \
    static constexpr unsigned since = since_;                    \
    static constexpr std::string_view args = args_;              \
    static constexpr auto member = &CK_FUNCTION_LIST_3_0::name_; \
    using Pointer = CK_##name_;                                  \
  };
P11MUX_FUNCTIONS(FUZZ_DESCRIBE)
#undef FUZZ_DESCRIBE
}  // namespace p11mux_fuzz::desc

namespace {

namespace desc = p11mux_fuzz::desc;

template <class D, std::size_t I>
constexpr bool is_length() {  // the length that goes with the argument before it
  return I > 0 && std::string_view("btko").find(D::args[I - 1]) != std::string_view::npos;
}

template <class P>
constexpr std::size_t element_size() {
  if constexpr (std::is_void_v<P>) {
    return 1;
  } else {
    return sizeof(P);
  }
}

template <class D, std::size_t I, class Tuple>
void fill(Tuple& t, State& s) {
  if constexpr (!is_length<D, I>()) {
    using T = std::tuple_element_t<I, Tuple>;
    constexpr char letter = D::args[I];
    auto& arg = std::get<I>(t);
    if constexpr (letter == 'h') {
      arg = s.session();
    } else if constexpr (letter == 'v') {
      arg = static_cast<T>(s.value());
    } else if constexpr (letter == 'm') {
      arg = s.mechanism();
    } else if constexpr (letter == 't') {
      CK_ULONG count = 0;
      arg = s.attributes(count);
      std::get<I + 1>(t) = count;
      if (arg == nullptr && s.in.below(4) == 0)
        std::get<I + 1>(t) = 1 + s.in.below(8);  // p11mux refuses
    } else if constexpr (letter == 'k') {
      CK_ULONG len = 0;
      arg = s.pin(len);
      std::get<I + 1>(t) = len;
    } else if constexpr (letter == 'b') {
      // An input or output array: exactly as long as its length says, or NULL
      // (with length 0, or with a length: p11mux must refuse that).
      using P = std::remove_pointer_t<T>;
      CK_ULONG n = s.in.below(3) == 0 ? s.in.below(129) : s.in.below(33);
      if (s.in.below(10) == 0) {
        arg = nullptr;
        n = s.in.below(2) == 0 ? 0 : s.length(64);
      } else {
        arg = static_cast<T>(s.filled(n * element_size<P>()));
      }
      std::get<I + 1>(t) = n;
    } else if constexpr (letter == 'o') {
      // Output buffer and its length pointer: NULL asks for the length (any
      // length value); otherwise the buffer holds at least *length elements.
      using P = std::remove_pointer_t<T>;
      auto* len = s.objects_of<CK_ULONG>(1);
      if (s.in.below(3) == 0) {
        arg = nullptr;
        *len = s.length(64);
      } else {
        std::size_t n = s.in.below(2) == 0 ? s.in.below(9) : s.in.below(257);
        arg = static_cast<T>(s.bytes(n * element_size<P>()));
        *len = s.in.below(4) == 0 ? s.in.below(n + 1) : n;  // never more than there is
      }
      std::get<I + 1>(t) = len;
    } else if constexpr (letter == 'p') {
      // Required: NULL only to see p11mux refuse it.
      using P = std::remove_pointer_t<T>;
      if (s.in.below(16) == 0) {
        arg = nullptr;
      } else if constexpr (std::is_same_v<P, CK_UTF8CHAR>) {
        arg = static_cast<T>(s.filled(32));  // C_InitToken's 32-byte label
      } else {
        arg = static_cast<T>(s.bytes(element_size<P>()));
      }
    } else if constexpr (letter == 'n') {
      if constexpr (std::is_same_v<T, CK_NOTIFY>) {
        arg = s.in.below(2) == 0 ? nullptr : &fuzz_notify;
      } else if constexpr (std::is_same_v<T, CK_UTF8CHAR_PTR>) {  // an interface name
        static const char* names[] = {"PKCS 11", "Vendor", ""};
        if (s.in.below(3) == 0) {
          arg = nullptr;
        } else {
          const char* name = s.in.pick(names);
          arg = static_cast<T>(s.bytes(std::strlen(name) + 1));
          std::memcpy(arg, name, std::strlen(name));
        }
      } else if constexpr (std::is_same_v<T, CK_VERSION_PTR>) {
        static const CK_VERSION versions[] = {{3, 0}, {2, 40}, {2, 20}, {3, 1}, {255, 255}};
        if (s.in.below(3) == 0) {
          arg = nullptr;
        } else {
          arg = s.objects_of<CK_VERSION>(1);
          *arg = s.in.pick(versions);
        }
      } else {
        // Passed on unchanged (pReserved, pApplication, phKey, a signature
        // part...): NULL, or zeroed memory (so any length read from it is 0).
        arg = s.in.below(4) == 0 ? static_cast<T>(s.bytes(256)) : nullptr;
      }
    }
  }
}

// The function to call: p11mux's 3.0 list when it offered one, else the
// 2.40 list (v3.0 functions are then skipped) or the exported entry points.
template <class D>
typename D::Pointer target(State& s) {
  if (s.v3 != nullptr) return s.v3->*D::member;
  if constexpr (D::since == 2) {
    return libs.v2_as_3.*D::member;
  } else if constexpr (D::name == "C_GetInterfaceList") {
    return libs.get_interface_list;
  } else if constexpr (D::name == "C_GetInterface") {
    return libs.get_interface;
  } else {
    return nullptr;
  }
}

// After a call: keep the handles it produced, forget the sessions it closed.
template <class D, class Tuple>
void harvest(const Tuple& t, CK_RV rv, State& s) {
  if (rv != CKR_OK) return;
  if constexpr (D::name == "C_OpenSession") {
    s.keep_session(*std::get<4>(t));
  } else if constexpr (D::name == "C_CloseSession") {
    s.forget_session(std::get<0>(t));
  } else if constexpr (D::name == "C_FindObjects") {
    CK_ULONG n = *std::get<3>(t);
    for (CK_ULONG i = 0; i < n && i < std::get<2>(t); ++i) s.keep_object(std::get<1>(t)[i]);
  } else if constexpr (D::name == "C_Finalize") {
    for (auto h : s.sessions) s.closed.push_back(h);
    s.sessions.clear();
  } else {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      auto one = [&](auto& arg) {
        if constexpr (std::is_same_v<std::decay_t<decltype(arg)>, CK_OBJECT_HANDLE_PTR>) {
          if (arg != nullptr) s.keep_object(*arg);
        }
      };
      (one(std::get<I>(t)), ...);
    }
    (std::make_index_sequence<std::tuple_size_v<Tuple>>{});
  }
}

void check_rv(std::string_view function, CK_RV rv) {
  std::string_view name = p11mux::rv_name(rv);
  if (name == "CKR_(unknown)" || name == "CKR_VENDOR_DEFINED") {
    std::fprintf(stderr, "p11mux-fuzz: %.*s returned 0x%lx, not a CKR code\n",
                 static_cast<int>(function.size()), function.data(), rv);
    std::abort();
  }
}

template <class D, class Pointer = typename D::Pointer>
struct Caller;

template <class D, class... A>
struct Caller<D, CK_RV (*)(A...)> {
  static void call(State& s) {
    auto fn = target<D>(s);
    if (fn == nullptr) return;
    std::tuple<A...> args{};
    if constexpr (D::name == "C_Initialize") {
      std::get<0>(args) = s.initialize_args();
    } else {
      [&]<std::size_t... I>(std::index_sequence<I...>) { (fill<D, I>(args, s), ...); }
      (std::index_sequence_for<A...>{});
    }
    if constexpr (D::name == "C_WaitForSlotEvent") {
      std::get<0>(args) |= CKF_DONT_BLOCK;  // a blocking wait would never return here
    }
    CK_RV rv = std::apply(fn, args);
    ++s.calls;
    check_rv(D::name, rv);
    harvest<D>(args, rv, s);
  }
};

using CallFn = void (*)(State&);
constexpr CallFn kCalls[] = {
#define FUZZ_CALL(name, since, dispatch, args) &Caller<desc::name>::call,
    P11MUX_FUNCTIONS(FUZZ_CALL)
#undef FUZZ_CALL
};
constexpr std::size_t kFunctionCount = std::size(kCalls);
static_assert(kFunctionCount == MOCK_FUNCTION_COUNT);

// Besides the calls: things that happen to the backend meanwhile.
enum Extra : std::size_t {
  kRestart = kFunctionCount,  // every backend session dies (mock_drop_sessions)
  kSlotEvent,
  kNotify,
  kInjectFailure,  // the next (or every) call of some function fails in the backend
  kExtraCount
};

void extra(State& s, std::size_t op) {
  if (!s.race_detector) return;  // the null backend has no state to disturb
  const MockControl& mock = *s.control;
  switch (op) {
    case kRestart:
      mock.drop_sessions();
      break;
    case kSlotEvent:
      mock.trigger_slot_event(s.in.below(3));
      break;
    case kNotify:
      mock.fire_notify(s.in.below(2));
      break;
    case kInjectFailure: {
      static const CK_RV codes[] = {CKR_DEVICE_ERROR,
                                    CKR_DEVICE_REMOVED,
                                    CKR_SESSION_HANDLE_INVALID,
                                    CKR_SESSION_CLOSED,
                                    CKR_SESSION_COUNT,
                                    CKR_HOST_MEMORY,
                                    CKR_GENERAL_ERROR,
                                    CKR_BUFFER_TOO_SMALL,
                                    CKR_OPERATION_ACTIVE,
                                    CKR_TOKEN_NOT_PRESENT,
                                    CKR_CRYPTOKI_NOT_INITIALIZED,
                                    CKR_CRYPTOKI_ALREADY_INITIALIZED,
                                    CKR_FUNCTION_NOT_SUPPORTED,
                                    CKR_CANT_LOCK};
      MockConfig c = s.backend;
      std::size_t fn = s.in.below(kFunctionCount);
      // Not C_Finalize: the mock would stay initialized, which is its doing.
      if (std::string_view(mock.function_name(fn)) == "C_Finalize") fn = 0;
      std::snprintf(c.fail_function, sizeof c.fail_function, "%s", mock.function_name(fn));
      c.fail_rv = s.in.pick(codes);
      // Nor a C_Initialize answering CKR_CRYPTOKI_ALREADY_INITIALIZED: that
      // says another user of the process initialized the backend, which
      // p11mux takes at its word (docs/pkcs11-facts.md, "Initializing the backend");
      // the mock, still uninitialized, would then count p11mux's next call
      // as one after finalization (corpus/6093030bd408930396abe13b54ddb576904700ce).
      if (std::string_view(c.fail_function) == "C_Initialize" &&
          c.fail_rv == CKR_CRYPTOKI_ALREADY_INITIALIZED)
        c.fail_rv = CKR_DEVICE_ERROR;
      c.fail_nth = s.in.below(4);
      mock.configure(&c);
      break;
    }
    default:
      break;
  }
}

// p11mux's 3.0 list, if it offers one for this backend.
CK_FUNCTION_LIST_3_0* find_v3() {
  if (libs.get_interface == nullptr) return nullptr;
  CK_INTERFACE* iface = nullptr;
  CK_VERSION v30{3, 0};
  char name[] = "PKCS 11";
  if (libs.get_interface(reinterpret_cast<CK_UTF8CHAR*>(name), &v30, &iface, 0) != CKR_OK ||
      iface == nullptr) {
    return nullptr;
  }
  return static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
}

void check_backend(const MockStats& st) {
  const char* broken = st.library_violations != 0   ? "calls overlapped in the backend"
                       : st.session_violations != 0 ? "calls overlapped on a backend session"
                       : st.calls_after_finalize != 0
                           ? "a call reached the backend while it was not initialized"
                       : st.initialized != 0   ? "the backend was left initialized"
                       : st.sessions_open != 0 ? "a backend session was left open"
                                               : nullptr;
  if (broken != nullptr) die(broken);
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  load_libraries();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  State s{Input(data, size)};
  // The backend, and the mock's options: bit 0 the race detector (bit 5 the
  // spec bender instead), else the null backend.
  std::uint8_t mode = s.in.byte();
  s.race_detector = (mode & 1) != 0;
  bool bender = s.race_detector && (mode & 32) != 0;
  s.control = bender ? libs.bender : libs.mock;
  const MockControl& mock = *s.control;
  ::setenv("P11MUX_MODULE",
           !s.race_detector ? P11MUX_FUZZ_NULL_PATH
           : bender         ? P11MUX_FUZZ_SPEC_BENDER_PATH
                            : P11MUX_FUZZ_RACE_DETECTOR_PATH,
           1);
  if (mock.reset() != 0) die("the race detector was still initialized");
  if (libs.bender->reset() != 0) die("the spec bender was still initialized");
  MockConfig& c = s.backend;  // accept_locking 0: the race detector is not thread-safe
  // Every bend but the slow opens, which would only slow the fuzzer down.
  if (bender) c.bend = MOCK_BEND_ALL & ~MOCK_BEND_SLOW_OPEN;
  c.transient_count_every = 3 + (mode >> 7);
  // Bit 6 with the spec bender: every call traced (to /dev/null), so that the
  // tracer meets the lengths the bender fills in.
  bool trace = bender && (mode & 64) != 0;
  ::setenv("P11MUX_LOG_LEVEL", trace ? "trace" : "off", 1);
  if (trace)
    ::setenv("P11MUX_LOG_FILE", "/dev/null", 1);
  else
    ::unsetenv("P11MUX_LOG_FILE");
  c.provide_v3 = (mode & 2) != 0;
  c.slot_count = (mode & 4) != 0 ? 2 : 1;
  c.wait_blocking_unsupported = (mode & 8) != 0;
  c.max_sessions = (mode & 16) != 0 ? 3 : 0;
  mock.configure(&c);
  s.v3 = find_v3();

  Caller<desc::C_Initialize>::call(s);
  for (int ops = 0; ops < 64 && !s.in.empty(); ++ops) {
    std::size_t op = s.in.below(kExtraCount);
    if (op < kFunctionCount) {
      kCalls[op](s);
    } else {
      extra(s, op);
    }
  }
  CK_RV rv = libs.v2->C_Finalize(nullptr);
  check_rv("C_Finalize", rv);
  MockStats st{};
  mock.stats(&st);
  check_backend(st);  // all zero when the null backend ran
  return 0;
}
