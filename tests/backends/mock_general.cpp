// C entry points: library, slots and tokens, sessions, login, random, events.
// Objects are in mock_object_functions.cpp, cryptographic operations in
// mock_operations.cpp, v3.0 interfaces in mock_interfaces.cpp.
#include <algorithm>
#include <cstring>
#include <string_view>

#include "mock_state.h"

using namespace p11mux::mock;

namespace {

// PKCS#11 text fields: blank-padded, not terminated.
template <std::size_t N>
void pad(unsigned char (&field)[N], std::string_view text) {
  std::memset(field, ' ', N);
  std::memcpy(field, text.data(), std::min(N, text.size()));
}

struct Mechanism {
  CK_MECHANISM_TYPE type;
  CK_FLAGS flags;
};
// What the mock advertises; every operation accepts any mechanism anyway.
constexpr Mechanism kMechanisms[] = {
    {CKM_SHA256, CKF_DIGEST},
    {CKM_ECDSA, CKF_SIGN | CKF_VERIFY},
    {CKM_AES_ECB, CKF_ENCRYPT | CKF_DECRYPT},
    {CKM_GENERIC_SECRET_KEY_GEN, CKF_GENERATE},
    {CKM_EC_KEY_PAIR_GEN, CKF_GENERATE_KEY_PAIR},
};

bool pin_length_ok(CK_ULONG len) { return len >= 4 && len <= 8; }

}  // namespace

// ---- library ----

MOCK_EXPORT CK_RV C_Initialize(CK_VOID_PTR pInitArgs) {
  CallScope scope(Fn::C_Initialize);
  return guarded([&]() -> CK_RV {
    Module& m = module();
    bump(m.counters.initialize_calls);
    if (auto rv = m.settings.injected_failure(Fn::C_Initialize)) return *rv;
    return m.initialize(pInitArgs);
  });
}

MOCK_EXPORT CK_RV C_Finalize(CK_VOID_PTR pReserved) {
  CallScope scope(Fn::C_Finalize);
  return guarded([&]() -> CK_RV {
    Module& m = module();
    bump(m.counters.finalize_calls);
    if (!m.initialized()) return not_initialized();
    if (pReserved != nullptr) return CKR_ARGUMENTS_BAD;
    if (auto rv = m.settings.injected_failure(Fn::C_Finalize)) return *rv;
    if (scope.others_active() != 0) bump(m.counters.finalize_during_call);
    return m.finalize();
  });
}

MOCK_EXPORT CK_RV C_GetInfo(CK_INFO_PTR pInfo) {
  return global_call(Fn::C_GetInfo, [&]() -> CK_RV {
    if (pInfo == nullptr) return CKR_ARGUMENTS_BAD;
    bool v3 = module().settings.provide_v3.load(std::memory_order_relaxed);
    *pInfo = CK_INFO{};
    pInfo->cryptokiVersion = v3 ? CK_VERSION{3, 0} : CK_VERSION{2, 40};
    pad(pInfo->manufacturerID, "p11mux");
    pad(pInfo->libraryDescription, "p11mux mock backend");
    pInfo->libraryVersion = {1, 0};
    return CKR_OK;
  });
}

// ---- slots and tokens ----

