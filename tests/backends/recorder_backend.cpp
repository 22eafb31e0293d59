// libp11mux-recorder.so (recorder_control.h): every function is generated from
// p11mux's table (<p11mux/functions.h>, through function_traits.hpp), records
// its arguments and answers CKR_OK; respond() gives the few outputs a caller
// needs. The signatures come from the CK_C_xxx types, not from the table.
#include "recorder_control.h"

#include "functions/function_traits.hpp"
#include "interface_table.hpp"

#include <array>
#include <cstdint>
#include <cstring>
#include <iterator>
#include <mutex>
#include <string_view>
#include <tuple>
#include <type_traits>

#define RECORDER_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

enum Index : std::size_t {
#define RECORDER_INDEX(name, since, dispatch, args) i_##name,
  P11MUX_FUNCTIONS(RECORDER_INDEX)
#undef RECORDER_INDEX
      kEcho,  // the vendor interface's function
  kCount
};

constexpr std::array<std::string_view, kCount> kNames = {
#define RECORDER_NAME(name, since, dispatch, args) #name,
    P11MUX_FUNCTIONS(RECORDER_NAME)
#undef RECORDER_NAME
        "echo"};

struct Records {
  std::mutex mu;
  unsigned long attribute_length = 0;  // recorder_set_attribute_length
  std::array<RecorderCall, kCount> calls{};
  CK_SESSION_HANDLE next_session = RECORDER_SESSION_BASE;
};

Records& records() {
  static Records r;
  return r;
}

template <class T>
unsigned long as_ulong(T value) {
  if constexpr (std::is_pointer_v<T>) {
    return static_cast<unsigned long>(reinterpret_cast<std::uintptr_t>(value));
  } else {
    return static_cast<unsigned long>(value);
  }
}

template <class... A>
void record(std::size_t index, A... a) {
  static_assert(sizeof...(A) <= RECORDER_MAX_ARGS);
  Records& r = records();
  std::lock_guard lock(r.mu);
  RecorderCall& call = r.calls[index];
  ++call.count;
  std::fill(std::begin(call.args), std::end(call.args), 0UL);
  std::size_t i = 0;
  ((call.args[i++] = as_ulong(a)), ...);
}

CK_FUNCTION_LIST* list_v2();
CK_RV interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count);
CK_RV find_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR out,
                     CK_FLAGS flags);

template <class T>
void zero(T* out) {
  if (out != nullptr) *out = T{};
}

template <std::size_t I, class... A>
CK_RV respond(A... a) {
  const std::tuple<A...> args{a...};
  if constexpr (I == i_C_GetInfo) {
    if (auto* info = std::get<0>(args)) {
      *info = CK_INFO{};
      info->cryptokiVersion = CK_VERSION{3, 0};
    }
  } else if constexpr (I == i_C_GetFunctionList) {
    if (std::get<0>(args) == nullptr) return CKR_ARGUMENTS_BAD;
    *std::get<0>(args) = list_v2();
  } else if constexpr (I == i_C_GetInterfaceList) {
    return interface_list(a...);
  } else if constexpr (I == i_C_GetInterface) {
    return find_interface(a...);
  } else if constexpr (I == i_C_OpenSession) {
    if (auto* handle = std::get<4>(args)) {
      std::lock_guard lock(records().mu);
      *handle = records().next_session++;
    }
  } else if constexpr (I == i_C_GetSlotList) {
    CK_SLOT_ID* slots = std::get<1>(args);
    CK_ULONG* count = std::get<2>(args);
    if (count == nullptr) return CKR_ARGUMENTS_BAD;
    const bool fits = slots == nullptr || *count >= 1;
    if (slots != nullptr && fits) slots[0] = 0;
    *count = 1;
    if (!fits) return CKR_BUFFER_TOO_SMALL;
  } else if constexpr (I == i_C_GetMechanismList) {
    if (auto* count = std::get<2>(args)) *count = 0;
  } else if constexpr (I == i_C_GetSlotInfo || I == i_C_GetTokenInfo || I == i_C_GetSessionInfo ||
                       I == i_C_GetMechanismInfo) {
    zero(std::get<sizeof...(A) - 1>(args));
  } else if constexpr (I == i_C_WaitForSlotEvent) {
    return CKR_NO_EVENT;
  } else if constexpr (I == i_C_GetAttributeValue) {
    unsigned long length = 0;
    {
      std::lock_guard lock(records().mu);
      length = records().attribute_length;
    }
    CK_ATTRIBUTE* attributes = std::get<2>(args);
    CK_RV rv = CKR_OK;
    for (CK_ULONG i = 0; length != 0 && attributes != nullptr && i < std::get<3>(args); ++i) {
      if (attributes[i].pValue != nullptr && attributes[i].ulValueLen < length) {
        attributes[i].ulValueLen = length;
        rv = CKR_BUFFER_TOO_SMALL;
      }
    }
    return rv;
  }
  return CKR_OK;
}

