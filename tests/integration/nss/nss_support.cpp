#include "nss_support.h"

#include "support/ck_error.h"
#include "support/process.h"

#include <dlfcn.h>

#include <stdexcept>

namespace p11test {

const GcmVector& gcm_test_case_4() {
  static const GcmVector v{
      from_hex("feffe9928665731c6d6a8f9467308308"),
      from_hex("cafebabefacedbaddecaf888"),
      from_hex("feedfacedeadbeeffeedfacedeadbeefabaddad2"),
      from_hex("d9313225f88406e5a55909c5aff5269a86a7a9531534f7da2e4c303d8a318a72"
               "1c3c0c95956809532fcf0e2449a6b525b16aedf5aa0de657ba637b39"),
      from_hex("42831ec2217774244b7221b784d0d49ce3aa212f2c02a4e035c17e2329aca12e"
               "21d514b25466931c7d8f6a5aac84aa051ba30b396a0aac973d58e091"),
      from_hex("5bc94fbc3221a5db94fae95ae7121a47"),
  };
  return v;
}

namespace {

// NSS softoken keeps some allocations past C_Finalize (tests/lsan.supp names
// it). LeakSanitizer can attribute them only to a library still mapped when
// the process exits, so these tests never let softoken unload.
void keep_softoken_mapped() {
  static void* const pinned =
      ::dlopen(required_env("P11MUX_TEST_SOFTOKEN").c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE);
  (void)pinned;
}

}  // namespace

NssDatabase::NssDatabase() : dir_("p11mux-nss-") {
  keep_softoken_mapped();  // every test makes its database before loading modules
  const std::string certutil = required_env("P11MUX_TEST_CERTUTIL");
  const int status =
      run_process({certutil, "-N", "-d", "sql:" + dir_.path().string(), "--empty-password"},
                  dir_.path() / "certutil.log");
  if (status != 0) {
    throw std::runtime_error("certutil -N failed with status " + std::to_string(status) + " (see " +
                             (dir_.path() / "certutil.log").string() + ")");
  }
}

std::string NssDatabase::init_string() const {
  return "configdir='sql:" + dir_.path().string() +
         "' certPrefix='' keyPrefix='' secmod='secmod.db'";
}

Library::Library(const std::string& path) : handle_(::dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL)) {
  if (handle_ == nullptr) throw std::runtime_error("dlopen " + path + ": " + ::dlerror());
}

Library::~Library() { ::dlclose(handle_); }

void* Library::symbol(const char* name) const noexcept { return ::dlsym(handle_, name); }

CK_C_GetInterfaceList Library::get_interface_list() const noexcept {
  return reinterpret_cast<CK_C_GetInterfaceList>(symbol("C_GetInterfaceList"));
}

CK_C_GetInterface Library::get_interface() const noexcept {
  return reinterpret_cast<CK_C_GetInterface>(symbol("C_GetInterface"));
}

CK_FUNCTION_LIST* Library::function_list() const {
  auto get = reinterpret_cast<CK_C_GetFunctionList>(symbol("C_GetFunctionList"));
  if (get == nullptr) throw std::runtime_error("no C_GetFunctionList");
  CK_FUNCTION_LIST* list = nullptr;
  ck_check(get(&list), "C_GetFunctionList");
  return list;
}

std::vector<CK_INTERFACE> interface_list(const Library& library) {
  CK_C_GetInterfaceList get = library.get_interface_list();
  if (get == nullptr) throw std::runtime_error("no C_GetInterfaceList");
  CK_ULONG count = 0;
  ck_check(get(nullptr, &count), "C_GetInterfaceList(NULL)");
  std::vector<CK_INTERFACE> list(count);
  ck_check(get(list.data(), &count), "C_GetInterfaceList");
  list.resize(count);
  return list;
}

std::string describe(const CK_INTERFACE& i) {
  const auto* v = static_cast<const CK_VERSION*>(i.pFunctionList);
  return std::string(reinterpret_cast<const char*>(i.pInterfaceName)) + " " +
         std::to_string(v->major) + "." + std::to_string(v->minor) +
         " flags=" + std::to_string(i.flags);
}

CK_FUNCTION_LIST_3_0* function_list_3_0(const Library& library) {
  CK_C_GetInterface get = library.get_interface();
  if (get == nullptr) return nullptr;
  CK_VERSION v30{3, 0};
  CK_INTERFACE* iface = nullptr;
  auto* name = reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>("PKCS 11"));
  if (get(name, &v30, &iface, 0) != CKR_OK || iface == nullptr) return nullptr;
  return static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
}

