// The PKCS#11 function set, described once. Everything else — the exported
// function lists, the forwarders, the argument checks and the call tracer —
// is expanded from this table, so no function is written out by hand twice.
//
// X(name, since, dispatch, args)
//   since     2 for v2.40 (CK_FUNCTION_LIST), 3 for the v3.0 additions.
//   dispatch  entry:   a hand-written entry point that manages its own way in
//                      (lifecycle, interfaces, and the blocking slot-event wait);
//             handled: a hand-written body run inside the call gate with the
//                      same argument checks and tracing as a forwarded call;
//             global:  forwarded as is (slot IDs pass through unchanged);
//             session: the first argument is a virtual session handle, mapped
//                      to the backend session under that session's lock.
//   args      one letter per argument, used for checks and for tracing:
//     h  session handle (mapped)
//     v  value passed unchanged (slot ID, flags, object handle, type, length)
//     p  pointer the spec requires: NULL -> CKR_ARGUMENTS_BAD
//     o  output buffer, NULL allowed (a length query); its length pointer follows
//     b  input buffer with a length after it: NULL only when that length is 0
//     t  attribute template with a count after it: NULL only when the count is 0
//     m  mechanism: NULL only as v3.0's "cancel the operation", on a v3.0 backend
//     k  secret (PIN) with a length after it; NULL allowed (protected
//        authentication path); its value is never logged
//     n  pointer passed unchanged, NULL allowed
// Order is the order of CK_FUNCTION_LIST_3_0, which the lists are built in.
#pragma once

#define P11MUX_FUNCTIONS_V2(X)                  \
  X(C_Initialize, 2, entry, "n")                \
  X(C_Finalize, 2, entry, "n")                  \
  X(C_GetInfo, 2, handled, "p")                 \
  X(C_GetFunctionList, 2, entry, "p")           \
  X(C_GetSlotList, 2, global, "vop")            \
  X(C_GetSlotInfo, 2, global, "vp")             \
  X(C_GetTokenInfo, 2, handled, "vp")           \
  X(C_GetMechanismList, 2, global, "vop")       \
  X(C_GetMechanismInfo, 2, global, "vvp")       \
  X(C_InitToken, 2, global, "vkvp")             \
  X(C_InitPIN, 2, session, "hkv")               \
  X(C_SetPIN, 2, session, "hkvkv")              \
  X(C_OpenSession, 2, handled, "vvnnp")         \
  X(C_CloseSession, 2, handled, "h")            \
  X(C_CloseAllSessions, 2, handled, "v")        \
  X(C_GetSessionInfo, 2, session, "hp")         \
  X(C_GetOperationState, 2, session, "hop")     \
  X(C_SetOperationState, 2, session, "hbvvv")   \
  X(C_Login, 2, session, "hvkv")                \
  X(C_Logout, 2, session, "h")                  \
  X(C_CreateObject, 2, session, "htvp")         \
  X(C_CopyObject, 2, session, "hvtvp")          \
  X(C_DestroyObject, 2, session, "hv")          \
  X(C_GetObjectSize, 2, session, "hvp")         \
  X(C_GetAttributeValue, 2, session, "hvtv")    \
  X(C_SetAttributeValue, 2, session, "hvtv")    \
  X(C_FindObjectsInit, 2, session, "htv")       \
  X(C_FindObjects, 2, session, "hbvp")          \
  X(C_FindObjectsFinal, 2, session, "h")        \
  X(C_EncryptInit, 2, session, "hmv")           \
  X(C_Encrypt, 2, session, "hbvop")             \
  X(C_EncryptUpdate, 2, session, "hbvop")       \
  X(C_EncryptFinal, 2, session, "hop")          \
  X(C_DecryptInit, 2, session, "hmv")           \
  X(C_Decrypt, 2, session, "hbvop")             \
  X(C_DecryptUpdate, 2, session, "hbvop")       \
  X(C_DecryptFinal, 2, session, "hop")          \
  X(C_DigestInit, 2, session, "hm")             \
  X(C_Digest, 2, session, "hbvop")              \
  X(C_DigestUpdate, 2, session, "hbv")          \
  X(C_DigestKey, 2, session, "hv")              \
  X(C_DigestFinal, 2, session, "hop")           \
  X(C_SignInit, 2, session, "hmv")              \
  X(C_Sign, 2, session, "hbvop")                \
  X(C_SignUpdate, 2, session, "hbv")            \
  X(C_SignFinal, 2, session, "hop")             \
  X(C_SignRecoverInit, 2, session, "hmv")       \
  X(C_SignRecover, 2, session, "hbvop")         \
  X(C_VerifyInit, 2, session, "hmv")            \
  X(C_Verify, 2, session, "hbvbv")              \
  X(C_VerifyUpdate, 2, session, "hbv")          \
  X(C_VerifyFinal, 2, session, "hbv")           \
  X(C_VerifyRecoverInit, 2, session, "hmv")     \
  X(C_VerifyRecover, 2, session, "hbvop")       \
  X(C_DigestEncryptUpdate, 2, session, "hbvop") \
  X(C_DecryptDigestUpdate, 2, session, "hbvop") \
  X(C_SignEncryptUpdate, 2, session, "hbvop")   \
  X(C_DecryptVerifyUpdate, 2, session, "hbvop") \
  X(C_GenerateKey, 2, session, "hmtvp")         \
  X(C_GenerateKeyPair, 2, session, "hmtvtvpp")  \
  X(C_WrapKey, 2, session, "hmvvop")            \
  X(C_UnwrapKey, 2, session, "hmvbvtvp")        \
  X(C_DeriveKey, 2, session, "hmvtvn")          \
  X(C_SeedRandom, 2, session, "hbv")            \
  X(C_GenerateRandom, 2, session, "hbv")        \
  X(C_GetFunctionStatus, 2, session, "h")       \
  X(C_CancelFunction, 2, session, "h")          \
  X(C_WaitForSlotEvent, 2, entry, "vpn")