template <std::size_t I, class Pointer>
struct Entry;
template <std::size_t I, class... A>
struct Entry<I, CK_RV (*)(A...)> {
  static CK_RV call(A... a) {
    record(I, a...);
    return respond<I>(a...);
  }
};

#define RECORDER_MEMBER(name, since, dispatch, args) &Entry<i_##name, CK_##name>::call,
CK_FUNCTION_LIST function_list_v2 = {{2, 40}, P11MUX_FUNCTIONS_V2(RECORDER_MEMBER)};
CK_FUNCTION_LIST_3_0 function_list_v3 = {{3, 0}, P11MUX_FUNCTIONS(RECORDER_MEMBER)};
#undef RECORDER_MEMBER

CK_FUNCTION_LIST* list_v2() { return &function_list_v2; }

unsigned long echo(unsigned long value) {
  record(kEcho, value);
  return value + 1;
}
RecorderVendorFunctions vendor_functions = {1, 0, &echo};

CK_CHAR standard_name[] = "PKCS 11";
CK_CHAR vendor_name[] = RECORDER_VENDOR_INTERFACE;
// The first is the default. Every one claims fork safety, so a proxy that
// copied flags from its backend would be caught.
CK_INTERFACE interfaces[] = {
    {standard_name, &function_list_v3, CKF_INTERFACE_FORK_SAFE},
    {standard_name, &function_list_v2, CKF_INTERFACE_FORK_SAFE},
    {vendor_name, &vendor_functions, CKF_INTERFACE_FORK_SAFE},
};

CK_RV interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  return p11mux::test_backends::list_interfaces(interfaces, list, count);
}

CK_RV find_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR out,
                     CK_FLAGS flags) {
  return p11mux::test_backends::find_interface(interfaces, name, version, out, flags);
}

}  // namespace

RECORDER_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR list) {
  return function_list_v3.C_GetFunctionList(list);
}

RECORDER_EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  return function_list_v3.C_GetInterfaceList(list, count);
}

RECORDER_EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version,
                                     CK_INTERFACE_PTR_PTR out, CK_FLAGS flags) {
  return function_list_v3.C_GetInterface(name, version, out, flags);
}

RECORDER_EXPORT int recorder_last_call(const char* function, RecorderCall* out) {
  for (std::size_t i = 0; i < kCount; ++i) {
    if (kNames[i] != function) continue;
    std::lock_guard lock(records().mu);
    *out = records().calls[i];
    return 0;
  }
  return -1;
}

RECORDER_EXPORT void recorder_reset(void) {
  std::lock_guard lock(records().mu);
  records().calls = {};
  records().next_session = RECORDER_SESSION_BASE;
  records().attribute_length = 0;
}

RECORDER_EXPORT void recorder_set_attribute_length(unsigned long length) {
  std::lock_guard lock(records().mu);
  records().attribute_length = length;
}
