#include "observe/trace_format.hpp"

#include <p11mux/attribute_names.hpp>
#include <p11mux/mechanism_names.hpp>

#include <algorithm>
#include <iterator>

namespace p11mux {
namespace {

constexpr std::size_t kMaxBytesShown = 32;  // of a public byte string (CKA_ID, CKA_MODULUS...)
constexpr std::size_t kMaxTextShown = 64;   // of a string attribute
constexpr std::size_t kMaxListShown = 16;   // of CKA_ALLOWED_MECHANISMS, found handles
constexpr int kMaxTemplateDepth = 2;        // CKA_WRAP_TEMPLATE inside a template...

void format_template_at(TraceBuffer& out, const CK_ATTRIBUTE* attributes, CK_ULONG count,
                        bool values, int depth, const CK_ULONG* capacities = nullptr,
                        bool filled = true);

template <class... Args>
void put(TraceBuffer& out, fmt::format_string<Args...> format, Args&&... args) {
  fmt::format_to(std::back_inserter(out), format, std::forward<Args>(args)...);
}

// How an attribute's value is shown. Everything not listed is a byte string.
enum class Kind {
  bytes,
  secret,
  boolean,
  number,
  object_class,
  key_type,
  mechanism,
  text,
  date,
  mechanisms,
  attributes
};

Kind kind_of(CK_ATTRIBUTE_TYPE type) noexcept {
  if (attribute_is_secret(type)) return Kind::secret;
  // clang-format off
  switch (type) {
    case CKA_TOKEN: case CKA_PRIVATE: case CKA_TRUSTED: case CKA_SENSITIVE: case CKA_ENCRYPT:
    case CKA_DECRYPT: case CKA_WRAP: case CKA_UNWRAP: case CKA_SIGN: case CKA_SIGN_RECOVER:
    case CKA_VERIFY: case CKA_VERIFY_RECOVER: case CKA_DERIVE: case CKA_EXTRACTABLE: case CKA_LOCAL:
    case CKA_NEVER_EXTRACTABLE: case CKA_ALWAYS_SENSITIVE: case CKA_MODIFIABLE: case CKA_COPYABLE:
    case CKA_DESTROYABLE: case CKA_ALWAYS_AUTHENTICATE: case CKA_WRAP_WITH_TRUSTED:
    case CKA_SECONDARY_AUTH: case CKA_RESET_ON_INIT: case CKA_HAS_RESET: case CKA_COLOR:
    case CKA_OTP_USER_FRIENDLY_MODE:
      return Kind::boolean;
    case CKA_CERTIFICATE_TYPE: case CKA_CERTIFICATE_CATEGORY: case CKA_JAVA_MIDP_SECURITY_DOMAIN:
    case CKA_MODULUS_BITS: case CKA_PRIME_BITS: case CKA_SUB_PRIME_BITS: case CKA_VALUE_BITS:
    case CKA_VALUE_LEN: case CKA_HW_FEATURE_TYPE: case CKA_AUTH_PIN_FLAGS: case CKA_OTP_FORMAT:
    case CKA_OTP_LENGTH: case CKA_OTP_TIME_INTERVAL: case CKA_OTP_CHALLENGE_REQUIREMENT:
    case CKA_OTP_TIME_REQUIREMENT: case CKA_OTP_COUNTER_REQUIREMENT: case CKA_OTP_PIN_REQUIREMENT:
    case CKA_PIXEL_X: case CKA_PIXEL_Y: case CKA_RESOLUTION: case CKA_CHAR_ROWS:
    case CKA_CHAR_COLUMNS: case CKA_BITS_PER_PIXEL:
      return Kind::number;
    case CKA_CLASS: return Kind::object_class;
    case CKA_KEY_TYPE: return Kind::key_type;
    case CKA_KEY_GEN_MECHANISM: case CKA_MECHANISM_TYPE: case CKA_NAME_HASH_ALGORITHM:
      return Kind::mechanism;
    case CKA_LABEL: case CKA_APPLICATION: case CKA_URL: case CKA_CHAR_SETS: case CKA_ENCODING_METHODS:
    case CKA_MIME_TYPES: case CKA_OTP_TIME: case CKA_OTP_USER_IDENTIFIER:
    case CKA_OTP_SERVICE_IDENTIFIER: case CKA_OTP_SERVICE_LOGO_TYPE:
      return Kind::text;
    case CKA_START_DATE: case CKA_END_DATE: return Kind::date;
    case CKA_ALLOWED_MECHANISMS: return Kind::mechanisms;
    case CKA_WRAP_TEMPLATE: case CKA_UNWRAP_TEMPLATE: case CKA_DERIVE_TEMPLATE:
      return Kind::attributes;
    default: return Kind::bytes;
  }
  // clang-format on
}

void format_name(TraceBuffer& out, std::string_view name, std::string_view prefix, CK_ULONG value) {
  if (!name.empty()) {
    append(out, name);
  } else if (value >= CKM_VENDOR_DEFINED) {  // the same bit for every kind of value
    put(out, "{}VENDOR_DEFINED+{:#x}", prefix, value - CKM_VENDOR_DEFINED);
  } else {
    put(out, "{}{:#x}", prefix, value);
  }
}

void format_mechanism_type(TraceBuffer& out, CK_MECHANISM_TYPE type) {
  format_name(out, mechanism_name(type), "CKM_", type);
}

void format_text(TraceBuffer& out, const unsigned char* text, std::size_t length) {
  out.push_back('"');
  for (std::size_t i = 0; i < std::min(length, kMaxTextShown); ++i) {
    unsigned char c = text[i];
    if (c == '"' || c == '\\') {
      put(out, "\\{}", static_cast<char>(c));
    } else if (c >= 0x20 && c < 0x7f) {
      out.push_back(static_cast<char>(c));
    } else {
      put(out, "\\x{:02x}", c);
    }
  }
  out.push_back('"');
  if (length > kMaxTextShown) put(out, "... ({} bytes)", length);
}

void format_bytes(TraceBuffer& out, const unsigned char* bytes, std::size_t length) {
  for (std::size_t i = 0; i < std::min(length, kMaxBytesShown); ++i) put(out, "{:02x}", bytes[i]);
  if (length > kMaxBytesShown) append(out, "...");
  put(out, " ({} bytes)", length);
}

// The text of a blank-padded PKCS#11 string field, without the padding.
template <std::size_t N>
void format_padded(TraceBuffer& out, const CK_UTF8CHAR (&field)[N]) {
  std::size_t length = N;
  while (length > 0 && (field[length - 1] == ' ' || field[length - 1] == '\0')) --length;
  format_text(out, field, length);
}

// `nested_values`: whether a nested template's values may be read (not in an
// output, whose nested buffers' sizes are unknown).
void format_attribute_value(TraceBuffer& out, const CK_ATTRIBUTE& a, int depth,
                            bool nested_values) {
  const auto* bytes = static_cast<const unsigned char*>(a.pValue);
  const CK_ULONG length = a.ulValueLen;
  auto as_ulong = [&] {
    CK_ULONG v = 0;
    std::copy_n(bytes, sizeof v, reinterpret_cast<unsigned char*>(&v));  // may be unaligned
    return v;
  };
  const Kind kind = kind_of(a.type);
  if (kind == Kind::secret) {
    put(out, "*** ({} bytes)", length);
    return;
  }
  const bool one_ulong = length == sizeof(CK_ULONG);
  switch (kind) {
    case Kind::boolean:
      if (length == 1) {
        append(out, bytes[0] != 0 ? "true" : "false");
        return;
      }
      break;
    case Kind::number:
      if (one_ulong) return format_number(out, as_ulong());
      break;
    case Kind::object_class:
      if (one_ulong) return format_name(out, object_class_name(as_ulong()), "CKO_", as_ulong());
      break;
    case Kind::key_type:
      if (one_ulong) return format_name(out, key_type_name(as_ulong()), "CKK_", as_ulong());
      break;
    case Kind::mechanism:
      if (one_ulong) return format_mechanism_type(out, as_ulong());
      break;
    case Kind::text:
    case Kind::date:
      return format_text(out, bytes, length);
    case Kind::mechanisms:
      if (length % sizeof(CK_MECHANISM_TYPE) == 0) {
        std::size_t n = length / sizeof(CK_MECHANISM_TYPE);
        out.push_back('[');
        for (std::size_t i = 0; i < std::min(n, kMaxListShown); ++i) {
          if (i > 0) append(out, ", ");
          CK_MECHANISM_TYPE m = 0;
          std::copy_n(bytes + i * sizeof m, sizeof m, reinterpret_cast<unsigned char*>(&m));
          format_mechanism_type(out, m);
        }
        if (n > kMaxListShown) put(out, ", ... {} in all", n);
        out.push_back(']');
        return;
      }
      break;
    case Kind::attributes:
      if (length % sizeof(CK_ATTRIBUTE) == 0 && depth < kMaxTemplateDepth &&
          reinterpret_cast<std::uintptr_t>(bytes) % alignof(CK_ATTRIBUTE) == 0) {
        return format_template_at(out, static_cast<const CK_ATTRIBUTE*>(a.pValue),
                                  length / sizeof(CK_ATTRIBUTE), nested_values, depth + 1);
      }
      put(out, "({} bytes)", length);
      return;
    default:
      break;
  }
  format_bytes(out, bytes, length);
}

void format_template_at(TraceBuffer& out, const CK_ATTRIBUTE* attributes, CK_ULONG count,
                        bool values, int depth, const CK_ULONG* capacities, bool filled) {
  out.push_back('{');
  const CK_ULONG shown = std::min<CK_ULONG>(count, kMaxAttributesShown);
  for (CK_ULONG i = 0; attributes != nullptr && i < shown; ++i) {
    const CK_ATTRIBUTE& a = attributes[i];
    if (i > 0) append(out, ", ");
    format_name(out, attribute_name(a.type), "CKA_", a.type);
    if (capacities != nullptr) {
      // An output: the value is read only where the call defined it, and
      // never beyond the buffer the caller gave.
      const CK_ULONG capacity = capacities[i];
      if (!filled) {
        if (a.pValue == nullptr) {
          append(out, " (NULL)");
        } else {
          put(out, " [{} bytes]", capacity);
        }
      } else if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
        append(out, "=unavailable");
      } else if (a.pValue == nullptr) {
        put(out, " ({} bytes)", a.ulValueLen);  // the answer to a length query
      } else if (a.ulValueLen > capacity) {
        put(out, " [{} bytes]->{}", capacity, a.ulValueLen);  // not written: the buffer is short
      } else {
        out.push_back('=');
        format_attribute_value(out, a, depth, false);
      }
    } else if (a.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
      append(out, "=unavailable");
    } else if (a.pValue == nullptr) {
      put(out, " ({} bytes)", a.ulValueLen);  // a length query, or its answer
    } else if (!values) {
      put(out, " [{} bytes]", a.ulValueLen);
    } else {
      out.push_back('=');
      format_attribute_value(out, a, depth, true);
    }
  }
  if (attributes != nullptr && count > shown) put(out, ", ... {} in all", count);
  out.push_back('}');
}

}  // namespace