// C_DeriveKey's phKey is 'n': TLS key-and-MAC derivations pass NULL there.
// C_SignMessageNext/C_VerifyMessageNext: NULL signature means "not the last part".
#define P11MUX_FUNCTIONS_V3(X)                    \
  X(C_GetInterfaceList, 3, entry, "op")           \
  X(C_GetInterface, 3, entry, "nnpv")             \
  X(C_LoginUser, 3, session, "hvkvbv")            \
  X(C_SessionCancel, 3, session, "hv")            \
  X(C_MessageEncryptInit, 3, session, "hmv")      \
  X(C_EncryptMessage, 3, session, "hbvbvbvop")    \
  X(C_EncryptMessageBegin, 3, session, "hbvbv")   \
  X(C_EncryptMessageNext, 3, session, "hbvbvopv") \
  X(C_MessageEncryptFinal, 3, session, "h")       \
  X(C_MessageDecryptInit, 3, session, "hmv")      \
  X(C_DecryptMessage, 3, session, "hbvbvbvop")    \
  X(C_DecryptMessageBegin, 3, session, "hbvbv")   \
  X(C_DecryptMessageNext, 3, session, "hbvbvopv") \
  X(C_MessageDecryptFinal, 3, session, "h")       \
  X(C_MessageSignInit, 3, session, "hmv")         \
  X(C_SignMessage, 3, session, "hbvbvop")         \
  X(C_SignMessageBegin, 3, session, "hbv")        \
  X(C_SignMessageNext, 3, session, "hbvbvnn")     \
  X(C_MessageSignFinal, 3, session, "h")          \
  X(C_MessageVerifyInit, 3, session, "hmv")       \
  X(C_VerifyMessage, 3, session, "hbvbvbv")       \
  X(C_VerifyMessageBegin, 3, session, "hbv")      \
  X(C_VerifyMessageNext, 3, session, "hbvbvnv")   \
  X(C_MessageVerifyFinal, 3, session, "h")

#define P11MUX_FUNCTIONS(X) P11MUX_FUNCTIONS_V2(X) P11MUX_FUNCTIONS_V3(X)
