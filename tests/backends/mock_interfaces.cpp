// The function lists (v2.40 and v3.0), interface discovery, and the v3.0
// functions: C_LoginUser and C_SessionCancel work, the message-based ones
// return CKR_FUNCTION_NOT_SUPPORTED (after the usual session checks).
#include <cstring>

#include "mock_state.h"

using namespace p11mux::mock;

#ifndef CKF_FIND_OBJECTS
#define CKF_FIND_OBJECTS 0x00000040UL  // v3.0, for C_SessionCancel
#endif

namespace {

#define MOCK_POINTER(name, kind, op) name,
CK_FUNCTION_LIST function_list_v2 = {{2, 40}, MOCK_V2_FUNCTIONS(MOCK_POINTER)};
CK_FUNCTION_LIST_3_0 function_list_v3 = {
    {3, 0}, MOCK_V2_FUNCTIONS(MOCK_POINTER) MOCK_V3_FUNCTIONS(MOCK_POINTER)};
#undef MOCK_POINTER

CK_CHAR interface_name[] = "PKCS 11";
// Offered in this order; the first is the default. Flags 0: the mock does not
// claim CKF_INTERFACE_FORK_SAFE.
CK_INTERFACE interfaces[] = {
    {interface_name, &function_list_v3, 0},
    {interface_name, &function_list_v2, 0},
};
constexpr CK_ULONG kInterfaceCount = std::size(interfaces);

const CK_VERSION& version_of(const CK_INTERFACE& i) {
  return *static_cast<const CK_VERSION*>(i.pFunctionList);  // the first member of both lists
}

bool v3_enabled() { return module().settings.provide_v3.load(std::memory_order_relaxed); }

CK_RV not_supported(Session&) { return CKR_FUNCTION_NOT_SUPPORTED; }

}  // namespace

MOCK_EXPORT CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList) {
  CallScope scope(Fn::C_GetFunctionList);
  if (auto rv = module().settings.injected_failure(Fn::C_GetFunctionList)) return *rv;
  if (ppFunctionList == nullptr) return CKR_ARGUMENTS_BAD;
  *ppFunctionList = &function_list_v2;
  return CKR_OK;
}

MOCK_EXPORT CK_RV C_GetInterfaceList(CK_INTERFACE_PTR pInterfacesList, CK_ULONG_PTR pulCount) {
  CallScope scope(Fn::C_GetInterfaceList);
  if (!v3_enabled()) return CKR_FUNCTION_NOT_SUPPORTED;
  if (auto rv = module().settings.injected_failure(Fn::C_GetInterfaceList)) return *rv;
  if (pulCount == nullptr) return CKR_ARGUMENTS_BAD;
  if (pInterfacesList == nullptr) {
    *pulCount = kInterfaceCount;
    return CKR_OK;
  }
  bool fits = *pulCount >= kInterfaceCount;
  *pulCount = kInterfaceCount;
  if (!fits) return CKR_BUFFER_TOO_SMALL;
  std::memcpy(pInterfacesList, interfaces, sizeof interfaces);
  return CKR_OK;
}

MOCK_EXPORT CK_RV C_GetInterface(CK_UTF8CHAR_PTR pInterfaceName, CK_VERSION_PTR pVersion,
                                 CK_INTERFACE_PTR_PTR ppInterface, CK_FLAGS flags) {
  CallScope scope(Fn::C_GetInterface);
  if (!v3_enabled()) return CKR_FUNCTION_NOT_SUPPORTED;
  if (auto rv = module().settings.injected_failure(Fn::C_GetInterface)) return *rv;
  if (ppInterface == nullptr) return CKR_ARGUMENTS_BAD;
  for (auto& i : interfaces) {
    if (pInterfaceName != nullptr &&
        std::strcmp(reinterpret_cast<const char*>(pInterfaceName),
                    reinterpret_cast<const char*>(i.pInterfaceName)) != 0)
      continue;
    const CK_VERSION& v = version_of(i);
    if (pVersion != nullptr && (pVersion->major != v.major || pVersion->minor != v.minor)) continue;
    if ((i.flags & flags) != flags) continue;
    *ppInterface = &i;
    return CKR_OK;
  }
  return CKR_ARGUMENTS_BAD;  // no such interface (what SoftHSM2 and NSS return)
}

// Like C_Login; the user name is ignored.
MOCK_EXPORT CK_RV C_LoginUser(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType,
                              CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen, CK_UTF8CHAR_PTR, CK_ULONG) {
  return session_call(Fn::C_LoginUser, hSession,
                      [&](Session& s) { return module().login(s, userType, pPin, ulPinLen); });
}