bool attribute_is_secret(CK_ATTRIBUTE_TYPE type) noexcept {
  // clang-format off
  switch (type) {
    case CKA_VALUE: case CKA_PRIVATE_EXPONENT: case CKA_PRIME_1: case CKA_PRIME_2:
    case CKA_EXPONENT_1: case CKA_EXPONENT_2: case CKA_COEFFICIENT:
      return true;
    default:
      return attribute_name(type).empty();
  }
  // clang-format on
}

void format_number(TraceBuffer& out, CK_ULONG value) {
  if (value < 0x10000) {
    put(out, "{}", value);
  } else {
    put(out, "{:#x}", value);
  }
}

void format_session(TraceBuffer& out, CK_SESSION_HANDLE virtual_handle, CK_SESSION_HANDLE backend) {
  put(out, "{:#x}", virtual_handle);
  if (backend != CK_INVALID_HANDLE) put(out, "->{:#x}", backend);
}

void format_template(TraceBuffer& out, const CK_ATTRIBUTE* attributes, CK_ULONG count,
                     bool values) {
  format_template_at(out, attributes, count, values, 0);
}

void format_template_count(TraceBuffer& out, const CK_ATTRIBUTE* attributes, CK_ULONG count) {
  if (attributes == nullptr && count == 0) {
    append(out, "{}");
  } else if (attributes == nullptr) {
    put(out, "NULL, {}", count);
  } else {
    put(out, "{{{} attribute{}}}", count, count == 1 ? "" : "s");
  }
}

