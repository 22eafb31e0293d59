#include "policy/filter_calls.hpp"

#include "policy/filtered_list.hpp"

#include <p11mux/rv_names.hpp>

#include <spdlog/fmt/fmt.h>

#include <algorithm>
#include <new>
#include <vector>

namespace p11mux {
namespace {

// For the log: printable ASCII as is, anything else as \xNN; at most 64 bytes.
std::string printable(std::string_view bytes) {
  std::string out;
  for (unsigned char c : bytes.substr(0, 64)) {
    if (c >= 0x20 && c < 0x7f && c != '\'' && c != '\\') {
      out += static_cast<char>(c);
    } else {
      out += fmt::format("\\x{:02x}", c);
    }
  }
  if (bytes.size() > 64) out += "...";
  return out;
}

std::string hex(std::string_view bytes) {
  std::string out;
  for (unsigned char c : bytes.substr(0, 32)) out += fmt::format("{:02x}", c);
  if (bytes.size() > 32) out += "...";
  return out;
}

std::string_view field(const CK_UTF8CHAR* text, std::size_t size) noexcept {
  return unpadded({reinterpret_cast<const char*>(text), size});
}

void count(Runtime& rt, PolicyRule rule) noexcept {
  if (Metrics* metrics = rt.observer().metrics()) metrics->record_policy_denied(rule);
}

// One attribute's value past the inline buffer: asked its length, then read.
// No value when the object has none or will not give it.
std::optional<std::string_view> read_long(Runtime& rt, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object,
                                          CK_ATTRIBUTE_TYPE type, std::string& storage) noexcept {
  CK_ATTRIBUTE a{type, nullptr, 0};
  if (rt.port().call<fn::C_GetAttributeValue>(s, object, &a, 1) != CKR_OK ||
      a.ulValueLen == CK_UNAVAILABLE_INFORMATION) {
    return std::nullopt;
  }
  try {
    storage.assign(a.ulValueLen, '\0');
  } catch (const std::bad_alloc&) {
    return std::nullopt;
  }
  const CK_ULONG size = a.ulValueLen;
  a.pValue = storage.data();
  if (rt.port().call<fn::C_GetAttributeValue>(s, object, &a, 1) != CKR_OK || a.ulValueLen > size) {
    return std::nullopt;
  }
  return std::string_view(storage.data(), a.ulValueLen);
}

}  // namespace

CK_RV read_identity(Runtime& rt, CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object, ObjectIdentity& out,
                    bool labels, bool ids) noexcept {
  constexpr CK_ULONG kInline = ObjectIdentity::kInline;
  CK_ATTRIBUTE wanted[2];
  std::optional<std::string_view>* values[2];
  std::string* big[2];
  CK_ULONG n = 0;
  if (labels) {
    wanted[n] = {CKA_LABEL, out.label_buf.data(), kInline};
    values[n] = &out.label;
    big[n++] = &out.label_big;
  }
  if (ids) {
    wanted[n] = {CKA_ID, out.id_buf.data(), kInline};
    values[n] = &out.id;
    big[n++] = &out.id_big;
  }
  const CK_RV rv = rt.port().call<fn::C_GetAttributeValue>(s, object, wanted, n);
  // Any other code says nothing of the attributes (the object or the
  // session is not there): the caller answers it.
  if (rv != CKR_OK && rv != CKR_ATTRIBUTE_TYPE_INVALID && rv != CKR_ATTRIBUTE_SENSITIVE &&
      rv != CKR_BUFFER_TOO_SMALL) {
    return rv;
  }
  for (CK_ULONG i = 0; i < n; ++i) {
    const CK_ULONG len = wanted[i].ulValueLen;
    if (len != CK_UNAVAILABLE_INFORMATION && len <= kInline) {
      *values[i] = std::string_view(static_cast<const char*>(wanted[i].pValue), len);
    } else if (rv == CKR_BUFFER_TOO_SMALL) {
      // Too long for the inline buffer (or absent: the same mark): ask alone.
      // Never past the buffer on a length the backend reports
      // (docs/pkcs11-facts.md).
      *values[i] = read_long(rt, s, object, wanted[i].type, *big[i]);
    }
  }
  return CKR_OK;
}

void report_token_refusal(Runtime& rt, std::string_view function, CK_SLOT_ID slot,
                          const CK_TOKEN_INFO& token, CK_RV rv) noexcept {
  count(rt, PolicyRule::token);
  try {
    rt.log().warn("policy refused {}: rule token (slot {}, label '{}', serial '{}'): {}", function,
                  slot, printable(field(token.label, sizeof token.label)),
                  printable(field(token.serialNumber, sizeof token.serialNumber)), rv_name(rv));
  } catch (...) {
    // A log line that cannot be written does not change the answer.
  }
}

void report_object_refusal(Runtime& rt, std::string_view function,
                           std::optional<std::string_view> label,
                           std::optional<std::string_view> id, CK_RV rv) noexcept {
  count(rt, PolicyRule::object);
  try {
    rt.log().warn("policy refused {}: rule object (label {}, id {}): {}", function,
                  label ? "'" + printable(*label) + "'" : std::string("none"),
                  id ? hex(*id) : std::string("none"), rv_name(rv));
  } catch (...) {
    // A log line that cannot be written does not change the answer.
  }
}

// ---- tokens ------------------------------------------------------------------

bool slot_exposed(Runtime& rt, const TokenFilter& tokens, CK_SLOT_ID slot) noexcept {
  CK_TOKEN_INFO info{};
  // No token, or none the backend will describe: nothing that can match.
  return rt.port().call<fn::C_GetTokenInfo>(slot, &info) == CKR_OK && tokens.exposes(info);
}

CK_RV token_refusal(Runtime& rt, const TokenFilter& tokens, std::string_view function,
                    CK_SLOT_ID slot) noexcept {
  CK_TOKEN_INFO info{};
  const CK_RV rv = rt.port().call<fn::C_GetTokenInfo>(slot, &info);
  if (rv == CKR_OK && tokens.exposes(info)) return CKR_OK;
  // A token that is there and hidden is a refusal; an empty slot, or one the
  // backend does not know, is answered as the backend's own unknown slot.
  if (rv == CKR_OK) report_token_refusal(rt, function, slot, info, CKR_SLOT_ID_INVALID);
  return CKR_SLOT_ID_INVALID;
}

CK_RV filtered_slot_list(Runtime& rt, const TokenFilter& tokens, CK_BBOOL token_present,
                         CK_SLOT_ID_PTR list, CK_ULONG_PTR count) noexcept {
  return filtered_list(
      [&](CK_SLOT_ID_PTR l, CK_ULONG_PTR n) {
        return rt.port().call<fn::C_GetSlotList>(token_present, l, n);
      },
      [&](CK_SLOT_ID slot) { return slot_exposed(rt, tokens, slot); }, list, count);
}

// ---- objects -----------------------------------------------------------------

CK_RV object_refusal(Runtime& rt, const ObjectFilter& objects, std::string_view function,
                     CK_SESSION_HANDLE s, CK_OBJECT_HANDLE object, CK_RV invalid,
                     const CK_ATTRIBUTE* change, CK_ULONG change_count) noexcept {
  ObjectIdentity identity;
  if (CK_RV rv = read_identity(rt, s, object, identity, objects.uses_labels(), objects.uses_ids());
      rv != CKR_OK) {
    // Not there (or not visible to this session): the call's own code for
    // an unknown handle, as the backend would answer. Anything else (the
    // session or the device gone) is the backend's answer to this call too.
    return rv == CKR_OBJECT_HANDLE_INVALID ? invalid : rv;
  }
  if (!objects.exposes(identity.label, identity.id)) {
    // The log line names both (a refusal is rare: read again for it).
    if (!objects.uses_labels() || !objects.uses_ids()) (void)read_identity(rt, s, object, identity);
    report_object_refusal(rt, function, identity.label, identity.id, invalid);
    return invalid;
  }
  if (change != nullptr) {
    if (CK_RV rv = objects.check_template(change, change_count, identity.label, identity.id);
        rv != CKR_OK) {
      if (!objects.uses_labels() || !objects.uses_ids()) {
        (void)read_identity(rt, s, object, identity);
      }
      report_object_refusal(rt, function, identity.label, identity.id, rv);
      return rv;
    }
  }
  return CKR_OK;
}

CK_RV creation_refusal(Runtime& rt, const ObjectFilter& objects, std::string_view function,
                       const CK_ATTRIBUTE* tmpl, CK_ULONG count) noexcept {
  const CK_RV rv = objects.check_template(tmpl, count);
  if (rv == CKR_OK) return rv;
  std::optional<std::string_view> label, id;
  for (CK_ULONG i = 0; tmpl != nullptr && i < count; ++i) {
    if (tmpl[i].pValue == nullptr) continue;
    const std::string_view value(static_cast<const char*>(tmpl[i].pValue), tmpl[i].ulValueLen);
    if (tmpl[i].type == CKA_LABEL) label = value;
    if (tmpl[i].type == CKA_ID) id = value;
  }
  report_object_refusal(rt, function, label, id, rv);
  return rv;
}

CK_RV filtered_find_objects(Runtime& rt, const ObjectFilter& objects, CK_SESSION_HANDLE s,
                            CK_OBJECT_HANDLE_PTR found, CK_ULONG max, CK_ULONG_PTR count) noexcept {
  if (max == 0) return rt.port().call<fn::C_FindObjects>(s, found, max, count);
  // The backend's answers go to a buffer of our own: a hidden handle is
  // never written where the application can read it.
  constexpr CK_ULONG kChunk = 32;
  CK_OBJECT_HANDLE chunk[kChunk];
  CK_ULONG kept = 0;
  while (kept < max) {
    const CK_ULONG want = std::min(max - kept, kChunk);
    CK_ULONG got = 0;
    const CK_RV rv = rt.port().call<fn::C_FindObjects>(s, chunk, want, &got);
    if (rv != CKR_OK) {
      // What was kept is answered; the next call meets the error again.
      if (kept != 0) break;
      return rv;
    }
    got = std::min(got, want);
    if (got == 0) break;  // the search has ended
    for (CK_ULONG i = 0; i < got; ++i) {
      ObjectIdentity identity;
      // Unreadable: hidden (deny by default).
      if (read_identity(rt, s, chunk[i], identity, objects.uses_labels(), objects.uses_ids()) ==
              CKR_OK &&
          objects.exposes(identity.label, identity.id)) {
        found[kept++] = chunk[i];
      }
    }
    // Fewer than asked may or may not be the end; with something to answer,
    // the application asks again. Only an answer of 0 must mean the end.
    if (got < want && kept != 0) break;
  }
  *count = kept;
  return CKR_OK;
}

}  // namespace p11mux
