// A fixed number of calls through any PKCS#11 module, for instruction counting
// with callgrind: run it at two lengths and the difference is the per-call cost.
// Uses the first slot with an initialized token; no login.
//   call-loop MODULE OP COUNT [--idle-thread]
//   OP: random (C_GenerateRandom, 16 bytes) | session-info | open-close |
//       sign (C_SignInit + C_Sign, HMAC-SHA256 of 32 bytes with a session key
//       made once before the loop: a fixed instruction count per call, unlike
//       a signature with a random nonce) | find (C_FindObjectsInit by
//       label + C_FindObjects for up to 16 + C_FindObjectsFinal, finding that
//       same key, the token's only object with its label)
// --idle-thread starts a thread that only sleeps, before the module is
// loaded: glibc's malloc then takes its multi-threaded path (arena locks),
// as in any application with a second thread, such as one whose p11mux
// runs a group (its members' thread). Compare a group with the plain
// configuration in the same state: SoftHSM2's allocations alone cost
// ~1,500 instructions more per signature in a multi-threaded process.
// The key is labelled "call-loop-key", so that a [policy] objects filter
// can let it through (P11MUX_POLICY_OBJECTS=label:call-loop-key).
#include <p11mux/pkcs11.h>
#include <p11mux/rv_names.hpp>

#include <dlfcn.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

namespace {

[[noreturn]] void die(const std::string& what, CK_RV rv) {
  std::fprintf(stderr, "call-loop: %s: %s\n", what.c_str(),
               std::string(p11mux::rv_name(rv)).c_str());
  std::exit(2);
}

// The first slot with an initialized token: SoftHSM2 also lists an empty
// slot, and a proxy may list several modules' slots.
CK_SLOT_ID first_initialized_token(CK_FUNCTION_LIST* p) {
  CK_ULONG count = 0;
  if (CK_RV rv = p->C_GetSlotList(CK_TRUE, nullptr, &count); rv != CKR_OK) die("C_GetSlotList", rv);
  std::vector<CK_SLOT_ID> slots(count);
  if (CK_RV rv = p->C_GetSlotList(CK_TRUE, slots.data(), &count); rv != CKR_OK)
    die("C_GetSlotList", rv);
  slots.resize(count);
  for (CK_SLOT_ID slot : slots) {
    CK_TOKEN_INFO info;
    if (p->C_GetTokenInfo(slot, &info) == CKR_OK && (info.flags & CKF_TOKEN_INITIALIZED))
      return slot;
  }
  die("no initialized token", CKR_TOKEN_NOT_PRESENT);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 4 || (argc > 4 && std::string(argv[4]) != "--idle-thread")) {
    std::fprintf(stderr,
                 "usage: call-loop MODULE random|session-info|open-close|sign|find COUNT "
                 "[--idle-thread]\n");
    return 2;
  }
  if (argc > 4) {
    std::thread([] {
      for (;;) ::pause();
    }).detach();
  }
  void* lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) {
    std::fprintf(stderr, "call-loop: %s\n", dlerror());
    return 2;
  }
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(dlsym(lib, "C_GetFunctionList"));
  CK_FUNCTION_LIST* p = nullptr;
  if (get_list == nullptr || get_list(&p) != CKR_OK) die("C_GetFunctionList", CKR_GENERAL_ERROR);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  if (CK_RV rv = p->C_Initialize(&args); rv != CKR_OK) die("C_Initialize", rv);
  CK_SLOT_ID slot = first_initialized_token(p);
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  if (CK_RV rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h); rv != CKR_OK) {
    die("C_OpenSession", rv);
  }
  std::string op = argv[2];
  long n = std::atol(argv[3]);
  CK_BYTE buf[16];
  CK_SESSION_INFO info;
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  CK_MECHANISM hmac{CKM_SHA256_HMAC, nullptr, 0};
  CK_BYTE data[32] = {}, mac[32];
  static char key_label[] = "call-loop-key";
  CK_ATTRIBUTE by_label{CKA_LABEL, key_label, sizeof key_label - 1};
  if (op == "sign" || op == "find") {
    // A public session object: no login needed.
    CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ULONG len = 32;
    CK_ATTRIBUTE tmpl[] = {{CKA_TOKEN, &no, sizeof no},
                           {CKA_PRIVATE, &no, sizeof no},
                           {CKA_SIGN, &yes, sizeof yes},
                           {CKA_VALUE_LEN, &len, sizeof len},
                           by_label};
    if (CK_RV rv = p->C_GenerateKey(h, &gen, tmpl, 5, &key); rv != CKR_OK) die("C_GenerateKey", rv);
  }
  for (long i = 0; i < n; ++i) {
    CK_RV rv = CKR_OK;
    if (op == "random") {
      rv = p->C_GenerateRandom(h, buf, sizeof buf);
    } else if (op == "session-info") {
      rv = p->C_GetSessionInfo(h, &info);
    } else if (op == "open-close") {
      CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
      rv = p->C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
      if (rv == CKR_OK) rv = p->C_CloseSession(s);
    } else if (op == "sign") {
      CK_ULONG mac_len = sizeof mac;
      rv = p->C_SignInit(h, &hmac, key);
      if (rv == CKR_OK) rv = p->C_Sign(h, data, sizeof data, mac, &mac_len);
    } else if (op == "find") {
      CK_OBJECT_HANDLE found[16];
      CK_ULONG count = 0;
      rv = p->C_FindObjectsInit(h, &by_label, 1);
      if (rv == CKR_OK) rv = p->C_FindObjects(h, found, 16, &count);
      if (rv == CKR_OK && (count != 1 || found[0] != key))
        die("find: not the key", CKR_GENERAL_ERROR);
      if (rv == CKR_OK) rv = p->C_FindObjectsFinal(h);
    } else {
      die("unknown op " + op, CKR_ARGUMENTS_BAD);
    }
    if (rv != CKR_OK) die(op, rv);
  }
  p->C_CloseSession(h);
  p->C_Finalize(nullptr);
  return 0;
}