MOCK_EXPORT CK_RV C_GetSlotList(CK_BBOOL /*tokenPresent: always present*/, CK_SLOT_ID_PTR pSlotList,
                                CK_ULONG_PTR pulCount) {
  return global_call(Fn::C_GetSlotList, [&]() -> CK_RV {
    if (pulCount == nullptr) return CKR_ARGUMENTS_BAD;
    CK_ULONG n = module().slot_count();
    if (pSlotList == nullptr) {
      *pulCount = n;
      return CKR_OK;
    }
    bool fits = *pulCount >= n;
    *pulCount = n;
    if (!fits) return CKR_BUFFER_TOO_SMALL;
    for (CK_ULONG i = 0; i < n; ++i) pSlotList[i] = i;
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_GetSlotInfo(CK_SLOT_ID slotID, CK_SLOT_INFO_PTR pInfo) {
  return slot_call(Fn::C_GetSlotInfo, slotID, [&](Token& t) -> CK_RV {
    if (pInfo == nullptr) return CKR_ARGUMENTS_BAD;
    *pInfo = CK_SLOT_INFO{};
    pad(pInfo->slotDescription, "mock slot " + std::to_string(t.id));
    pad(pInfo->manufacturerID, "p11mux");
    pInfo->flags = CKF_TOKEN_PRESENT;
    pInfo->hardwareVersion = pInfo->firmwareVersion = {1, 0};
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_GetTokenInfo(CK_SLOT_ID slotID, CK_TOKEN_INFO_PTR pInfo) {
  return slot_call(Fn::C_GetTokenInfo, slotID, [&](Token& t) -> CK_RV {
    if (pInfo == nullptr) return CKR_ARGUMENTS_BAD;
    const Settings& cfg = module().settings;
    *pInfo = CK_TOKEN_INFO{};
    pad(pInfo->manufacturerID, "p11mux");
    pad(pInfo->model, "mock");
    pad(pInfo->serialNumber, std::to_string(t.id));
    pInfo->flags = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED | CKF_TOKEN_INITIALIZED;
    pInfo->ulMaxSessionCount = cfg.token_max_sessions.load(std::memory_order_relaxed);
    pInfo->ulMaxRwSessionCount = cfg.token_max_rw_sessions.load(std::memory_order_relaxed);
    {
      std::lock_guard lock(t.mu);
      pad(pInfo->label, t.label);
      pInfo->ulSessionCount = t.ro_sessions + t.rw_sessions;
      pInfo->ulRwSessionCount = t.rw_sessions;
    }
    pInfo->ulMaxPinLen = 8;
    pInfo->ulMinPinLen = 4;
    pInfo->ulTotalPublicMemory = pInfo->ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
    pInfo->ulTotalPrivateMemory = pInfo->ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
    pInfo->hardwareVersion = pInfo->firmwareVersion = {1, 0};
    std::memset(pInfo->utcTime, ' ', sizeof pInfo->utcTime);
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_GetMechanismList(CK_SLOT_ID slotID, CK_MECHANISM_TYPE_PTR pMechanismList,
                                     CK_ULONG_PTR pulCount) {
  return slot_call(Fn::C_GetMechanismList, slotID, [&](Token&) -> CK_RV {
    if (pulCount == nullptr) return CKR_ARGUMENTS_BAD;
    constexpr CK_ULONG n = std::size(kMechanisms);
    if (pMechanismList == nullptr) {
      *pulCount = n;
      return CKR_OK;
    }
    bool fits = *pulCount >= n;
    *pulCount = n;
    if (!fits) return CKR_BUFFER_TOO_SMALL;
    for (CK_ULONG i = 0; i < n; ++i) pMechanismList[i] = kMechanisms[i].type;
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_GetMechanismInfo(CK_SLOT_ID slotID, CK_MECHANISM_TYPE type,
                                     CK_MECHANISM_INFO_PTR pInfo) {
  return slot_call(Fn::C_GetMechanismInfo, slotID, [&](Token&) -> CK_RV {
    if (pInfo == nullptr) return CKR_ARGUMENTS_BAD;
    for (const auto& mech : kMechanisms)
      if (mech.type == type) {
        *pInfo = CK_MECHANISM_INFO{};
        pInfo->ulMinKeySize = 0;
        pInfo->ulMaxKeySize = 4096;
        pInfo->flags = mech.flags;
        return CKR_OK;
      }
    return CKR_MECHANISM_INVALID;
  });
}

MOCK_EXPORT CK_RV C_InitToken(CK_SLOT_ID slotID, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen,
                              CK_UTF8CHAR_PTR pLabel) {
  return slot_call(Fn::C_InitToken, slotID, [&](Token& t) -> CK_RV {
    if ((pPin == nullptr && ulPinLen != 0) || pLabel == nullptr) return CKR_ARGUMENTS_BAD;
    {
      std::lock_guard lock(t.mu);
      if (t.ro_sessions + t.rw_sessions != 0) return CKR_SESSION_EXISTS;
      if (std::string_view(reinterpret_cast<const char*>(pPin), ulPinLen) != t.so_pin)
        return CKR_PIN_INCORRECT;
      std::string_view label(reinterpret_cast<const char*>(pLabel), 32);
      t.label = label.substr(0, label.find_last_not_of(' ') + 1);
    }
    module().objects.erase_token_objects(t.id);
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_InitPIN(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pPin, CK_ULONG ulPinLen) {
  return session_call(Fn::C_InitPIN, hSession, [&](Session& s) -> CK_RV {
    if (pPin == nullptr && ulPinLen != 0) return CKR_ARGUMENTS_BAD;
    Token& t = *s.token;
    std::lock_guard lock(t.mu);
    if (t.user.load(std::memory_order_relaxed) != CKU_SO) return CKR_USER_NOT_LOGGED_IN;
    if (!pin_length_ok(ulPinLen)) return CKR_PIN_LEN_RANGE;
    t.user_pin.assign(reinterpret_cast<const char*>(pPin), ulPinLen);
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_SetPIN(CK_SESSION_HANDLE hSession, CK_UTF8CHAR_PTR pOldPin, CK_ULONG ulOldLen,
                           CK_UTF8CHAR_PTR pNewPin, CK_ULONG ulNewLen) {
  return session_call(Fn::C_SetPIN, hSession, [&](Session& s) -> CK_RV {
    if ((pOldPin == nullptr && ulOldLen != 0) || (pNewPin == nullptr && ulNewLen != 0))
      return CKR_ARGUMENTS_BAD;
    if (!s.rw()) return CKR_SESSION_READ_ONLY;
    Token& t = *s.token;
    std::lock_guard lock(t.mu);
    std::string& pin = t.user.load(std::memory_order_relaxed) == CKU_SO ? t.so_pin : t.user_pin;
    if (std::string_view(reinterpret_cast<const char*>(pOldPin), ulOldLen) != pin)
      return CKR_PIN_INCORRECT;
    if (!pin_length_ok(ulNewLen)) return CKR_PIN_LEN_RANGE;
    pin.assign(reinterpret_cast<const char*>(pNewPin), ulNewLen);
    return CKR_OK;
  });
}

// ---- sessions ----

MOCK_EXPORT CK_RV C_OpenSession(CK_SLOT_ID slotID, CK_FLAGS flags, CK_VOID_PTR pApplication,
                                CK_NOTIFY Notify, CK_SESSION_HANDLE_PTR phSession) {
  return slot_call(Fn::C_OpenSession, slotID, [&](Token& t) -> CK_RV {
    if (phSession == nullptr) return CKR_ARGUMENTS_BAD;
    return module().open_session(t.shared_from_this(), flags, pApplication, Notify, *phSession);
  });
}

MOCK_EXPORT CK_RV C_CloseSession(CK_SESSION_HANDLE hSession) {
  return session_call(Fn::C_CloseSession, hSession,
                      [&](Session& s) { return module().close_session(s); });
}

MOCK_EXPORT CK_RV C_CloseAllSessions(CK_SLOT_ID slotID) {
  return slot_call(Fn::C_CloseAllSessions, slotID,
                   [&](Token& t) { return module().close_all_sessions(t); });
}

MOCK_EXPORT CK_RV C_GetSessionInfo(CK_SESSION_HANDLE hSession, CK_SESSION_INFO_PTR pInfo) {
  return session_call(Fn::C_GetSessionInfo, hSession, [&](Session& s) -> CK_RV {
    if (pInfo == nullptr) return CKR_ARGUMENTS_BAD;
    CK_USER_TYPE user = s.token->user.load(std::memory_order_relaxed);
    *pInfo = CK_SESSION_INFO{};
    pInfo->slotID = s.token->id;
    pInfo->flags = s.flags;
    if (s.rw())
      pInfo->state = user == CKU_SO     ? CKS_RW_SO_FUNCTIONS
                     : user == CKU_USER ? CKS_RW_USER_FUNCTIONS
                                        : CKS_RW_PUBLIC_SESSION;
    else
      pInfo->state = user == CKU_USER ? CKS_RO_USER_FUNCTIONS : CKS_RO_PUBLIC_SESSION;
    pInfo->ulDeviceError = 0;
    return CKR_OK;
  });
}

// A digest in progress can be saved and restored (the spec's example use of
// C_GetOperationState): the state is a tag and the input so far. Any other
// operation is CKR_STATE_UNSAVEABLE.
constexpr std::string_view kDigestStateTag = "mock-digest:";

MOCK_EXPORT CK_RV C_GetOperationState(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState,
                                      CK_ULONG_PTR pulOperationStateLen) {
  return session_call(Fn::C_GetOperationState, hSession, [&](Session& s) {
    if (pulOperationStateLen == nullptr) return CKR_ARGUMENTS_BAD;
    bool others = false;
    for (std::size_t i = 0; i < kOpCount; ++i) {
      others = others || (s.ops[i].active && static_cast<Op>(i) != Op::Digest);
    }
    const OpState& digest = s.op(Op::Digest);
    if (!digest.active) return others ? CKR_STATE_UNSAVEABLE : CKR_OPERATION_NOT_INITIALIZED;
    if (others) return CKR_STATE_UNSAVEABLE;
    const CK_ULONG need = kDigestStateTag.size() + digest.data.size();
    if (pOperationState == nullptr) {
      *pulOperationStateLen = need;
      return CKR_OK;
    }
    if (*pulOperationStateLen < need) {
      *pulOperationStateLen = need;
      return CKR_BUFFER_TOO_SMALL;
    }
    std::memcpy(pOperationState, kDigestStateTag.data(), kDigestStateTag.size());
    std::copy(digest.data.begin(), digest.data.end(), pOperationState + kDigestStateTag.size());
    *pulOperationStateLen = need;
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_SetOperationState(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pOperationState,
                                      CK_ULONG ulOperationStateLen, CK_OBJECT_HANDLE,
                                      CK_OBJECT_HANDLE) {
  return session_call(Fn::C_SetOperationState, hSession, [&](Session& s) {
    if (pOperationState == nullptr) return CKR_ARGUMENTS_BAD;
    const std::string_view state(reinterpret_cast<const char*>(pOperationState),
                                 ulOperationStateLen);
    if (!state.starts_with(kDigestStateTag)) return CKR_SAVED_STATE_INVALID;
    // The saved state replaces whatever the session was doing.
    s.end_all();
    OpState& digest = s.op(Op::Digest);
    digest.active = true;
    digest.multipart = true;
    digest.data.assign(pOperationState + kDigestStateTag.size(),
                       pOperationState + ulOperationStateLen);
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_GetFunctionStatus(CK_SESSION_HANDLE hSession) {
  return session_call(Fn::C_GetFunctionStatus, hSession,
                      [](Session&) { return CKR_FUNCTION_NOT_PARALLEL; });
}

MOCK_EXPORT CK_RV C_CancelFunction(CK_SESSION_HANDLE hSession) {
  return session_call(Fn::C_CancelFunction, hSession,
                      [](Session&) { return CKR_FUNCTION_NOT_PARALLEL; });
}

// ---- login ----

MOCK_EXPORT CK_RV C_Login(CK_SESSION_HANDLE hSession, CK_USER_TYPE userType, CK_UTF8CHAR_PTR pPin,
                          CK_ULONG ulPinLen) {
  return session_call(Fn::C_Login, hSession,
                      [&](Session& s) { return module().login(s, userType, pPin, ulPinLen); });
}

MOCK_EXPORT CK_RV C_Logout(CK_SESSION_HANDLE hSession) {
  return session_call(Fn::C_Logout, hSession, [&](Session& s) { return module().logout(s); });
}

// ---- random ----

MOCK_EXPORT CK_RV C_SeedRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR pSeed, CK_ULONG ulSeedLen) {
  return session_call(Fn::C_SeedRandom, hSession, [&](Session&) -> CK_RV {
    return pSeed == nullptr && ulSeedLen != 0 ? CKR_ARGUMENTS_BAD : CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_GenerateRandom(CK_SESSION_HANDLE hSession, CK_BYTE_PTR RandomData,
                                   CK_ULONG ulRandomLen) {
  return session_call(Fn::C_GenerateRandom, hSession, [&](Session&) -> CK_RV {
    if (RandomData == nullptr && ulRandomLen != 0) return CKR_ARGUMENTS_BAD;
    Module& m = module();
    m.counters.last_random_len.store(ulRandomLen, std::memory_order_relaxed);
    pause_us(m.settings.slow_us.load(std::memory_order_relaxed));
    fill_random(RandomData, ulRandomLen);
    return CKR_OK;
  });
}

// ---- events ----

MOCK_EXPORT CK_RV C_WaitForSlotEvent(CK_FLAGS flags, CK_SLOT_ID_PTR pSlot, CK_VOID_PTR pReserved) {
  return global_call(Fn::C_WaitForSlotEvent, [&]() -> CK_RV {
    if (pSlot == nullptr || pReserved != nullptr) return CKR_ARGUMENTS_BAD;
    return module().wait_for_event((flags & CKF_DONT_BLOCK) == 0, *pSlot);
  });
}
