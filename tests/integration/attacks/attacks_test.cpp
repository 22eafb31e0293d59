// The known PKCS#11 key-extraction attacks (docs/policy.md), run against the
// module under test. Against SoftHSM2 directly they succeed (or SoftHSM2
// itself refuses, where it does); through p11mux with
// P11MUX_POLICY_PROTECT=all (the ctest integration-attacks-p11mux sets it)
// each is refused, and p11mux's log says which rule refused it.
//
// Each case prints one line, "attack <n> <direct|p11mux>: <step> -> <code>",
// the figures the README's "Policy" section quotes.
#include "support/bytes.h"
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/environment.h"
#include "support/fixture.h"
#include "support/objects.h"
#include "support/slots.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

using namespace p11test;

namespace {

// Through p11mux with every protect rule on, or SoftHSM2 directly.
bool protected_run() {
  const char* protect = std::getenv("P11MUX_POLICY_PROTECT");
  return protect != nullptr && std::string(protect) == "all";
}

const char* run_name() { return protected_run() ? "p11mux" : "direct"; }

void say(int attack, const char* step, CK_RV rv) {
  std::printf("attack %d %s: %s -> %s\n", attack, run_name(), step, ckr_string(rv).c_str());
}

// A token, p11mux's log in the token's directory, the module, a logged-in session.
struct AttackFixture {
  AttackFixture()
      : log_env("P11MUX_LOG_FILE", (token.directory() / "p11mux.log").string()),
        level_env("P11MUX_LOG_LEVEL", "warn"),
        module(module_under_test()),
        p11(module.fn()),
        slot(require_slot_by_label(p11, token.label())),
        session(p11, slot, Access::read_write) {
    REQUIRE_RV(login_user(p11, session, kUserPin), CKR_OK);
  }

  // What p11mux logged so far (empty when SoftHSM2 runs directly).
  std::string log() const {
    std::ifstream in(token.directory() / "p11mux.log");
    std::stringstream text;
    text << in.rdbuf();
    return text.str();
  }

  // p11mux said this rule refused this function.
  bool refused_by(const std::string& function, const std::string& rule) const {
    return log().find("policy refused " + function + ": rule " + rule) != std::string::npos;
  }