void format_filled_template(TraceBuffer& out, const CK_ATTRIBUTE* attributes, CK_ULONG count,
                            const CK_ULONG* capacities, bool filled) {
  format_template_at(out, attributes, count, true, 0, capacities, filled);
}

void format_mechanism(TraceBuffer& out, const CK_MECHANISM* mechanism) {
  if (mechanism == nullptr) {
    append(out, "NULL");
    return;
  }
  format_mechanism_type(out, mechanism->mechanism);
  const void* p = mechanism->pParameter;
  const CK_ULONG length = mechanism->ulParameterLen;
  if (p == nullptr || length == 0) return;
  // Only fields that are never secret; a parameter whose length does not
  // match its structure is shown by length alone.
  auto is = [&](auto* type) { return length == sizeof(*type); };
  // clang-format off
  switch (mechanism->mechanism) {
    case CKM_RSA_PKCS_PSS: case CKM_SHA1_RSA_PKCS_PSS: case CKM_SHA224_RSA_PKCS_PSS:
    case CKM_SHA256_RSA_PKCS_PSS: case CKM_SHA384_RSA_PKCS_PSS: case CKM_SHA512_RSA_PKCS_PSS:
      if (is(static_cast<CK_RSA_PKCS_PSS_PARAMS*>(nullptr))) {
        const auto& pss = *static_cast<const CK_RSA_PKCS_PSS_PARAMS*>(p);
        append(out, "{hash ");
        format_mechanism_type(out, pss.hashAlg);
        append(out, ", mgf ");
        format_name(out, mgf_name(pss.mgf), "CKG_", pss.mgf);
        put(out, ", salt {} bytes}}", pss.sLen);
        return;
      }
      break;
    case CKM_RSA_PKCS_OAEP:
      if (is(static_cast<CK_RSA_PKCS_OAEP_PARAMS*>(nullptr))) {
        const auto& oaep = *static_cast<const CK_RSA_PKCS_OAEP_PARAMS*>(p);
        append(out, "{hash ");
        format_mechanism_type(out, oaep.hashAlg);
        append(out, ", mgf ");
        format_name(out, mgf_name(oaep.mgf), "CKG_", oaep.mgf);
        append(out, ", source ");
        format_name(out, oaep_source_name(oaep.source), "CKZ_", oaep.source);
        put(out, ", label {} bytes}}", oaep.ulSourceDataLen);
        return;
      }
      break;
    case CKM_AES_GCM:
      if (is(static_cast<CK_GCM_PARAMS*>(nullptr))) {
        const auto& gcm = *static_cast<const CK_GCM_PARAMS*>(p);
        put(out, "{{iv {} bytes, aad {} bytes, tag {} bits}}", gcm.ulIvLen, gcm.ulAADLen, gcm.ulTagBits);
        return;
      }
      break;
    case CKM_AES_CTR:
      if (is(static_cast<CK_AES_CTR_PARAMS*>(nullptr))) {
        put(out, "{{counter {} bits}}", static_cast<const CK_AES_CTR_PARAMS*>(p)->ulCounterBits);
        return;
      }
      break;
    case CKM_ECDH1_DERIVE: case CKM_ECDH1_COFACTOR_DERIVE:
      if (is(static_cast<CK_ECDH1_DERIVE_PARAMS*>(nullptr))) {
        const auto& ecdh = *static_cast<const CK_ECDH1_DERIVE_PARAMS*>(p);
        append(out, "{kdf ");
        format_name(out, ec_kdf_name(ecdh.kdf), "CKD_", ecdh.kdf);
        put(out, ", shared data {} bytes, public data {} bytes}}", ecdh.ulSharedDataLen,
            ecdh.ulPublicDataLen);
        return;
      }
      break;
    default:
      break;
  }
  // clang-format on
  put(out, "{{parameter {} bytes}}", length);
}

