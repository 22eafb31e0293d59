#include "keys.h"

#include <cstring>

#include "ckr_names.h"
#include "module.h"

namespace p11mux::load {

const std::uint8_t kMessage[3] = {'a', 'b', 'c'};
const std::uint8_t kMessageSha256[32] = {0xba, 0x78, 0x16, 0xbf, 0x8f, 0x01, 0xcf, 0xea, 0x41, 0x41, 0x40,
                                         0xde, 0x5d, 0xae, 0x22, 0x23, 0xb0, 0x03, 0x61, 0xa3, 0x96, 0x17,
                                         0x7a, 0x9c, 0xb4, 0x10, 0xff, 0x61, 0xf2, 0x00, 0x15, 0xad};

namespace {

// DER of the OID of NIST P-256 (prime256v1, 1.2.840.10045.3.1.7).
const CK_BYTE kP256Params[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
const CK_BYTE kRsaExponent[] = {0x01, 0x00, 0x01};

CK_BBOOL kTrue = CK_TRUE;
CK_BBOOL kFalse = CK_FALSE;

template <class T>
CK_ATTRIBUTE attr(CK_ATTRIBUTE_TYPE type, T& value) {
  return CK_ATTRIBUTE{type, &value, sizeof value};
}
CK_ATTRIBUTE attr_bytes(CK_ATTRIBUTE_TYPE type, const void* data, std::size_t size) {
  return CK_ATTRIBUTE{type, const_cast<void*>(data), static_cast<CK_ULONG>(size)};
}
CK_ATTRIBUTE attr_label(const char* label) { return attr_bytes(CKA_LABEL, label, std::strlen(label)); }

class Setup {
 public:
  Setup(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE s, bool create, bool logged_in, std::string token,
        const std::function<void(const std::string&)>& notice)
      : f_(fn), s_(s), create_(create), logged_in_(logged_in), token_(std::move(token)), notice_(notice) {}

  std::vector<CK_OBJECT_HANDLE> find(CK_ATTRIBUTE* tmpl, CK_ULONG n, const std::string& what) {
    check_rv(f_->C_FindObjectsInit(s_, tmpl, n), "C_FindObjectsInit (" + what + ")");
    std::vector<CK_OBJECT_HANDLE> found;
    CK_OBJECT_HANDLE batch[16];
    CK_ULONG got = 0;
    CK_RV rv;
    while ((rv = f_->C_FindObjects(s_, batch, 16, &got)) == CKR_OK && got > 0) {
      found.insert(found.end(), batch, batch + got);
    }
    f_->C_FindObjectsFinal(s_);
    check_rv(rv, "C_FindObjects (" + what + ")");
    return found;
  }

  CK_OBJECT_HANDLE find_key(CK_OBJECT_CLASS cls, CK_KEY_TYPE type, const char* label) {
    CK_ATTRIBUTE t[] = {attr(CKA_CLASS, cls), attr(CKA_KEY_TYPE, type), attr_label(label)};
    std::vector<CK_OBJECT_HANDLE> found = find(t, 3, label);
    return found.empty() ? CK_INVALID_HANDLE : found.front();
  }

  // A readable SetupError for a key that is missing and will not be created.
  [[noreturn]] void missing(const std::string& what, const char* label) {
    std::string why = "no " + what + " labelled '" + label + "' on token '" + token_ + "'";
    if (!logged_in_)
      why += " (not logged in: private objects are hidden; drop --no-login)";
    else
      why += " (drop --no-create-keys to generate it)";
    throw SetupError(why);
  }

  void generate_pair(CK_MECHANISM mech, CK_ATTRIBUTE* pub, CK_ULONG npub, CK_ATTRIBUTE* priv, CK_ULONG npriv,
                     const char* label, const std::string& what, CK_OBJECT_HANDLE& pub_out,
                     CK_OBJECT_HANDLE& priv_out) {
    CK_RV rv = f_->C_GenerateKeyPair(s_, &mech, pub, npub, priv, npriv, &pub_out, &priv_out);
    check_rv(rv, "C_GenerateKeyPair (" + what + " '" + label + "') on token '" + token_ + "'");
    notice_("created " + what + " key pair '" + label + "' on token '" + token_ + "'");
  }

  // need_private: false when only the find op uses the key, which works
  // without a login on the public half.
  void ec(Keys& k, bool need_private) {
    k.ec_private = find_key(CKO_PRIVATE_KEY, CKK_EC, kEcLabel);
    k.ec_public = find_key(CKO_PUBLIC_KEY, CKK_EC, kEcLabel);
    if (k.ec_public != CK_INVALID_HANDLE && (k.ec_private != CK_INVALID_HANDLE || !need_private)) return;
    if (!create_ || !logged_in_) {
      missing(k.ec_private == CK_INVALID_HANDLE ? "EC private key" : "EC public key", kEcLabel);
    }
    CK_OBJECT_CLASS pub_class = CKO_PUBLIC_KEY, priv_class = CKO_PRIVATE_KEY;
    CK_KEY_TYPE type = CKK_EC;
    CK_ATTRIBUTE pub[] = {
        attr(CKA_CLASS, pub_class), attr(CKA_KEY_TYPE, type),
        attr(CKA_TOKEN, kTrue),     attr(CKA_VERIFY, kTrue),
        attr_label(kEcLabel),       attr_bytes(CKA_EC_PARAMS, kP256Params, sizeof kP256Params)};
    CK_ATTRIBUTE priv[] = {attr(CKA_CLASS, priv_class), attr(CKA_KEY_TYPE, type),   attr(CKA_TOKEN, kTrue),
                           attr(CKA_PRIVATE, kTrue),    attr(CKA_SENSITIVE, kTrue), attr(CKA_SIGN, kTrue),
                           attr_label(kEcLabel)};
    generate_pair(CK_MECHANISM{CKM_EC_KEY_PAIR_GEN, nullptr, 0}, pub, 6, priv, 7, kEcLabel, "EC P-256",
                  k.ec_public, k.ec_private);
  }

  void rsa(Keys& k) {
    k.rsa_private = find_key(CKO_PRIVATE_KEY, CKK_RSA, kRsaLabel);
    k.rsa_public = find_key(CKO_PUBLIC_KEY, CKK_RSA, kRsaLabel);
    if (k.rsa_private != CK_INVALID_HANDLE && k.rsa_public != CK_INVALID_HANDLE) return;
    if (!create_ || !logged_in_) {
      missing(k.rsa_private == CK_INVALID_HANDLE ? "RSA private key" : "RSA public key", kRsaLabel);
    }
    CK_OBJECT_CLASS pub_class = CKO_PUBLIC_KEY, priv_class = CKO_PRIVATE_KEY;
    CK_KEY_TYPE type = CKK_RSA;
    CK_ULONG bits = 2048;
    CK_ATTRIBUTE pub[] = {
        attr(CKA_CLASS, pub_class),   attr(CKA_KEY_TYPE, type),
        attr(CKA_TOKEN, kTrue),       attr(CKA_VERIFY, kTrue),
        attr(CKA_ENCRYPT, kFalse),    attr_label(kRsaLabel),
        attr(CKA_MODULUS_BITS, bits), attr_bytes(CKA_PUBLIC_EXPONENT, kRsaExponent, sizeof kRsaExponent)};
    CK_ATTRIBUTE priv[] = {attr(CKA_CLASS, priv_class), attr(CKA_KEY_TYPE, type),   attr(CKA_TOKEN, kTrue),
                           attr(CKA_PRIVATE, kTrue),    attr(CKA_SENSITIVE, kTrue), attr(CKA_SIGN, kTrue),
                           attr(CKA_DECRYPT, kFalse),   attr_label(kRsaLabel)};
    generate_pair(CK_MECHANISM{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0}, pub, 8, priv, 8, kRsaLabel, "RSA-2048",
                  k.rsa_public, k.rsa_private);
  }

  void aes(Keys& k) {
    k.aes = find_key(CKO_SECRET_KEY, CKK_AES, kAesLabel);
    if (k.aes != CK_INVALID_HANDLE) return;
    if (!create_ || !logged_in_) missing("AES key", kAesLabel);
    CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_AES;
    CK_ULONG len = 32;
    CK_ATTRIBUTE t[] = {attr(CKA_CLASS, cls),     attr(CKA_KEY_TYPE, type),   attr(CKA_TOKEN, kTrue),
                        attr(CKA_PRIVATE, kTrue), attr(CKA_SENSITIVE, kTrue), attr(CKA_ENCRYPT, kTrue),
                        attr(CKA_DECRYPT, kTrue), attr(CKA_VALUE_LEN, len),   attr_label(kAesLabel)};
    CK_MECHANISM mech{CKM_AES_KEY_GEN, nullptr, 0};
    CK_RV rv = f_->C_GenerateKey(s_, &mech, t, 9, &k.aes);
    check_rv(rv, std::string("C_GenerateKey (AES-256 '") + kAesLabel + "') on token '" + token_ + "'");
    notice_(std::string("created AES-256 key '") + kAesLabel + "' on token '" + token_ + "'");
  }

  std::vector<CK_BYTE> sign(CK_MECHANISM_TYPE type, CK_OBJECT_HANDLE key, const CK_BYTE* data,
                            std::size_t len, const char* label) {
    CK_MECHANISM mech{type, nullptr, 0};
    std::string what = std::string("reference signature with '") + label + "'";
    check_rv(f_->C_SignInit(s_, &mech, key), "C_SignInit (" + what + ")");
    std::vector<CK_BYTE> sig(1024);
    auto n = static_cast<CK_ULONG>(sig.size());
    check_rv(f_->C_Sign(s_, const_cast<CK_BYTE*>(data), static_cast<CK_ULONG>(len), sig.data(), &n),
             "C_Sign (" + what + ")");
    sig.resize(n);
    return sig;
  }

  CK_ULONG count_label(const char* label) {
    CK_ATTRIBUTE t[] = {attr_label(label)};
    return static_cast<CK_ULONG>(find(t, 1, label).size());
  }

 private:
  CK_FUNCTION_LIST* f_;
  CK_SESSION_HANDLE s_;
  bool create_;
  bool logged_in_;
  std::string token_;
  const std::function<void(const std::string&)>& notice_;
};

}  // namespace

Keys prepare_keys(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE session, const Mix& mix, bool create,
                  bool logged_in, const std::string& token_label,
                  const std::function<void(const std::string&)>& notice) {
  Setup setup(fn, session, create, logged_in, token_label, notice);
  Keys keys;
  bool ec_private = mix.contains(OpKind::sign_ec) || mix.contains(OpKind::verify_ec);
  bool ec = ec_private || mix.contains(OpKind::find);
  bool rsa = mix.contains(OpKind::sign_rsa) || mix.contains(OpKind::verify_rsa);
  if (ec) setup.ec(keys, ec_private);
  if (rsa) setup.rsa(keys);
  if (mix.contains(OpKind::aes_gcm)) setup.aes(keys);
  if (mix.contains(OpKind::verify_ec)) {
    keys.ec_signature =
        setup.sign(CKM_ECDSA, keys.ec_private, kMessageSha256, sizeof kMessageSha256, kEcLabel);
  }
  if (mix.contains(OpKind::verify_rsa)) {
    keys.rsa_signature =
        setup.sign(CKM_SHA256_RSA_PKCS, keys.rsa_private, kMessage, sizeof kMessage, kRsaLabel);
  }
  if (mix.contains(OpKind::find)) keys.find_expected = setup.count_label(kEcLabel);
  return keys;
}

}  // namespace p11mux::load
