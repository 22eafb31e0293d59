// A fake PKCS#11 module for the backend loader's unit tests: its
// C_GetFunctionList, C_GetInterfaceList, C_GetInterface, C_Initialize and
// C_Finalize answer as each test sets them up, and record what p11mux asked.
// Found through a SymbolLookup (shared_library.hpp): nothing is dlopen'ed.
#pragma once

#include <p11mux/pkcs11.h>

#include <cstring>
#include <deque>
#include <optional>
#include <string>
#include <vector>

namespace p11mux::fake {

struct Module {
  // Which entry points dlsym would find.
  bool has_get_function_list = true;
  bool has_get_interface = false;  // C_GetInterface and C_GetInterfaceList: a 3.0 module
  // C_GetFunctionList's answer.
  CK_RV get_function_list_rv = CKR_OK;
  CK_FUNCTION_LIST* function_list = nullptr;
  // The interfaces it offers, C_GetInterface returning these very objects
  // (a deque: they stay where they are). An entry may be unusable (NULL
  // name or list) to see that p11mux skips it.
  std::deque<CK_INTERFACE> interfaces;
  // Spec bender: C_GetInterface("PKCS 11", 3.0) answers this instead.
  CK_INTERFACE* standard_answer = nullptr;
  CK_ULONG listed_count_override = 0;  // C_GetInterfaceList's count, when not 0

  // C_Initialize's answer to each attempt in turn (CKR_OK after the last).
  std::vector<CK_RV> initialize_answers;
  // What each C_Initialize call was given (nullopt: NULL pInitArgs).
  std::vector<std::optional<CK_C_INITIALIZE_ARGS>> initialize_args;
  std::vector<std::string> initialize_reserved;  // pReserved as a string ("" when NULL)
  int finalizes = 0;
};

inline Module module;

// The lists the module hands out; version fields set by reset().
inline CK_FUNCTION_LIST list_2_40{};
inline CK_FUNCTION_LIST_3_0 list_3_0{};

inline CK_RV initialize(CK_VOID_PTR args) {
  const auto* a = static_cast<const CK_C_INITIALIZE_ARGS*>(args);
  module.initialize_args.push_back(a != nullptr ? std::optional(*a) : std::nullopt);
  module.initialize_reserved.push_back(
      a != nullptr && a->pReserved != nullptr ? static_cast<const char*>(a->pReserved) : "");
  const std::size_t attempt = module.initialize_args.size() - 1;
  return attempt < module.initialize_answers.size() ? module.initialize_answers[attempt] : CKR_OK;
}

inline CK_RV finalize(CK_VOID_PTR) {
  ++module.finalizes;
  return CKR_OK;
}

inline CK_RV get_function_list(CK_FUNCTION_LIST_PTR_PTR list) {
  if (module.get_function_list_rv != CKR_OK) return module.get_function_list_rv;
  *list = module.function_list;
  return CKR_OK;
}

inline CK_VERSION version_of(const CK_INTERFACE& i) {
  return *static_cast<const CK_VERSION*>(i.pFunctionList);
}

inline CK_RV get_interface_list(CK_INTERFACE_PTR list, CK_ULONG_PTR count) {
  const CK_ULONG have =
      module.listed_count_override != 0 ? module.listed_count_override : module.interfaces.size();
  if (list == nullptr) {
    *count = have;
    return CKR_OK;
  }
  if (*count < have) {
    *count = have;
    return CKR_BUFFER_TOO_SMALL;
  }
  *count = module.interfaces.size();
  for (const CK_INTERFACE& i : module.interfaces) *list++ = i;
  return CKR_OK;
}

inline CK_RV get_interface(CK_UTF8CHAR_PTR name, CK_VERSION_PTR version, CK_INTERFACE_PTR_PTR found,
                           CK_FLAGS flags) {
  const char* wanted = name != nullptr ? reinterpret_cast<const char*>(name) : "PKCS 11";
  if (module.standard_answer != nullptr && std::strcmp(wanted, "PKCS 11") == 0 &&
      version != nullptr && version->major == 3 && version->minor == 0) {
    *found = module.standard_answer;
    return CKR_OK;
  }
  for (CK_INTERFACE& i : module.interfaces) {
    if (i.pInterfaceName == nullptr || i.pFunctionList == nullptr) continue;
    if (std::strcmp(wanted, reinterpret_cast<const char*>(i.pInterfaceName)) != 0) continue;
    const CK_VERSION v = version_of(i);
    if (version != nullptr && (v.major != version->major || v.minor != version->minor)) continue;
    if ((i.flags & flags) != flags) continue;
    *found = &i;
    return CKR_OK;
  }
  return CKR_ARGUMENTS_BAD;
}

// The module's symbols, as dlsym would find them.
inline void* lookup(const char* name) {
  const std::string_view n = name;
  if (n == "C_GetFunctionList" && module.has_get_function_list) {
    return reinterpret_cast<void*>(&get_function_list);
  }
  if (n == "C_GetInterface" && module.has_get_interface) {
    return reinterpret_cast<void*>(&get_interface);
  }
  if (n == "C_GetInterfaceList" && module.has_get_interface) {
    return reinterpret_cast<void*>(&get_interface_list);
  }
  return nullptr;
}

inline CK_UTF8CHAR* utf8(const char* s) {
  return reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(s));
}

// A 2.40 module: C_GetFunctionList only, returning list_2_40.
inline void reset() {
  module = Module{};
  list_2_40 = {};
  list_2_40.version = {2, 40};
  list_2_40.C_Initialize = &initialize;
  list_2_40.C_Finalize = &finalize;
  list_2_40.C_GetFunctionList = &get_function_list;
  list_3_0 = {};
  list_3_0.version = {3, 0};
  list_3_0.C_Initialize = &initialize;
  list_3_0.C_Finalize = &finalize;
  list_3_0.C_GetFunctionList = &get_function_list;
  list_3_0.C_GetInterfaceList = &get_interface_list;
  list_3_0.C_GetInterface = &get_interface;
  module.function_list = &list_2_40;
}

// A 3.0 module: also offers "PKCS 11" 3.0 (list_3_0) and 2.40 (list_2_40).
inline void reset_v3() {
  reset();
  module.has_get_interface = true;
  module.interfaces.push_back({utf8("PKCS 11"), &list_3_0, 0});
  module.interfaces.push_back({utf8("PKCS 11"), &list_2_40, 0});
}

}  // namespace p11mux::fake