  SoftHsmToken token;
  ScopedEnv log_env;
  ScopedEnv level_env;
  Module module;
  const CK_FUNCTION_LIST& p11;
  CK_SLOT_ID slot;
  Session session;
};

// The secret the attacks are after: 16 bytes only the test knows.
const Bytes kSecret{0x5e, 0xc4, 0xe7, 0x00, 0x11, 0x22, 0x33, 0x44,
                    0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc};

// A session AES key of this value and these boolean attributes; the answer.
CK_RV create_aes(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE s, const Bytes& value,
                 std::initializer_list<std::pair<CK_ATTRIBUTE_TYPE, bool>> flags,
                 std::string_view label, CK_OBJECT_HANDLE& out) {
  Template t;
  t.add_ulong(CKA_CLASS, CKO_SECRET_KEY)
      .add_ulong(CKA_KEY_TYPE, CKK_AES)
      .add_bool(CKA_TOKEN, false)
      .add_bool(CKA_PRIVATE, true)
      .add_bytes(CKA_VALUE, value)
      .add_string(CKA_LABEL, label)
      .add_bytes(CKA_ID, Bytes{0x01, 0x02});
  for (auto [type, on] : flags) t.add_bool(type, on);
  return p11.C_CreateObject(s, t.data(), t.size(), &out);
}

// The victim: sensitive (its value cannot be read), extractable (it may be
// wrapped, as keys meant for backup or transport are).
CK_OBJECT_HANDLE victim(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE s) {
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  REQUIRE_RV(create_aes(p11, s, kSecret,
                        {{CKA_SENSITIVE, true},
                         {CKA_EXTRACTABLE, true},
                         {CKA_ENCRYPT, true},
                         {CKA_DECRYPT, false},
                         {CKA_WRAP, false},
                         {CKA_UNWRAP, false}},
                        "victim", key),
             CKR_OK);
  CK_ATTRIBUTE value{CKA_VALUE, nullptr, 0};
  REQUIRE_RV(p11.C_GetAttributeValue(s, key, &value, 1), CKR_ATTRIBUTE_SENSITIVE);
  return key;
}

CK_RV wrap(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE wrapping,
           CK_OBJECT_HANDLE key, Bytes& blob) {
  CK_MECHANISM m{CKM_AES_KEY_WRAP, nullptr, 0};
  blob.assign(64, 0);
  CK_ULONG len = blob.size();
  const CK_RV rv = p11.C_WrapKey(s, &m, wrapping, key, blob.data(), &len);
  blob.resize(rv == CKR_OK ? len : 0);
  return rv;
}

// One AES block decrypted with CKM_AES_ECB on the token.
Bytes ecb_decrypt(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key,
                  Bytes block) {
  CK_MECHANISM m{CKM_AES_ECB, nullptr, 0};
  REQUIRE_RV(p11.C_DecryptInit(s, &m, key), CKR_OK);
  Bytes out(16);
  CK_ULONG len = out.size();
  REQUIRE_RV(p11.C_Decrypt(s, block.data(), block.size(), out.data(), &len), CKR_OK);
  return out;
}

// RFC 3394 key unwrap, with the attacker's key doing AES decryption on the
// token: what "decrypt the wrapped blob" means for CKM_AES_KEY_WRAP.
Bytes rfc3394_unwrap(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE key,
                     const Bytes& blob) {
  REQUIRE(blob.size() % 8 == 0);
  const std::size_t n = blob.size() / 8 - 1;
  Bytes a(blob.begin(), blob.begin() + 8);
  std::vector<Bytes> r;
  for (std::size_t i = 0; i < n; ++i)
    r.emplace_back(blob.begin() + 8 * (i + 1), blob.begin() + 8 * (i + 2));
  for (int j = 5; j >= 0; --j) {
    for (std::size_t i = n; i >= 1; --i) {
      const std::uint64_t t = n * static_cast<std::uint64_t>(j) + i;
      Bytes block = a;
      for (int k = 0; k < 8; ++k) block[7 - k] ^= static_cast<unsigned char>(t >> (8 * k));
      block.insert(block.end(), r[i - 1].begin(), r[i - 1].end());
      const Bytes b = ecb_decrypt(p11, s, key, block);
      a.assign(b.begin(), b.begin() + 8);
      r[i - 1].assign(b.begin() + 8, b.end());
    }
  }
  CHECK(a == Bytes(8, 0xa6));  // the RFC's integrity check value
  Bytes out;
  for (const Bytes& part : r) out.insert(out.end(), part.begin(), part.end());
  return out;
}

}  // namespace

TEST_CASE_FIXTURE(AttackFixture,
                  "attack 1: wrap a sensitive key with the attacker's key, decrypt the blob") {
  const CK_OBJECT_HANDLE target = victim(p11, session);
  // The attacker's key, known to it, twice: one to wrap, one to decrypt
  // (so that conflicting-attributes does not stop it: this is the wrap rule's case).
  const Bytes known(16, 0x42);
  CK_OBJECT_HANDLE wrapper = CK_INVALID_HANDLE, decrypter = CK_INVALID_HANDLE;
  REQUIRE_RV(create_aes(p11, session, known, {{CKA_WRAP, true}, {CKA_DECRYPT, false}}, "attacker",
                        wrapper),
             CKR_OK);
  REQUIRE_RV(create_aes(p11, session, known, {{CKA_DECRYPT, true}, {CKA_WRAP, false}}, "attacker2",
                        decrypter),
             CKR_OK);
  Bytes blob;
  const CK_RV rv = wrap(p11, session, wrapper, target, blob);
  say(1, "C_WrapKey(victim, attacker's key)", rv);
  if (protected_run()) {
    CHECK_RV(rv, CKR_KEY_NOT_WRAPPABLE);
    CHECK(refused_by("C_WrapKey", "wrap-trusted"));
    // A wrapping key the SO trusts would be allowed: SoftHSM2 lets only the
    // SO set CKA_TRUSTED, so an attacker cannot make one.
    CK_OBJECT_HANDLE fake = CK_INVALID_HANDLE;
    CHECK_RV(create_aes(p11, session, known, {{CKA_WRAP, true}, {CKA_TRUSTED, true}}, "fake", fake),
             CKR_ATTRIBUTE_READ_ONLY);
  } else {
    REQUIRE_RV(rv, CKR_OK);
    CHECK(rfc3394_unwrap(p11, session, decrypter, blob) == kSecret);  // the secret, recovered
    say(1, "decrypt the blob with the attacker's key: secret recovered", CKR_OK);
  }
}

