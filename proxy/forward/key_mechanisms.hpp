// Which key handles a key-making call returns, by mechanism: the one table
// p11mux trusts to find every session object a C_DeriveKey, C_UnwrapKey,
// C_GenerateKey or C_GenerateKeyPair created (issue 10, defect 1). A handle
// p11mux does not see is a session key that outlives its virtual session in
// a pooled backend session; so what this table does not know is "not
// provably clean" and the backend session is closed, not pooled.
//
// - C_DeriveKey: only the mechanisms listed below. Most return their key in
//   phKey; the SSL3/TLS/WTLS key-and-MAC derivations and the SP 800-108 KDFs
//   (v3.0) also, or only, return handles inside their parameter. Any other
//   derivation (vendor-defined, X3DH, X2Ratchet, newer ones) is unknown.
// - C_UnwrapKey, C_GenerateKey, C_GenerateKeyPair: no standard mechanism of
//   PKCS#11 2.40 or 3.0 returns a handle other than through the function's
//   own handle arguments; a vendor-defined one (CKM_VENDOR_DEFINED and up)
//   might, and is unknown.
#pragma once

#include <p11mux/pkcs11.h>

#include <algorithm>
#include <cstddef>
#include <optional>

namespace p11mux {

// Where a mechanism's keys come back (besides phKey, when that is not NULL).
enum class KeyOutputs : unsigned char {
  handle_args,         // only the function's CK_OBJECT_HANDLE_PTR arguments
  ssl3_key_mat,        // CK_SSL3_KEY_MAT_PARAMS.pReturnedKeyMaterial (CK_SSL3_KEY_MAT_OUT)
  tls12_key_mat,       // CK_TLS12_KEY_MAT_PARAMS.pReturnedKeyMaterial (CK_SSL3_KEY_MAT_OUT)
  wtls_key_mat,        // CK_WTLS_KEY_MAT_PARAMS.pReturnedKeyMaterial (CK_WTLS_KEY_MAT_OUT)
  sp800_108,           // CK_SP800_108_KDF_PARAMS.pAdditionalDerivedKeys[i].phKey
  sp800_108_feedback,  // the same in CK_SP800_108_FEEDBACK_KDF_PARAMS
};

struct DeriveMechanism {
  CK_MECHANISM_TYPE type;
  KeyOutputs outputs;
};

// v3.0 values p11-kit's header does not define.
inline constexpr CK_MECHANISM_TYPE kCkmSp800108CounterKdf = 0x3ac, kCkmSp800108FeedbackKdf = 0x3ad,
                                   kCkmSp800108DoublePipelineKdf = 0x3ae, kCkmHkdfDerive = 0x402a,
                                   kCkmHkdfData = 0x402b;

// Every derivation p11mux knows, and where its keys come back.
inline constexpr DeriveMechanism kDeriveMechanisms[] = {
    {CKM_SSL3_KEY_AND_MAC_DERIVE, KeyOutputs::ssl3_key_mat},
    {CKM_TLS_KEY_AND_MAC_DERIVE, KeyOutputs::ssl3_key_mat},
    {CKM_TLS12_KEY_AND_MAC_DERIVE, KeyOutputs::tls12_key_mat},
    {CKM_TLS12_KEY_SAFE_DERIVE, KeyOutputs::tls12_key_mat},
    {CKM_WTLS_SERVER_KEY_AND_MAC_DERIVE, KeyOutputs::wtls_key_mat},
    {CKM_WTLS_CLIENT_KEY_AND_MAC_DERIVE, KeyOutputs::wtls_key_mat},
    {kCkmSp800108CounterKdf, KeyOutputs::sp800_108},
    {kCkmSp800108DoublePipelineKdf, KeyOutputs::sp800_108},
    {kCkmSp800108FeedbackKdf, KeyOutputs::sp800_108_feedback},
    {CKM_DH_PKCS_DERIVE, KeyOutputs::handle_args},
    {CKM_X9_42_DH_DERIVE, KeyOutputs::handle_args},
    {CKM_X9_42_DH_HYBRID_DERIVE, KeyOutputs::handle_args},
    {CKM_X9_42_MQV_DERIVE, KeyOutputs::handle_args},
    {CKM_ECDH1_DERIVE, KeyOutputs::handle_args},
    {CKM_ECDH1_COFACTOR_DERIVE, KeyOutputs::handle_args},
    {CKM_ECMQV_DERIVE, KeyOutputs::handle_args},
    {CKM_KEA_KEY_DERIVE, KeyOutputs::handle_args},
    {CKM_GOSTR3410_DERIVE, KeyOutputs::handle_args},
    {CKM_CONCATENATE_BASE_AND_KEY, KeyOutputs::handle_args},
    {CKM_CONCATENATE_BASE_AND_DATA, KeyOutputs::handle_args},
    {CKM_CONCATENATE_DATA_AND_BASE, KeyOutputs::handle_args},
    {CKM_XOR_BASE_AND_DATA, KeyOutputs::handle_args},
    {CKM_EXTRACT_KEY_FROM_KEY, KeyOutputs::handle_args},
    {CKM_SSL3_MASTER_KEY_DERIVE, KeyOutputs::handle_args},
    {CKM_SSL3_MASTER_KEY_DERIVE_DH, KeyOutputs::handle_args},
    {CKM_TLS_MASTER_KEY_DERIVE, KeyOutputs::handle_args},
    {CKM_TLS_MASTER_KEY_DERIVE_DH, KeyOutputs::handle_args},
    {CKM_TLS12_MASTER_KEY_DERIVE, KeyOutputs::handle_args},
    {CKM_TLS12_MASTER_KEY_DERIVE_DH, KeyOutputs::handle_args},
    {CKM_TLS_PRF, KeyOutputs::handle_args},
    {CKM_TLS_KDF, KeyOutputs::handle_args},
    {CKM_TLS12_KDF, KeyOutputs::handle_args},
    {CKM_WTLS_MASTER_KEY_DERIVE, KeyOutputs::handle_args},
    {CKM_WTLS_MASTER_KEY_DERIVE_DH_ECC, KeyOutputs::handle_args},
    {CKM_WTLS_PRF, KeyOutputs::handle_args},
    {CKM_MD2_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_MD5_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_SHA1_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_SHA224_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_SHA256_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_SHA384_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_SHA512_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_SHA512_224_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_SHA512_256_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_SHA512_T_KEY_DERIVATION, KeyOutputs::handle_args},
    {CKM_DES_ECB_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_DES_CBC_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_DES3_ECB_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_DES3_CBC_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_AES_ECB_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_AES_CBC_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_CAMELLIA_ECB_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_CAMELLIA_CBC_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_ARIA_ECB_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_ARIA_CBC_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_SEED_ECB_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_SEED_CBC_ENCRYPT_DATA, KeyOutputs::handle_args},
    {CKM_KIP_DERIVE, KeyOutputs::handle_args},
    {kCkmHkdfDerive, KeyOutputs::handle_args},
    {kCkmHkdfData, KeyOutputs::handle_args},
};

// Where the keys of a C_DeriveKey with `mechanism` come back; nullopt when
// p11mux does not know the mechanism.
constexpr std::optional<KeyOutputs> derive_outputs(CK_MECHANISM_TYPE mechanism) noexcept {
  for (const DeriveMechanism& m : kDeriveMechanisms) {
    if (m.type == mechanism) return m.outputs;
  }
  return std::nullopt;
}

// The same for C_UnwrapKey, C_GenerateKey and C_GenerateKeyPair.
constexpr std::optional<KeyOutputs> make_key_outputs(CK_MECHANISM_TYPE mechanism) noexcept {
  if (mechanism >= CKM_VENDOR_DEFINED) return std::nullopt;
  return KeyOutputs::handle_args;
}

// Up to this many handles of one call are followed (an SP 800-108 KDF may
// return any number); a call that returns more is "not provably clean".
inline constexpr std::size_t kMaxReturnedKeys = 8;

struct ReturnedKeys {
  CK_OBJECT_HANDLE handles[kMaxReturnedKeys];
  std::size_t count = 0;
  bool complete = true;  // false: more than kMaxReturnedKeys, or a parameter p11mux cannot read