// Ends the operations named in flags (CKF_ENCRYPT, CKF_DECRYPT, CKF_DIGEST,
// CKF_SIGN, CKF_VERIFY, CKF_FIND_OBJECTS); flags == 0 ends all of them.
MOCK_EXPORT CK_RV C_SessionCancel(CK_SESSION_HANDLE hSession, CK_FLAGS flags) {
  return session_call(Fn::C_SessionCancel, hSession, [&](Session& s) -> CK_RV {
    constexpr std::pair<CK_FLAGS, Op> kCancel[] = {
        {CKF_ENCRYPT, Op::Encrypt}, {CKF_DECRYPT, Op::Decrypt}, {CKF_DIGEST, Op::Digest},
        {CKF_SIGN, Op::Sign},       {CKF_VERIFY, Op::Verify},   {CKF_FIND_OBJECTS, Op::Find},
    };
    for (const auto& [flag, op] : kCancel)
      if (flags == 0 || (flags & flag) != 0) s.end(op);
    return CKR_OK;
  });
}

// ---- message-based operations: not modelled ----

MOCK_EXPORT CK_RV C_MessageEncryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR, CK_OBJECT_HANDLE) {
  return session_call(Fn::C_MessageEncryptInit, h, not_supported);
}
MOCK_EXPORT CK_RV C_EncryptMessage(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR,
                                   CK_ULONG, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR) {
  return session_call(Fn::C_EncryptMessage, h, not_supported);
}
MOCK_EXPORT CK_RV C_EncryptMessageBegin(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR,
                                        CK_ULONG) {
  return session_call(Fn::C_EncryptMessageBegin, h, not_supported);
}
MOCK_EXPORT CK_RV C_EncryptMessageNext(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR,
                                       CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR, CK_FLAGS) {
  return session_call(Fn::C_EncryptMessageNext, h, not_supported);
}
MOCK_EXPORT CK_RV C_MessageEncryptFinal(CK_SESSION_HANDLE h) {
  return session_call(Fn::C_MessageEncryptFinal, h, not_supported);
}
MOCK_EXPORT CK_RV C_MessageDecryptInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR, CK_OBJECT_HANDLE) {
  return session_call(Fn::C_MessageDecryptInit, h, not_supported);
}
MOCK_EXPORT CK_RV C_DecryptMessage(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR,
                                   CK_ULONG, CK_BYTE_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR) {
  return session_call(Fn::C_DecryptMessage, h, not_supported);
}
MOCK_EXPORT CK_RV C_DecryptMessageBegin(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR,
                                        CK_ULONG) {
  return session_call(Fn::C_DecryptMessageBegin, h, not_supported);
}
MOCK_EXPORT CK_RV C_DecryptMessageNext(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR,
                                       CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR, CK_FLAGS) {
  return session_call(Fn::C_DecryptMessageNext, h, not_supported);
}
MOCK_EXPORT CK_RV C_MessageDecryptFinal(CK_SESSION_HANDLE h) {
  return session_call(Fn::C_MessageDecryptFinal, h, not_supported);
}
MOCK_EXPORT CK_RV C_MessageSignInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR, CK_OBJECT_HANDLE) {
  return session_call(Fn::C_MessageSignInit, h, not_supported);
}
MOCK_EXPORT CK_RV C_SignMessage(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG,
                                CK_BYTE_PTR, CK_ULONG_PTR) {
  return session_call(Fn::C_SignMessage, h, not_supported);
}
MOCK_EXPORT CK_RV C_SignMessageBegin(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG) {
  return session_call(Fn::C_SignMessageBegin, h, not_supported);
}
MOCK_EXPORT CK_RV C_SignMessageNext(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR,
                                    CK_ULONG, CK_BYTE_PTR, CK_ULONG_PTR) {
  return session_call(Fn::C_SignMessageNext, h, not_supported);
}
MOCK_EXPORT CK_RV C_MessageSignFinal(CK_SESSION_HANDLE h) {
  return session_call(Fn::C_MessageSignFinal, h, not_supported);
}
MOCK_EXPORT CK_RV C_MessageVerifyInit(CK_SESSION_HANDLE h, CK_MECHANISM_PTR, CK_OBJECT_HANDLE) {
  return session_call(Fn::C_MessageVerifyInit, h, not_supported);
}
MOCK_EXPORT CK_RV C_VerifyMessage(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR, CK_ULONG,
                                  CK_BYTE_PTR, CK_ULONG) {
  return session_call(Fn::C_VerifyMessage, h, not_supported);
}
MOCK_EXPORT CK_RV C_VerifyMessageBegin(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG) {
  return session_call(Fn::C_VerifyMessageBegin, h, not_supported);
}
MOCK_EXPORT CK_RV C_VerifyMessageNext(CK_SESSION_HANDLE h, CK_VOID_PTR, CK_ULONG, CK_BYTE_PTR,
                                      CK_ULONG, CK_BYTE_PTR, CK_ULONG) {
  return session_call(Fn::C_VerifyMessageNext, h, not_supported);
}
MOCK_EXPORT CK_RV C_MessageVerifyFinal(CK_SESSION_HANDLE h) {
  return session_call(Fn::C_MessageVerifyFinal, h, not_supported);
}
