// libp11mux-null.so (null_backend.h): every function is generated from
// p11mux's table (<p11mux/functions.h>, through function_traits.hpp) and fills
// its outputs by argument letter and type: 'o' is an output buffer with its
// length, 'p' an output structure or handle, 't' of C_GetAttributeValue the
// template it answers. The few functions that need more are named below.
#include "null_backend.h"

#include "functions/function_traits.hpp"
#include "interface_table.hpp"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

#define NULL_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// Relaxed: a handle only has to be unique, and p11mux opens sessions from
// many threads at once.
std::atomic<CK_ULONG> next_session{NULL_SESSION_HANDLE_BASE};
std::atomic<CK_ULONG> next_object{NULL_OBJECT_HANDLE_BASE};

CK_ULONG fresh(std::atomic<CK_ULONG>& counter) {
  return counter.fetch_add(1, std::memory_order_relaxed);
}

// A blank-padded PKCS#11 text field.
template <std::size_t N>
void text(CK_UTF8CHAR (&field)[N], std::string_view value) {
  std::memset(field, ' ', N);
  std::memcpy(field, value.data(), std::min(N, value.size()));
}

// ---- 'p': structures and handles ----

void fill(CK_INFO* info) {
  *info = CK_INFO{};
  info->cryptokiVersion = {3, 0};
  text(info->manufacturerID, "p11mux");
  text(info->libraryDescription, "null backend");
}

void fill(CK_SLOT_INFO* info) {
  *info = CK_SLOT_INFO{};
  text(info->slotDescription, "null slot");
  text(info->manufacturerID, "p11mux");
  info->flags = CKF_TOKEN_PRESENT;
}

void fill(CK_TOKEN_INFO* info) {
  *info = CK_TOKEN_INFO{};
  text(info->label, NULL_TOKEN_LABEL);
  text(info->manufacturerID, "p11mux");
  text(info->model, "null");
  text(info->serialNumber, "0");
  info->flags = CKF_TOKEN_INITIALIZED | CKF_USER_PIN_INITIALIZED | CKF_RNG;
  info->ulMaxSessionCount = CK_EFFECTIVELY_INFINITE;
  info->ulMaxRwSessionCount = CK_EFFECTIVELY_INFINITE;
  info->ulSessionCount = CK_UNAVAILABLE_INFORMATION;
  info->ulRwSessionCount = CK_UNAVAILABLE_INFORMATION;
  info->ulMaxPinLen = 64;
  info->ulTotalPublicMemory = info->ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
  info->ulTotalPrivateMemory = info->ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
}

void fill(CK_SESSION_INFO* info) {
  *info = CK_SESSION_INFO{0, CKS_RW_PUBLIC_SESSION, CKF_SERIAL_SESSION | CKF_RW_SESSION, 0};
}

void fill(CK_MECHANISM_INFO* info) { *info = CK_MECHANISM_INFO{0, 4096, CKF_DIGEST}; }

template <class D>
void fill(CK_ULONG* out) {
  if constexpr (D::name == "C_OpenSession") {
    *out = fresh(next_session);
  } else if constexpr (D::name == "C_FindObjects") {
    *out = 0;  // found nothing
  } else if constexpr (D::name == "C_GetObjectSize") {
    *out = NULL_OUTPUT_LEN;
  } else if constexpr (D::name == "C_WaitForSlotEvent") {
    *out = 0;  // the slot
  } else {
    *out = fresh(next_object);  // every other CK_ULONG output is a new object
  }
}

// ---- 'o': an output buffer and its length ----

template <class D, class T>
CK_RV output(T* buffer, CK_ULONG* length) {
  // The two lists (slots, mechanisms) have one entry; bytes are zeros.
  constexpr bool list = !std::is_same_v<T, CK_BYTE>;
  constexpr CK_ULONG n = list ? 1 : NULL_OUTPUT_LEN;
  if (length == nullptr) return CKR_OK;  // p11mux refuses it first; nothing to say
  if (buffer != nullptr) {
    if (*length < n) {
      *length = n;
      return CKR_BUFFER_TOO_SMALL;
    }
    if constexpr (D::name == "C_GetMechanismList") {
      buffer[0] = CKM_SHA256;
    } else if constexpr (list) {
      buffer[0] = 0;  // slot 0
    } else {
      std::memset(buffer, 0, n);
    }
  }
  *length = n;
  return CKR_OK;
}