TEST_CASE_FIXTURE(AttackFixture, "attack 2: turn CKA_SENSITIVE off, CKA_EXTRACTABLE on") {
  const CK_OBJECT_HANDLE target = victim(p11, session);
  Template off;
  off.add_bool(CKA_SENSITIVE, false);
  const CK_RV set = p11.C_SetAttributeValue(session, target, off.data(), off.size());
  say(2, "C_SetAttributeValue(victim, CKA_SENSITIVE=false)", set);
  CK_OBJECT_HANDLE copy = CK_INVALID_HANDLE;
  const CK_RV copied = p11.C_CopyObject(session, target, off.data(), off.size(), &copy);
  say(2, "C_CopyObject(victim, CKA_SENSITIVE=false)", copied);

  CK_OBJECT_HANDLE locked = CK_INVALID_HANDLE;
  REQUIRE_RV(create_aes(p11, session, kSecret, {{CKA_SENSITIVE, true}, {CKA_EXTRACTABLE, false}},
                        "locked", locked),
             CKR_OK);
  Template on;
  on.add_bool(CKA_EXTRACTABLE, true);
  const CK_RV extract = p11.C_SetAttributeValue(session, locked, on.data(), on.size());
  say(2, "C_SetAttributeValue(key, CKA_EXTRACTABLE=true)", extract);
  const CK_RV copied_on = p11.C_CopyObject(session, locked, on.data(), on.size(), &copy);
  say(2, "C_CopyObject(key, CKA_EXTRACTABLE=true)", copied_on);

  // SoftHSM2 keeps both attributes sticky itself, as the spec asks; p11mux
  // refuses before it, with the same code, for tokens that do not.
  CHECK_RV(set, CKR_ATTRIBUTE_READ_ONLY);
  CHECK_RV(copied, CKR_ATTRIBUTE_READ_ONLY);
  CHECK_RV(extract, CKR_ATTRIBUTE_READ_ONLY);
  CHECK_RV(copied_on, CKR_ATTRIBUTE_READ_ONLY);
  CHECK(refused_by("C_SetAttributeValue", "sticky-attributes") == protected_run());
  CHECK(refused_by("C_CopyObject", "sticky-attributes") == protected_run());
  CK_ATTRIBUTE value{CKA_VALUE, nullptr, 0};
  CHECK_RV(p11.C_GetAttributeValue(session, target, &value, 1), CKR_ATTRIBUTE_SENSITIVE);
}