Initialized::Initialized(CK_FUNCTION_LIST_3_0* fn, std::optional<std::string> init_string)
    : fn_(fn), init_string_(init_string.value_or("")) {
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  args.pReserved = init_string ? init_string_.data() : nullptr;
  ck_check(fn_->C_Initialize(&args), "C_Initialize");
}

Initialized::~Initialized() { fn_->C_Finalize(nullptr); }

SoftokenBehindP11mux::SoftokenBehindP11mux(const NssDatabase& database)
    : module_("P11MUX_MODULE", required_env("P11MUX_TEST_SOFTOKEN")),
      init_reserved_("P11MUX_BACKEND_INIT_RESERVED", database.init_string()) {}

void refresh_p11mux_probe(const Library& p11mux) {
  CK_FUNCTION_LIST* fn = p11mux.function_list();
  ck_check(fn->C_Initialize(nullptr), "C_Initialize (probe refresh)");
  ck_check(fn->C_Finalize(nullptr), "C_Finalize (probe refresh)");
}

CK_SLOT_ID slot_labelled(CK_FUNCTION_LIST_3_0* fn, const std::string& label) {
  CK_ULONG count = 0;
  ck_check(fn->C_GetSlotList(CK_TRUE, nullptr, &count), "C_GetSlotList(NULL)");
  std::vector<CK_SLOT_ID> slots(count);
  ck_check(fn->C_GetSlotList(CK_TRUE, slots.data(), &count), "C_GetSlotList");
  for (CK_ULONG i = 0; i < count; ++i) {
    CK_TOKEN_INFO info{};
    ck_check(fn->C_GetTokenInfo(slots[i], &info), "C_GetTokenInfo");
    if (std::string(reinterpret_cast<const char*>(info.label), sizeof info.label)
            .starts_with(label)) {
      return slots[i];
    }
  }
  throw std::runtime_error("no token labelled '" + label + "'");
}

CK_OBJECT_HANDLE import_aes_key(CK_FUNCTION_LIST_3_0* fn, CK_SESSION_HANDLE session,
                                const Bytes& value) {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE type = CKK_AES;
  CK_BBOOL yes = CK_TRUE;
  CK_BBOOL no = CK_FALSE;
  Bytes copy = value;
  CK_ATTRIBUTE attrs[] = {
      {CKA_CLASS, &cls, sizeof cls},   {CKA_KEY_TYPE, &type, sizeof type},
      {CKA_TOKEN, &no, sizeof no},     {CKA_VALUE, copy.data(), copy.size()},
      {CKA_ENCRYPT, &yes, sizeof yes}, {CKA_DECRYPT, &yes, sizeof yes},
  };
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  ck_check(fn->C_CreateObject(session, attrs, std::size(attrs), &key), "C_CreateObject(AES)");
  return key;
}

CK_RV encrypt_message(CK_FUNCTION_LIST_3_0* fn, CK_SESSION_HANDLE session, const Bytes& iv,
                      const Bytes& aad, const Bytes& plaintext, Bytes& ciphertext, Bytes& tag) {
  Bytes iv_copy = iv, aad_copy = aad, in = plaintext;
  tag.assign(16, 0);
  GcmMessageParams params{iv_copy.data(), iv_copy.size(), 0, 0, tag.data(), 128};
  ciphertext.assign(plaintext.size() + 16, 0);
  CK_ULONG length = ciphertext.size();
  CK_RV rv = fn->C_EncryptMessage(session, &params, sizeof params, aad_copy.data(), aad_copy.size(),
                                  in.data(), in.size(), ciphertext.data(), &length);
  ciphertext.resize(rv == CKR_OK ? length : 0);
  return rv;
}

CK_RV decrypt_message(CK_FUNCTION_LIST_3_0* fn, CK_SESSION_HANDLE session, const Bytes& iv,
                      const Bytes& aad, const Bytes& ciphertext, Bytes tag, Bytes& plaintext) {
  Bytes iv_copy = iv, aad_copy = aad, in = ciphertext;
  GcmMessageParams params{iv_copy.data(), iv_copy.size(), 0, 0, tag.data(), 128};
  plaintext.assign(ciphertext.size() + 16, 0);
  CK_ULONG length = plaintext.size();
  CK_RV rv = fn->C_DecryptMessage(session, &params, sizeof params, aad_copy.data(), aad_copy.size(),
                                  in.data(), in.size(), plaintext.data(), &length);
  plaintext.resize(rv == CKR_OK ? length : 0);
  return rv;
}

}  // namespace p11test
