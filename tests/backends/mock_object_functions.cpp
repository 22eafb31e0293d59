// C entry points: object management, search, key generation.
#include <cstring>

#include "mock_state.h"

using namespace p11mux::mock;

namespace {

template <class T>
Attribute scalar(CK_ATTRIBUTE_TYPE type, T value) {
  Bytes bytes(sizeof value);
  std::memcpy(bytes.data(), &value, sizeof value);
  return {type, std::move(bytes)};
}
Attribute flag(CK_ATTRIBUTE_TYPE type, bool value) {
  return scalar<CK_BBOOL>(type, value ? CK_TRUE : CK_FALSE);
}

// Defaults of a new object, before the caller's template is applied. Every
// object is a public session object unless the template says otherwise.
Object new_object(CK_OBJECT_CLASS cls, CK_KEY_TYPE key_type) {
  Object obj;
  obj.set({scalar(CKA_CLASS, cls), flag(CKA_TOKEN, false), flag(CKA_PRIVATE, false)});
  if (cls == CKO_SECRET_KEY || cls == CKO_PUBLIC_KEY || cls == CKO_PRIVATE_KEY)
    obj.set(scalar(CKA_KEY_TYPE, key_type));
  return obj;
}

// May session s create obj? Also binds it to the token and, for a session
// object, to the session (it dies with it).
CK_RV admit(const Session& s, Object& obj) {
  bool token_object = obj.is_true(CKA_TOKEN);
  if (token_object && !s.rw()) return CKR_SESSION_READ_ONLY;
  if (obj.is_true(CKA_PRIVATE) && !s.token->user_logged_in()) return CKR_USER_NOT_LOGGED_IN;
  obj.slot = s.token->id;
  obj.owner = token_object ? 0 : s.handle;
  return CKR_OK;
}

bool is_sensitive(const Object& obj, CK_ATTRIBUTE_TYPE type) {
  return type == CKA_VALUE && obj.is_true(CKA_SENSITIVE);
}

}  // namespace