TEST_CASE_FIXTURE(AttackFixture, "attack 3: a key that wraps and decrypts recovers another key") {
  const CK_OBJECT_HANDLE target = victim(p11, session);
  // The attacker does not need to know this key's value: the token decrypts with it.
  Template both;
  both.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_PRIVATE, true)
      .add_bool(CKA_WRAP, true)
      .add_bool(CKA_DECRYPT, true)
      .add_ulong(CKA_VALUE_LEN, 16)
      .add_string(CKA_LABEL, "wrap-and-decrypt");
  CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  const CK_RV made = p11.C_GenerateKey(session, &gen, both.data(), both.size(), &key);
  say(3, "C_GenerateKey(CKA_WRAP=true, CKA_DECRYPT=true)", made);

  // The same key made in two steps: wrap only, then decrypt turned on.
  Template wrap_only;
  wrap_only.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_PRIVATE, true)
      .add_bool(CKA_WRAP, true)
      .add_bool(CKA_DECRYPT, false)
      .add_ulong(CKA_VALUE_LEN, 16)
      .add_string(CKA_LABEL, "wrap-then-decrypt");
  CK_OBJECT_HANDLE later = CK_INVALID_HANDLE;
  REQUIRE_RV(p11.C_GenerateKey(session, &gen, wrap_only.data(), wrap_only.size(), &later), CKR_OK);
  Template decrypt_on;
  decrypt_on.add_bool(CKA_DECRYPT, true);
  const CK_RV turned =
      p11.C_SetAttributeValue(session, later, decrypt_on.data(), decrypt_on.size());
  say(3, "C_SetAttributeValue(wrap key, CKA_DECRYPT=true)", turned);

  if (protected_run()) {
    CHECK_RV(made, CKR_TEMPLATE_INCONSISTENT);
    CHECK_RV(turned, CKR_ACTION_PROHIBITED);
    CHECK(refused_by("C_GenerateKey", "conflicting-attributes"));
    CHECK(refused_by("C_SetAttributeValue", "conflicting-attributes"));
  } else {
    REQUIRE_RV(made, CKR_OK);
    REQUIRE_RV(turned, CKR_OK);
    for (CK_OBJECT_HANDLE k : {key, later}) {
      Bytes blob;
      REQUIRE_RV(wrap(p11, session, k, target, blob), CKR_OK);
      CHECK(rfc3394_unwrap(p11, session, k, blob) == kSecret);
    }
    say(3, "C_WrapKey(victim) then C_Decrypt with the same key: secret recovered", CKR_OK);
  }
}

TEST_CASE_FIXTURE(AttackFixture, "attack 4: the PKCS#1 v1.5 decryption oracle") {
  Template pub, priv;
  pub.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_ENCRYPT, true)
      .add_ulong(CKA_MODULUS_BITS, 1024)
      .add_bytes(CKA_PUBLIC_EXPONENT, Bytes{0x01, 0x00, 0x01})
      .add_string(CKA_LABEL, "rsa");
  priv.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_PRIVATE, true)
      .add_bool(CKA_SENSITIVE, true)
      .add_bool(CKA_DECRYPT, true)
      .add_bool(CKA_UNWRAP, true)
      .add_string(CKA_LABEL, "rsa");
  CK_MECHANISM gen{CKM_RSA_PKCS_KEY_PAIR_GEN, nullptr, 0};
  CK_OBJECT_HANDLE pub_key = CK_INVALID_HANDLE, priv_key = CK_INVALID_HANDLE;
  REQUIRE_RV(p11.C_GenerateKeyPair(session, &gen, pub.data(), pub.size(), priv.data(), priv.size(),
                                   &pub_key, &priv_key),
             CKR_OK);
  CK_MECHANISM pkcs{CKM_RSA_PKCS, nullptr, 0};
  // A ciphertext that is not PKCS#1 v1.5 padding: the oracle's question.
  Bytes forged(128, 0x00);
  forged[1] = 0x17;
  forged[127] = 0x01;
  const CK_RV init = p11.C_DecryptInit(session, &pkcs, priv_key);
  say(4, "C_DecryptInit(CKM_RSA_PKCS)", init);
  CK_OBJECT_HANDLE unwrapped = CK_INVALID_HANDLE;
  Template secret;
  secret.add_ulong(CKA_CLASS, CKO_SECRET_KEY)
      .add_ulong(CKA_KEY_TYPE, CKK_AES)
      .add_bool(CKA_TOKEN, false);
  const CK_RV unwrap = p11.C_UnwrapKey(session, &pkcs, priv_key, forged.data(), forged.size(),
                                       secret.data(), secret.size(), &unwrapped);
  say(4, "C_UnwrapKey(CKM_RSA_PKCS, bad padding)", unwrap);
  if (protected_run()) {
    CHECK_RV(init, CKR_MECHANISM_INVALID);
    CHECK_RV(unwrap, CKR_MECHANISM_INVALID);
    CHECK(refused_by("C_DecryptInit", "no-padding-oracle"));
    CHECK(refused_by("C_UnwrapKey", "no-padding-oracle"));
  } else {
    REQUIRE_RV(init, CKR_OK);
    Bytes out(128);
    CK_ULONG len = out.size();
    const CK_RV answer = p11.C_Decrypt(session, forged.data(), forged.size(), out.data(), &len);
    say(4, "C_Decrypt(bad padding): the oracle answers", answer);
    CHECK(answer != CKR_OK);  // a padding error ...
    CHECK(unwrap != CKR_OK);
    // ... told apart from a well-padded ciphertext: the oracle's answer.
    CHECK_RV(p11.C_EncryptInit(session, &pkcs, pub_key), CKR_OK);
    Bytes message{1, 2, 3}, cipher(128), plain(128);
    len = cipher.size();
    REQUIRE_RV(p11.C_Encrypt(session, message.data(), message.size(), cipher.data(), &len), CKR_OK);
    REQUIRE_RV(p11.C_DecryptInit(session, &pkcs, priv_key), CKR_OK);
    CK_ULONG plain_len = plain.size();
    const CK_RV good = p11.C_Decrypt(session, cipher.data(), len, plain.data(), &plain_len);
    say(4, "C_Decrypt(good padding)", good);
    CHECK_RV(good, CKR_OK);
  }
  // Encryption with CKM_RSA_PKCS, and OAEP both ways, are not the oracle: allowed.
  CHECK_RV(p11.C_EncryptInit(session, &pkcs, pub_key), CKR_OK);
  Bytes message{1, 2, 3}, cipher(128);
  CK_ULONG len = cipher.size();
  CHECK_RV(p11.C_Encrypt(session, message.data(), message.size(), cipher.data(), &len), CKR_OK);
  CK_RSA_PKCS_OAEP_PARAMS params{CKM_SHA_1, CKG_MGF1_SHA1, CKZ_DATA_SPECIFIED, nullptr, 0};
  CK_MECHANISM oaep{CKM_RSA_PKCS_OAEP, &params, sizeof params};
  REQUIRE_RV(p11.C_EncryptInit(session, &oaep, pub_key), CKR_OK);
  len = cipher.size();
  REQUIRE_RV(p11.C_Encrypt(session, message.data(), message.size(), cipher.data(), &len), CKR_OK);
  REQUIRE_RV(p11.C_DecryptInit(session, &oaep, priv_key), CKR_OK);
  Bytes plain(128);
  CK_ULONG plain_len = plain.size();
  REQUIRE_RV(p11.C_Decrypt(session, cipher.data(), len, plain.data(), &plain_len), CKR_OK);
  plain.resize(plain_len);
  CHECK(plain == message);
}

