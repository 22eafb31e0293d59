// Support for the PKCS#11 v3.0 tests: an NSS softoken database made by the
// test, modules loaded through their v3.0 interfaces, and AES-GCM message
// encryption helpers.
//
// Environment (set by CMake, see tests/integration/nss/CMakeLists.txt):
//   P11MUX_TEST_P11MUX    libp11mux.so
//   P11MUX_TEST_SOFTOKEN  NSS softoken, libsoftokn3.so (PKCS#11 3.0)
//   P11MUX_TEST_CERTUTIL  certutil, to create the database
//   P11MUX_TEST_SOFTHSM2  SoftHSM2 (PKCS#11 2.40)
#pragma once

#include "support/bytes.h"
#include "support/environment.h"
#include "support/temp_dir.h"

#include <p11mux/pkcs11.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace p11test {

// CK_GCM_MESSAGE_PARAMS (PKCS#11 3.0), not in the v2.40 header.
struct GcmMessageParams {
  CK_BYTE_PTR pIv;
  CK_ULONG ulIvLen;
  CK_ULONG ulIvFixedBits;
  CK_ULONG ivGenerator;  // CK_GENERATOR_FUNCTION; 0 = CKG_NO_GENERATE
  CK_BYTE_PTR pTag;
  CK_ULONG ulTagBits;
};

// The AES-GCM known answer: test case 4 of McGrew & Viega, "The Galois/Counter
// Mode of Operation" (also in NIST's GCM test vectors).
struct GcmVector {
  Bytes key, iv, aad, plaintext, ciphertext, tag;
};
const GcmVector& gcm_test_case_4();

// A fresh NSS database (certutil -N --empty-password) in a temporary directory.
class NssDatabase {
 public:
  NssDatabase();
  NssDatabase(const NssDatabase&) = delete;  // owns a directory
  NssDatabase& operator=(const NssDatabase&) = delete;
  // NSS softoken's C_Initialize pReserved string for this database.
  std::string init_string() const;

 private:
  TempDir dir_;
};

// A dlopen'ed library, dlclosed on destruction.
class Library {
 public:
  explicit Library(const std::string& path);
  ~Library();
  Library(const Library&) = delete;  // one dlopen, one dlclose
  Library& operator=(const Library&) = delete;
  // NULL when the library has no such symbol.
  void* symbol(const char* name) const noexcept;
  CK_C_GetInterfaceList get_interface_list() const noexcept;
  CK_C_GetInterface get_interface() const noexcept;
  CK_FUNCTION_LIST* function_list() const;  // C_GetFunctionList; throws on failure

 private:
  void* handle_;
};

// C_GetInterfaceList, both calls; throws on failure.
std::vector<CK_INTERFACE> interface_list(const Library& library);
// "PKCS 11 3.0 flags=0": name, version and flags of an interface.
std::string describe(const CK_INTERFACE& i);
// The "PKCS 11" 3.0 function list, or NULL if the module does not offer it.
CK_FUNCTION_LIST_3_0* function_list_3_0(const Library& library);

// C_Initialize (OS locking, pReserved = init_string when given) now and
// C_Finalize on destruction.
class Initialized {
 public:
  Initialized(CK_FUNCTION_LIST_3_0* fn, std::optional<std::string> init_string = {});
  ~Initialized();
  Initialized(const Initialized&) = delete;  // finalizes once
  Initialized& operator=(const Initialized&) = delete;

 private:
  CK_FUNCTION_LIST_3_0* fn_;
  std::string init_string_;
};

// p11mux in front of NSS softoken with `database`: sets P11MUX_MODULE and
// P11MUX_BACKEND_INIT_RESERVED for the lifetime of the object.
class SoftokenBehindP11mux {
 public:
  explicit SoftokenBehindP11mux(const NssDatabase& database);

 private:
  ScopedEnv module_;
  ScopedEnv init_reserved_;
};

// Makes p11mux's next interface query probe afresh: its cached probe is stale
// after any C_Initialize+C_Finalize cycle (README, "PKCS#11 versions").
void refresh_p11mux_probe(const Library& p11mux);

// The first slot whose token label starts with `label`; throws if none.
CK_SLOT_ID slot_labelled(CK_FUNCTION_LIST_3_0* fn, const std::string& label);
// NSS softoken's slots: crypto without login, and the key database.
inline constexpr const char* kNssCryptoSlot = "NSS Generic Crypto Services";
inline constexpr const char* kNssKeySlot = "NSS Certificate DB";

// A session AES key (CKA_TOKEN false) with the given value, for encryption and
// decryption; throws on failure.
CK_OBJECT_HANDLE import_aes_key(CK_FUNCTION_LIST_3_0* fn, CK_SESSION_HANDLE session,
                                const Bytes& value);

// C_EncryptMessage with AES-GCM parameters (a message-encrypt operation must be
// active); fills tag (16 bytes). Returns the module's answer.
CK_RV encrypt_message(CK_FUNCTION_LIST_3_0* fn, CK_SESSION_HANDLE session, const Bytes& iv,
                      const Bytes& aad, const Bytes& plaintext, Bytes& ciphertext, Bytes& tag);
// C_DecryptMessage, the counterpart.
CK_RV decrypt_message(CK_FUNCTION_LIST_3_0* fn, CK_SESSION_HANDLE session, const Bytes& iv,
                      const Bytes& aad, const Bytes& ciphertext, Bytes tag, Bytes& plaintext);

}  // namespace p11test