template <class D, std::size_t I, class Tuple>
CK_RV answer(const Tuple& args) {
  // An 'o' buffer's length pointer (lettered 'p') is answered with the buffer.
  constexpr char letter = I > 0 && D::args[I - 1] == 'o' ? '-' : D::args[I];
  using T = std::tuple_element_t<I, Tuple>;
  const T arg = std::get<I>(args);
  if constexpr (letter == 'o') {
    return output<D>(arg, std::get<I + 1>(args));
  } else if constexpr (letter == 'p' && !std::is_same_v<T, CK_UTF8CHAR_PTR>) {
    // (C_InitToken's label is the one 'p' that is an input.)
    if (arg == nullptr) return CKR_OK;
    if constexpr (std::is_same_v<T, CK_ULONG_PTR>) {
      fill<D>(arg);
    } else {
      fill(arg);
    }
  } else if constexpr (letter == 'n' && std::is_same_v<T, CK_OBJECT_HANDLE_PTR> &&
                       D::name == "C_DeriveKey") {
    if (arg != nullptr) *arg = fresh(next_object);
  } else if constexpr (letter == 'n' && std::is_same_v<T, CK_BYTE_PTR> &&
                       I + 1 < std::tuple_size_v<Tuple>) {
    // C_SignMessageNext: a signature (with its length pointer) on the last part.
    if constexpr (std::is_same_v<std::tuple_element_t<I + 1, Tuple>, CK_ULONG_PTR>) {
      if (std::get<I + 1>(args) != nullptr) return output<D>(arg, std::get<I + 1>(args));
    }
  } else if constexpr (letter == 't' && D::name == "C_GetAttributeValue") {
    for (CK_ULONG i = 0; arg != nullptr && i < std::get<I + 1>(args); ++i) arg[i].ulValueLen = 0;
  } else if constexpr (letter == 'b' && D::name == "C_GenerateRandom") {
    // Not random, but never the same twice in a row (callers check that):
    // a count of this thread's calls, then zeros.
    thread_local std::uint64_t calls = 0;
    ++calls;
    if (arg != nullptr) {
      const CK_ULONG n = std::get<I + 1>(args);
      std::memset(arg, 0, n);
      std::memcpy(arg, &calls, std::min<CK_ULONG>(n, sizeof calls));
    }
  }
  return CKR_OK;
}

CK_FUNCTION_LIST* list_v2();
CK_RV interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count);
CK_RV find_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR out,
                     CK_FLAGS flags);

template <class D, class Pointer = typename D::Pointer>
struct Entry;
template <class D, class... A>
struct Entry<D, CK_RV (*)(A...)> {
  static CK_RV call(A... a) {
    if constexpr (D::name == "C_GetFunctionList") {
      if (std::get<0>(std::tie(a...)) == nullptr) return CKR_ARGUMENTS_BAD;
      *std::get<0>(std::tie(a...)) = list_v2();
      return CKR_OK;
    } else if constexpr (D::name == "C_GetInterfaceList") {
      return interface_list(a...);
    } else if constexpr (D::name == "C_GetInterface") {
      return find_interface(a...);
    } else {
      const std::tuple<A...> args{a...};
      CK_RV rv = CKR_OK;
      [&]<std::size_t... I>(std::index_sequence<I...>) {
        ((rv = rv == CKR_OK ? answer<D, I>(args) : rv), ...);
      }
      (std::index_sequence_for<A...>{});
      return rv;
    }
  }
};

#define NULL_MEMBER(name, since, dispatch, args) &Entry<p11mux::fn::name>::call,
CK_FUNCTION_LIST function_list_v2 = {{2, 40}, P11MUX_FUNCTIONS_V2(NULL_MEMBER)};
CK_FUNCTION_LIST_3_0 function_list_v3 = {{3, 0}, P11MUX_FUNCTIONS(NULL_MEMBER)};
#undef NULL_MEMBER

CK_FUNCTION_LIST* list_v2() { return &function_list_v2; }

CK_CHAR standard_name[] = "PKCS 11";
CK_INTERFACE interfaces[] = {
    {standard_name, &function_list_v3, 0},
    {standard_name, &function_list_v2, 0},
};

CK_RV interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  return p11mux::test_backends::list_interfaces(interfaces, list, count);
}

CK_RV find_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR out,
                     CK_FLAGS flags) {
  return p11mux::test_backends::find_interface(interfaces, name, version, out, flags);
}

}  // namespace

NULL_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
  return function_list_v2.C_GetFunctionList(list);
}

NULL_EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  return interface_list(list, count);
}

NULL_EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                                 CK_INTERFACE_PTR_PTR out, CK_FLAGS flags) {
  return find_interface(name, version, out, flags);
}