void format_duration(TraceBuffer& out, std::uint64_t ns) {
  put(out, "{:.1f} us", static_cast<double>(ns) / 1000.0);
}

void format_label(TraceBuffer& out, const CK_UTF8CHAR* label) {
  const CK_UTF8CHAR(&field)[32] = *reinterpret_cast<const CK_UTF8CHAR(*)[32]>(label);
  format_padded(out, field);
}

void format_output(TraceBuffer& out, const CK_ULONG& value) {
  append(out, "->");
  format_number(out, value);
}

void format_output(TraceBuffer& out, const CK_INFO& info) {
  put(out, "{{cryptoki {}.{}, ", info.cryptokiVersion.major, info.cryptokiVersion.minor);
  format_padded(out, info.manufacturerID);
  append(out, ", ");
  format_padded(out, info.libraryDescription);
  put(out, ", library {}.{}}}", info.libraryVersion.major, info.libraryVersion.minor);
}

void format_output(TraceBuffer& out, const CK_SLOT_INFO& info) {
  append(out, "{");
  format_padded(out, info.slotDescription);
  put(out, ", flags {:#x}}}", info.flags);
}

void format_output(TraceBuffer& out, const CK_TOKEN_INFO& info) {
  append(out, "{label ");
  format_padded(out, info.label);
  append(out, ", model ");
  format_padded(out, info.model);
  put(out, ", flags {:#x}, sessions {}/{}}}", info.flags, info.ulSessionCount,
      info.ulMaxSessionCount);
}

void format_output(TraceBuffer& out, const CK_SESSION_INFO& info) {
  put(out, "{{slot {}, state {}, flags {:#x}}}", info.slotID, info.state, info.flags);
}

void format_output(TraceBuffer& out, const CK_MECHANISM_INFO& info) {
  put(out, "{{keys {}..{}, flags {:#x}}}", info.ulMinKeySize, info.ulMaxKeySize, info.flags);
}

}  // namespace p11mux