TEST_CASE_FIXTURE(AttackFixture,
                  "attack 3 by the token's defaults: a template that says only CKA_WRAP") {
  const CK_OBJECT_HANDLE target = victim(p11, session);
  Template wrap_only;
  wrap_only.add_bool(CKA_TOKEN, false)
      .add_bool(CKA_PRIVATE, true)
      .add_bool(CKA_WRAP, true)
      .add_ulong(CKA_VALUE_LEN, 16)
      .add_string(CKA_LABEL, "wrap-by-default");
  CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  // Allowed through p11mux too: conflicting-attributes sees only the template.
  REQUIRE_RV(p11.C_GenerateKey(session, &gen, wrap_only.data(), wrap_only.size(), &key), CKR_OK);
  // SoftHSM2's default makes it a decryption key as well (docs/policy.md).
  CHECK(attribute_bytes(p11, session, key, CKA_DECRYPT) == Bytes{CK_TRUE});
  Bytes blob;
  const CK_RV rv = wrap(p11, session, key, target, blob);
  say(3, "C_GenerateKey(CKA_WRAP=true only) -> CKR_OK; C_WrapKey(victim) with it", rv);
  if (protected_run()) {
    CHECK_RV(rv, CKR_KEY_NOT_WRAPPABLE);  // wrap-trusted covers what the template hid
    CHECK(refused_by("C_WrapKey", "wrap-trusted"));
  } else {
    REQUIRE_RV(rv, CKR_OK);
    CHECK(rfc3394_unwrap(p11, session, key, blob) == kSecret);
  }
}
