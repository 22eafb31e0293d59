// The pieces of a trace record that do not depend on the function: numbers,
// handles, mechanisms with a summary of their parameters, attribute templates
// with secrets masked, and the output structures of the C_Get*Info calls.
//
// What is never written, at any level (README, "Observability"):
//   - PINs and their lengths (letter k in <p11mux/functions.h>);
//   - the bytes of any data buffer (input or output: plaintext, ciphertext,
//     signatures, wrapped keys, operation state): only their lengths;
//   - raw mechanism parameters: only lengths and the fields of the structures
//     named in format_mechanism (hash, MGF, salt length, IV length...);
//   - the values of the attributes attribute_is_secret() names.
#pragma once

#include <p11mux/pkcs11.h>

#include <spdlog/fmt/fmt.h>

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace p11mux {

using TraceBuffer = fmt::memory_buffer;

inline void append(TraceBuffer& out, std::string_view text) { out.append(text); }

// Always masked: CKA_VALUE (secret keys, EC/DSA/DH private values; data
// objects and certificates too, for simplicity), CKA_PRIVATE_EXPONENT,
// CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2, CKA_COEFFICIENT,
// and every attribute the CKA_ table does not know (vendor-defined or newer
// than it), since nothing says those are public.
bool attribute_is_secret(CK_ATTRIBUTE_TYPE type) noexcept;

// A CK_ULONG argument of unknown meaning (slot ID, flags, object handle,
// count): decimal below 0x10000, hex above, where handles and flag sets live.
void format_number(TraceBuffer& out, CK_ULONG value);
// "0x1000001", or "0x1000001->0x5002" with the backend session it ran on.
void format_session(TraceBuffer& out, CK_SESSION_HANDLE virtual_handle, CK_SESSION_HANDLE backend);
// "CKM_SHA256", "CKM_AES_GCM{iv 12 bytes, aad 0 bytes, tag 128 bits}", "NULL".
void format_mechanism(TraceBuffer& out, const CK_MECHANISM* mechanism);
// Attributes of a template written in one record: the first ones, then "... N in all".
inline constexpr std::size_t kMaxAttributesShown = 32;
// "{CKA_CLASS=CKO_SECRET_KEY, CKA_VALUE=*** (32 bytes), CKA_LABEL="k1"}".
// Without `values`, only types and lengths. Walks the first kMaxAttributesShown
// attributes: only for a template the call read (it returned CKR_OK).
void format_template(TraceBuffer& out, const CK_ATTRIBUTE* attributes, CK_ULONG count, bool values);
// "{3 attributes}": a template the call refused, by its count alone. How far
// the call read it is unknown (it may have stopped at a bad handle, or at the
// first bad attribute of a count that is a lie), so it is not walked.
void format_template_count(TraceBuffer& out, const CK_ATTRIBUTE* attributes, CK_ULONG count);
// C_GetAttributeValue's template after the call. capacities[i] is attribute i's
// ulValueLen on entry, for the first min(count, kMaxAttributesShown). A value
// is shown only when `filled` (the return code defines the values), the
// returned length is not CK_UNAVAILABLE_INFORMATION, and it fits the caller's
// buffer: a backend that reports the required length with CKR_BUFFER_TOO_SMALL
// must not make the tracer read past that buffer. Nested templates
// (CKA_WRAP_TEMPLATE...) show lengths only: their buffers' sizes are unknown.
void format_filled_template(TraceBuffer& out, const CK_ATTRIBUTE* attributes, CK_ULONG count,
                            const CK_ULONG* capacities, bool filled);
// "0.4 us", "1234.5 us".
void format_duration(TraceBuffer& out, std::uint64_t ns);
// C_InitToken's label: 32 blank-padded bytes.
void format_label(TraceBuffer& out, const CK_UTF8CHAR* label);

// What an output pointer received, after a successful call.
void format_output(TraceBuffer& out, const CK_ULONG& value);
void format_output(TraceBuffer& out, const CK_INFO& info);
void format_output(TraceBuffer& out, const CK_SLOT_INFO& info);
void format_output(TraceBuffer& out, const CK_TOKEN_INFO& info);
void format_output(TraceBuffer& out, const CK_SESSION_INFO& info);
void format_output(TraceBuffer& out, const CK_MECHANISM_INFO& info);
template <class T>
void format_output(TraceBuffer& out, const T&) {
  append(out, "&");
}

}  // namespace p11mux