MOCK_EXPORT CK_RV C_CreateObject(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate,
                                 CK_ULONG ulCount, CK_OBJECT_HANDLE_PTR phObject) {
  return session_call(Fn::C_CreateObject, hSession, [&](Session& s) -> CK_RV {
    Attributes templ;
    if (CK_RV rv = read_template(pTemplate, ulCount, templ); rv != CKR_OK) return rv;
    if (phObject == nullptr) return CKR_ARGUMENTS_BAD;
    Object obj;
    obj.set({flag(CKA_TOKEN, false), flag(CKA_PRIVATE, false)});
    obj.set(templ);
    if (obj.find(CKA_CLASS) == nullptr) return CKR_TEMPLATE_INCOMPLETE;
    if (CK_RV rv = admit(s, obj); rv != CKR_OK) return rv;
    *phObject = module().objects.add(std::move(obj));
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_CopyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                               CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,
                               CK_OBJECT_HANDLE_PTR phNewObject) {
  return session_call(Fn::C_CopyObject, hSession, [&](Session& s) -> CK_RV {
    Attributes templ;
    if (CK_RV rv = read_template(pTemplate, ulCount, templ); rv != CKR_OK) return rv;
    if (phNewObject == nullptr) return CKR_ARGUMENTS_BAD;
    std::optional<Object> copy = module().objects.get(hObject, s.viewer());
    if (!copy) return CKR_OBJECT_HANDLE_INVALID;
    copy->set(templ);  // key_id is kept: a copy of a key is the same key
    if (CK_RV rv = admit(s, *copy); rv != CKR_OK) return rv;
    *phNewObject = module().objects.add(std::move(*copy));
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_DestroyObject(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject) {
  return session_call(Fn::C_DestroyObject, hSession, [&](Session& s) -> CK_RV {
    ObjectStore& store = module().objects;
    std::optional<Object> obj = store.get(hObject, s.viewer());
    if (!obj) return CKR_OBJECT_HANDLE_INVALID;
    if (obj->owner == 0 && !s.rw()) return CKR_SESSION_READ_ONLY;
    return store.erase(hObject, s.viewer()) ? CKR_OK : CKR_OBJECT_HANDLE_INVALID;
  });
}

MOCK_EXPORT CK_RV C_GetObjectSize(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                                  CK_ULONG_PTR pulSize) {
  return session_call(Fn::C_GetObjectSize, hSession, [&](Session& s) -> CK_RV {
    if (pulSize == nullptr) return CKR_ARGUMENTS_BAD;
    std::optional<Object> obj = module().objects.get(hObject, s.viewer());
    if (!obj) return CKR_OBJECT_HANDLE_INVALID;
    CK_ULONG size = 0;
    for (const auto& a : obj->attrs) size += a.value.size();
    *pulSize = size;
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_GetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                                      CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) {
  return session_call(Fn::C_GetAttributeValue, hSession, [&](Session& s) -> CK_RV {
    if (pTemplate == nullptr && ulCount != 0) return CKR_ARGUMENTS_BAD;
    std::optional<Object> obj = module().objects.get(hObject, s.viewer());
    if (!obj) return CKR_OBJECT_HANDLE_INVALID;
    CK_RV rv = CKR_OK;
    for (CK_ULONG i = 0; i < ulCount; ++i) {
      CK_ATTRIBUTE& a = pTemplate[i];
      const Bytes* value = obj->find(a.type);
      if (value == nullptr || is_sensitive(*obj, a.type)) {
        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        rv = value == nullptr ? CKR_ATTRIBUTE_TYPE_INVALID : CKR_ATTRIBUTE_SENSITIVE;
      } else if (a.pValue == nullptr) {
        a.ulValueLen = value->size();
      } else if (a.ulValueLen < value->size()) {
        if (module().settings.bends(MOCK_BEND_FILL_LEN)) {
          a.ulValueLen = value->size();  // what NSS softoken and others do
          bump(module().counters.bend_lengths_filled);
        } else {
          a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        }
        rv = CKR_BUFFER_TOO_SMALL;
      } else {
        if (!value->empty()) std::memcpy(a.pValue, value->data(), value->size());
        a.ulValueLen = value->size();
      }
    }
    return rv;
  });
}

MOCK_EXPORT CK_RV C_SetAttributeValue(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE hObject,
                                      CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount) {
  return session_call(Fn::C_SetAttributeValue, hSession, [&](Session& s) -> CK_RV {
    Attributes templ;
    if (CK_RV rv = read_template(pTemplate, ulCount, templ); rv != CKR_OK) return rv;
    for (const auto& a : templ)
      if (a.type == CKA_CLASS || a.type == CKA_TOKEN) return CKR_ATTRIBUTE_READ_ONLY;
    return module().objects.update(hObject, s.viewer(), [&](Object& obj) -> CK_RV {
      if (obj.owner == 0 && !s.rw()) return CKR_SESSION_READ_ONLY;
      obj.set(templ);
      return CKR_OK;
    });
  });
}

// ---- search ----

MOCK_EXPORT CK_RV C_FindObjectsInit(CK_SESSION_HANDLE hSession, CK_ATTRIBUTE_PTR pTemplate,
                                    CK_ULONG ulCount) {
  return session_call(Fn::C_FindObjectsInit, hSession, [&](Session& s) -> CK_RV {
    if (s.op(Op::Find).active) return CKR_OPERATION_ACTIVE;
    Attributes templ;
    if (CK_RV rv = read_template(pTemplate, ulCount, templ); rv != CKR_OK) return rv;
    s.found = module().objects.find(s.viewer(), templ);
    s.found_pos = 0;
    s.op(Op::Find).active = true;
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_FindObjects(CK_SESSION_HANDLE hSession, CK_OBJECT_HANDLE_PTR phObject,
                                CK_ULONG ulMaxObjectCount, CK_ULONG_PTR pulObjectCount) {
  return session_call(Fn::C_FindObjects, hSession, [&](Session& s) -> CK_RV {
    if (!s.op(Op::Find).active) return CKR_OPERATION_NOT_INITIALIZED;
    if (phObject == nullptr || pulObjectCount == nullptr) return CKR_ARGUMENTS_BAD;
    CK_ULONG n = 0;
    while (n < ulMaxObjectCount && s.found_pos < s.found.size())
      phObject[n++] = s.found[s.found_pos++];
    *pulObjectCount = n;
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_FindObjectsFinal(CK_SESSION_HANDLE hSession) {
  return session_call(Fn::C_FindObjectsFinal, hSession, [&](Session& s) -> CK_RV {
    if (!s.op(Op::Find).active) return CKR_OPERATION_NOT_INITIALIZED;
    s.end(Op::Find);
    return CKR_OK;
  });
}

// ---- key generation ----

MOCK_EXPORT CK_RV C_GenerateKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                CK_ATTRIBUTE_PTR pTemplate, CK_ULONG ulCount,
                                CK_OBJECT_HANDLE_PTR phKey) {
  return session_call(Fn::C_GenerateKey, hSession, [&](Session& s) -> CK_RV {
    Attributes templ;
    if (CK_RV rv = read_template(pTemplate, ulCount, templ); rv != CKR_OK) return rv;
    if (pMechanism == nullptr || phKey == nullptr) return CKR_ARGUMENTS_BAD;
    Object key = new_object(CKO_SECRET_KEY, CKK_GENERIC_SECRET);
    Bytes value(32);
    fill_random(value.data(), value.size());
    key.set({CKA_VALUE, value});
    key.set(templ);
    if (CK_RV rv = admit(s, key); rv != CKR_OK) return rv;
    *phKey = module().objects.add(std::move(key));
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_GenerateKeyPair(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                                    CK_ATTRIBUTE_PTR pPublicKeyTemplate,
                                    CK_ULONG ulPublicKeyAttributeCount,
                                    CK_ATTRIBUTE_PTR pPrivateKeyTemplate,
                                    CK_ULONG ulPrivateKeyAttributeCount,
                                    CK_OBJECT_HANDLE_PTR phPublicKey,
                                    CK_OBJECT_HANDLE_PTR phPrivateKey) {
  return session_call(Fn::C_GenerateKeyPair, hSession, [&](Session& s) -> CK_RV {
    Attributes pub_templ, priv_templ;
    if (CK_RV rv = read_template(pPublicKeyTemplate, ulPublicKeyAttributeCount, pub_templ);
        rv != CKR_OK)
      return rv;
    if (CK_RV rv = read_template(pPrivateKeyTemplate, ulPrivateKeyAttributeCount, priv_templ);
        rv != CKR_OK)
      return rv;
    if (pMechanism == nullptr || phPublicKey == nullptr || phPrivateKey == nullptr)
      return CKR_ARGUMENTS_BAD;
    Object pub = new_object(CKO_PUBLIC_KEY, CKK_EC);
    Object priv = new_object(CKO_PRIVATE_KEY, CKK_EC);
    pub.set(pub_templ);
    priv.set(priv_templ);
    if (CK_RV rv = admit(s, pub); rv != CKR_OK) return rv;
    if (CK_RV rv = admit(s, priv); rv != CKR_OK) return rv;
    ObjectStore& store = module().objects;
    *phPrivateKey = store.add(std::move(priv));
    pub.key_id = *phPrivateKey;  // both halves are one key for the fake crypto
    *phPublicKey = store.add(std::move(pub));
    return CKR_OK;
  });
}

// ---- wrapping and derivation (fake crypto, see mock_control.h) ----

MOCK_EXPORT CK_RV C_WrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                            CK_OBJECT_HANDLE hWrappingKey, CK_OBJECT_HANDLE hKey,
                            CK_BYTE_PTR pWrappedKey, CK_ULONG_PTR pulWrappedKeyLen) {
  return session_call(Fn::C_WrapKey, hSession, [&](Session& s) -> CK_RV {
    if (pMechanism == nullptr || pulWrappedKeyLen == nullptr) return CKR_ARGUMENTS_BAD;
    ObjectStore& store = module().objects;
    std::optional<Object> wrapping = store.get(hWrappingKey, s.viewer());
    if (!wrapping) return CKR_WRAPPING_KEY_HANDLE_INVALID;
    std::optional<Object> key = store.get(hKey, s.viewer());
    if (!key) return CKR_KEY_HANDLE_INVALID;
    const Bytes* value = key->find(CKA_VALUE);
    if (value == nullptr) return CKR_KEY_NOT_WRAPPABLE;
    if (pWrappedKey == nullptr) {
      *pulWrappedKeyLen = value->size();
      return CKR_OK;
    }
    bool fits = *pulWrappedKeyLen >= value->size();
    *pulWrappedKeyLen = value->size();
    if (!fits) return CKR_BUFFER_TOO_SMALL;
    unsigned char k = xor_byte(wrapping->key_id);
    for (std::size_t i = 0; i < value->size(); ++i) pWrappedKey[i] = (*value)[i] ^ k;
    return CKR_OK;
  });
}

MOCK_EXPORT CK_RV C_UnwrapKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                              CK_OBJECT_HANDLE hUnwrappingKey, CK_BYTE_PTR pWrappedKey,
                              CK_ULONG ulWrappedKeyLen, CK_ATTRIBUTE_PTR pTemplate,
                              CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey) {
  return session_call(Fn::C_UnwrapKey, hSession, [&](Session& s) -> CK_RV {
    Attributes templ;
    if (CK_RV rv = read_template(pTemplate, ulAttributeCount, templ); rv != CKR_OK) return rv;
    if (pMechanism == nullptr || phKey == nullptr || pWrappedKey == nullptr)
      return CKR_ARGUMENTS_BAD;
    std::optional<Object> unwrapping = module().objects.get(hUnwrappingKey, s.viewer());
    if (!unwrapping) return CKR_UNWRAPPING_KEY_HANDLE_INVALID;
    Bytes value(pWrappedKey, pWrappedKey + ulWrappedKeyLen);
    unsigned char k = xor_byte(unwrapping->key_id);
    for (auto& b : value) b ^= k;
    Object key = new_object(CKO_SECRET_KEY, CKK_GENERIC_SECRET);
    key.set({CKA_VALUE, std::move(value)});
    key.set(templ);
    if (CK_RV rv = admit(s, key); rv != CKR_OK) return rv;
    *phKey = module().objects.add(std::move(key));
    return CKR_OK;
  });
}

namespace {

bool key_and_mac_derive(CK_MECHANISM_TYPE type) {
  return type == CKM_SSL3_KEY_AND_MAC_DERIVE || type == CKM_TLS_KEY_AND_MAC_DERIVE ||
         type == CKM_TLS12_KEY_AND_MAC_DERIVE;
}

// Key material of `bits` bits drawn from the base key's value and a label.
Bytes derived_value(const Bytes& base, const unsigned char* extra, std::size_t extra_len,
                    unsigned char label, CK_ULONG bits) {
  Bytes input{label};
  input.insert(input.end(), base.begin(), base.end());
  if (extra != nullptr) input.insert(input.end(), extra, extra + extra_len);
  Bytes out;
  while (out.size() < (bits + 7) / 8) {
    Digest d = reference_digest(input.data(), input.size());
    out.insert(out.end(), d.begin(), d.end());
    input.push_back(static_cast<unsigned char>(out.size()));
  }
  out.resize((bits + 7) / 8);
  return out;
}

// The SSL3/TLS key-and-MAC derivations: up to four session keys, returned in
// the parameter's CK_SSL3_KEY_MAT_OUT, like NSS softoken.
CK_RV derive_key_material(Session& s, const CK_MECHANISM& mech, const Bytes& base,
                          const Attributes& templ) {
  std::size_t size = mech.mechanism == CKM_TLS12_KEY_AND_MAC_DERIVE
                         ? sizeof(CK_TLS12_KEY_MAT_PARAMS)
                         : sizeof(CK_SSL3_KEY_MAT_PARAMS);
  if (mech.pParameter == nullptr || mech.ulParameterLen != size) return CKR_MECHANISM_PARAM_INVALID;
  // CK_TLS12_KEY_MAT_PARAMS begins with CK_SSL3_KEY_MAT_PARAMS's fields.
  const auto& params = *static_cast<const CK_SSL3_KEY_MAT_PARAMS*>(mech.pParameter);
  CK_SSL3_KEY_MAT_OUT* out = params.pReturnedKeyMaterial;
  if (out == nullptr || params.ulMacSizeInBits % 8 != 0 || params.ulKeySizeInBits % 8 != 0 ||
      params.ulIVSizeInBits % 8 != 0)
    return CKR_MECHANISM_PARAM_INVALID;
  const CK_SSL3_RANDOM_DATA& random = params.RandomInfo;
  Bytes randoms;
  if (random.pClientRandom != nullptr)
    randoms.insert(randoms.end(), random.pClientRandom,
                   random.pClientRandom + random.ulClientRandomLen);
  if (random.pServerRandom != nullptr)
    randoms.insert(randoms.end(), random.pServerRandom,
                   random.pServerRandom + random.ulServerRandomLen);

  CK_ULONG bits[4] = {params.ulMacSizeInBits, params.ulMacSizeInBits, params.ulKeySizeInBits,
                      params.ulKeySizeInBits};
  std::vector<std::optional<Object>> keys(4);
  for (unsigned char i = 0; i < 4; ++i) {
    if (bits[i] == 0) continue;
    Object key = new_object(CKO_SECRET_KEY, CKK_GENERIC_SECRET);
    key.set({CKA_VALUE, derived_value(base, randoms.data(), randoms.size(), i, bits[i])});
    key.set(templ);
    key.set(flag(CKA_TOKEN, false));  // always session keys
    if (CK_RV rv = admit(s, key); rv != CKR_OK) return rv;
    keys[i] = std::move(key);
  }
  CK_OBJECT_HANDLE handles[4] = {CK_INVALID_HANDLE, CK_INVALID_HANDLE, CK_INVALID_HANDLE,
                                 CK_INVALID_HANDLE};
  Module& m = module();
  for (int i = 0; i < 4; ++i)
    if (keys[i]) {
      handles[i] = m.objects.add(std::move(*keys[i]));
      bump(m.counters.bend_key_mat_keys);
    }
  out->hClientMacSecret = handles[0];
  out->hServerMacSecret = handles[1];
  out->hClientKey = handles[2];
  out->hServerKey = handles[3];
  CK_ULONG iv_len = params.ulIVSizeInBits / 8;
  if (iv_len != 0 && out->pIVClient != nullptr) fill_random(out->pIVClient, iv_len);
  if (iv_len != 0 && out->pIVServer != nullptr) fill_random(out->pIVServer, iv_len);
  return CKR_OK;
}

}  // namespace

MOCK_EXPORT CK_RV C_DeriveKey(CK_SESSION_HANDLE hSession, CK_MECHANISM_PTR pMechanism,
                              CK_OBJECT_HANDLE hBaseKey, CK_ATTRIBUTE_PTR pTemplate,
                              CK_ULONG ulAttributeCount, CK_OBJECT_HANDLE_PTR phKey) {
  return session_call(Fn::C_DeriveKey, hSession, [&](Session& s) -> CK_RV {
    Attributes templ;
    if (CK_RV rv = read_template(pTemplate, ulAttributeCount, templ); rv != CKR_OK) return rv;
    if (pMechanism == nullptr) return CKR_ARGUMENTS_BAD;
    std::optional<Object> base = module().objects.get(hBaseKey, s.viewer());
    if (!base) return CKR_KEY_HANDLE_INVALID;
    const Bytes* value = base->find(CKA_VALUE);
    Bytes base_value = value != nullptr ? *value : Bytes{};
    if (key_and_mac_derive(pMechanism->mechanism)) {
      if (!module().settings.bends(MOCK_BEND_KEY_MAT)) return CKR_MECHANISM_INVALID;
      return derive_key_material(s, *pMechanism, base_value, templ);
    }
    if (phKey == nullptr) return CKR_ARGUMENTS_BAD;
    if (pMechanism->pParameter == nullptr && pMechanism->ulParameterLen != 0)
      return CKR_MECHANISM_PARAM_INVALID;
    Object key = new_object(CKO_SECRET_KEY, CKK_GENERIC_SECRET);
    key.set({CKA_VALUE,
             derived_value(base_value, static_cast<const unsigned char*>(pMechanism->pParameter),
                           pMechanism->ulParameterLen, 0, 8 * MOCK_DIGEST_LEN)});
    key.set(templ);
    if (CK_RV rv = admit(s, key); rv != CKR_OK) return rv;
    *phKey = module().objects.add(std::move(key));
    return CKR_OK;
  });
}