  void add(CK_OBJECT_HANDLE h) noexcept {
    if (h == CK_INVALID_HANDLE) return;
    if (count == kMaxReturnedKeys) {
      complete = false;
      return;
    }
    handles[count++] = h;
  }
};

// The mechanism's parameter as Params; NULL when missing or too short.
template <class Params>
const Params* params_of(const CK_MECHANISM& m) noexcept {
  if (m.pParameter == nullptr || m.ulParameterLen < sizeof(Params)) return nullptr;
  return static_cast<const Params*>(m.pParameter);
}

// Adds the handles a successful call returned inside its mechanism parameter.
// False when the parameter is missing or too short to hold them.
inline bool add_parameter_keys(KeyOutputs outputs, const CK_MECHANISM& m,
                               ReturnedKeys& out) noexcept {
  auto key_mat = [&](const auto* p) {
    if (p == nullptr || p->pReturnedKeyMaterial == nullptr) return false;
    // Key sizes of 0: no such keys made, and the fields hold whatever the
    // application left there.
    if (p->ulMacSizeInBits != 0) {
      out.add(p->pReturnedKeyMaterial->hClientMacSecret);
      out.add(p->pReturnedKeyMaterial->hServerMacSecret);
    }
    if (p->ulKeySizeInBits != 0) {
      out.add(p->pReturnedKeyMaterial->hClientKey);
      out.add(p->pReturnedKeyMaterial->hServerKey);
    }
    return true;
  };
  auto derived = [&](const auto* p) {
    if (p == nullptr) return false;
    if (p->ulAdditionalDerivedKeys == 0) return true;
    if (p->pAdditionalDerivedKeys == nullptr) return false;
    if (p->ulAdditionalDerivedKeys > kMaxReturnedKeys) {
      out.complete = false;
      return true;
    }
    for (CK_ULONG i = 0; i < p->ulAdditionalDerivedKeys; ++i) {
      if (p->pAdditionalDerivedKeys[i].phKey != nullptr)
        out.add(*p->pAdditionalDerivedKeys[i].phKey);
    }
    return true;
  };
  switch (outputs) {
    case KeyOutputs::handle_args:
      return true;
    case KeyOutputs::ssl3_key_mat:
      return key_mat(params_of<CK_SSL3_KEY_MAT_PARAMS>(m));
    case KeyOutputs::tls12_key_mat:
      return key_mat(params_of<CK_TLS12_KEY_MAT_PARAMS>(m));
    case KeyOutputs::wtls_key_mat: {
      const auto* p = params_of<CK_WTLS_KEY_MAT_PARAMS>(m);
      if (p == nullptr || p->pReturnedKeyMaterial == nullptr) return false;
      if (p->ulMacSizeInBits != 0) out.add(p->pReturnedKeyMaterial->hMacSecret);
      if (p->ulKeySizeInBits != 0) out.add(p->pReturnedKeyMaterial->hKey);
      return true;
    }
    case KeyOutputs::sp800_108:
      return derived(params_of<CK_SP800_108_KDF_PARAMS>(m));
    case KeyOutputs::sp800_108_feedback:
      return derived(params_of<CK_SP800_108_FEEDBACK_KDF_PARAMS>(m));
  }
  return false;
}

// Adds the handles the function's own CK_OBJECT_HANDLE_PTR arguments hold
// after a successful call (`args`). The key-and-MAC derivations return every
// key in their parameter and nothing writes their phKey (docs/pkcs11-facts.md):
// what it holds is the application's, maybe a handle of some other object that
// must be left alone. A value there that is not one of the parameter's keys
// cannot be told from a key a backend returned there after all: false, not
// provably clean.
inline bool add_argument_keys(KeyOutputs outputs, const ReturnedKeys& args,
                              ReturnedKeys& out) noexcept {
  const bool in_parameter_only = outputs == KeyOutputs::ssl3_key_mat ||
                                 outputs == KeyOutputs::tls12_key_mat ||
                                 outputs == KeyOutputs::wtls_key_mat;
  bool known = true;
  for (std::size_t i = 0; i < args.count; ++i) {
    if (!in_parameter_only) {
      out.add(args.handles[i]);
    } else if (std::find(out.handles, out.handles + out.count, args.handles[i]) ==
               out.handles + out.count) {
      known = false;
    }
  }
  return known;
}

}  // namespace p11mux
