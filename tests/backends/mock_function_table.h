// Every PKCS#11 function the mock implements, in the order of
// <p11mux/functions.h> and CK_FUNCTION_LIST_3_0 (checked at compile time in
// mock_calls.cpp), with what the mock needs beyond p11mux's table: the kind of
// call and the operation it continues. The position here is the "function
// index" used by MockStats::calls. The function lists, the call counters, the name lookup and
// the v3.0 declarations are all expanded from this table.
//
// Columns: X(name, kind, op)
//   kind  Boot    callable before C_Initialize; not part of the race accounting
//         Global  needs the library initialized, no slot or session argument
//         Slot    takes a CK_SLOT_ID
//         Session takes a CK_SESSION_HANDLE: wrapped by session_call()
//   op    the operation this call continues (and that ends when it fails with
//         anything but CKR_BUFFER_TOO_SMALL), or None.
#pragma once

#define MOCK_V2_FUNCTIONS(X)              \
  X(C_Initialize, Boot, None)             \
  X(C_Finalize, Global, None)             \
  X(C_GetInfo, Global, None)              \
  X(C_GetFunctionList, Boot, None)        \
  X(C_GetSlotList, Global, None)          \
  X(C_GetSlotInfo, Slot, None)            \
  X(C_GetTokenInfo, Slot, None)           \
  X(C_GetMechanismList, Slot, None)       \
  X(C_GetMechanismInfo, Slot, None)       \
  X(C_InitToken, Slot, None)              \
  X(C_InitPIN, Session, None)             \
  X(C_SetPIN, Session, None)              \
  X(C_OpenSession, Slot, None)            \
  X(C_CloseSession, Session, None)        \
  X(C_CloseAllSessions, Slot, None)       \
  X(C_GetSessionInfo, Session, None)      \
  X(C_GetOperationState, Session, None)   \
  X(C_SetOperationState, Session, None)   \
  X(C_Login, Session, None)               \
  X(C_Logout, Session, None)              \
  X(C_CreateObject, Session, None)        \
  X(C_CopyObject, Session, None)          \
  X(C_DestroyObject, Session, None)       \
  X(C_GetObjectSize, Session, None)       \
  X(C_GetAttributeValue, Session, None)   \
  X(C_SetAttributeValue, Session, None)   \
  X(C_FindObjectsInit, Session, None)     \
  X(C_FindObjects, Session, None)         \
  X(C_FindObjectsFinal, Session, None)    \
  X(C_EncryptInit, Session, None)         \
  X(C_Encrypt, Session, Encrypt)          \
  X(C_EncryptUpdate, Session, Encrypt)    \
  X(C_EncryptFinal, Session, Encrypt)     \
  X(C_DecryptInit, Session, None)         \
  X(C_Decrypt, Session, Decrypt)          \
  X(C_DecryptUpdate, Session, Decrypt)    \
  X(C_DecryptFinal, Session, Decrypt)     \
  X(C_DigestInit, Session, None)          \
  X(C_Digest, Session, Digest)            \
  X(C_DigestUpdate, Session, Digest)      \
  X(C_DigestKey, Session, Digest)         \
  X(C_DigestFinal, Session, Digest)       \
  X(C_SignInit, Session, None)            \
  X(C_Sign, Session, Sign)                \
  X(C_SignUpdate, Session, Sign)          \
  X(C_SignFinal, Session, Sign)           \
  X(C_SignRecoverInit, Session, None)     \
  X(C_SignRecover, Session, None)         \
  X(C_VerifyInit, Session, None)          \
  X(C_Verify, Session, Verify)            \
  X(C_VerifyUpdate, Session, Verify)      \
  X(C_VerifyFinal, Session, Verify)       \
  X(C_VerifyRecoverInit, Session, None)   \
  X(C_VerifyRecover, Session, None)       \
  X(C_DigestEncryptUpdate, Session, None) \
  X(C_DecryptDigestUpdate, Session, None) \
  X(C_SignEncryptUpdate, Session, None)   \
  X(C_DecryptVerifyUpdate, Session, None) \
  X(C_GenerateKey, Session, None)         \
  X(C_GenerateKeyPair, Session, None)     \
  X(C_WrapKey, Session, None)             \
  X(C_UnwrapKey, Session, None)           \
  X(C_DeriveKey, Session, None)           \
  X(C_SeedRandom, Session, None)          \
  X(C_GenerateRandom, Session, None)      \
  X(C_GetFunctionStatus, Session, None)   \
  X(C_CancelFunction, Session, None)      \
  X(C_WaitForSlotEvent, Global, None)

#define MOCK_V3_FUNCTIONS(X)              \
  X(C_GetInterfaceList, Boot, None)       \
  X(C_GetInterface, Boot, None)           \
  X(C_LoginUser, Session, None)           \
  X(C_SessionCancel, Session, None)       \
  X(C_MessageEncryptInit, Session, None)  \
  X(C_EncryptMessage, Session, None)      \
  X(C_EncryptMessageBegin, Session, None) \
  X(C_EncryptMessageNext, Session, None)  \
  X(C_MessageEncryptFinal, Session, None) \
  X(C_MessageDecryptInit, Session, None)  \
  X(C_DecryptMessage, Session, None)      \
  X(C_DecryptMessageBegin, Session, None) \
  X(C_DecryptMessageNext, Session, None)  \
  X(C_MessageDecryptFinal, Session, None) \
  X(C_MessageSignInit, Session, None)     \
  X(C_SignMessage, Session, None)         \
  X(C_SignMessageBegin, Session, None)    \
  X(C_SignMessageNext, Session, None)     \
  X(C_MessageSignFinal, Session, None)    \
  X(C_MessageVerifyInit, Session, None)   \
  X(C_VerifyMessage, Session, None)       \
  X(C_VerifyMessageBegin, Session, None)  \
  X(C_VerifyMessageNext, Session, None)   \
  X(C_MessageVerifyFinal, Session, None)

#define MOCK_ALL_FUNCTIONS(X) MOCK_V2_FUNCTIONS(X) MOCK_V3_FUNCTIONS(X)
