#include "group/attribute_snapshot.hpp"

#include <algorithm>
#include <new>

namespace p11mux {

namespace {

constexpr std::size_t kAlign = sizeof(std::max_align_t);

std::size_t rounded(CK_ULONG length) noexcept { return (length + kAlign - 1) / kAlign; }

}  // namespace

void AttributeSnapshot::read(const BackendPort& port, CK_SESSION_HANDLE session,
                             CK_OBJECT_HANDLE object, const CK_ATTRIBUTE* templ,
                             CK_ULONG count) noexcept {
  attributes_.clear();
  values_.clear();
  complete_ = true;
  if (templ == nullptr || count == 0) return;  // the change itself answers a bad template
  try {
    for (CK_ULONG i = 0; i < count; ++i) {
      // An array attribute's value holds pointers into buffers of its own:
      // not kept (docs/groups.md, "Objects").
      if ((templ[i].type & CKF_ARRAY_ATTRIBUTE) != 0) {
        complete_ = false;
        continue;
      }
      attributes_.push_back({templ[i].type, nullptr, 0});
    }
    if (attributes_.empty()) return;
    // The lengths (pValue NULL): an attribute the module marks
    // CK_UNAVAILABLE_INFORMATION (sensitive, absent) cannot be kept.
    CK_RV rv = port.call<fn::C_GetAttributeValue>(session, object, attributes_.data(),
                                                  static_cast<CK_ULONG>(attributes_.size()));
    if (rv != CKR_OK && rv != CKR_ATTRIBUTE_SENSITIVE && rv != CKR_ATTRIBUTE_TYPE_INVALID) {
      attributes_.clear();
      complete_ = false;
      return;
    }
    const auto unreadable = [](const CK_ATTRIBUTE& a) {
      return a.ulValueLen == CK_UNAVAILABLE_INFORMATION || a.ulValueLen > kMaxValue;
    };
    const std::size_t before = attributes_.size();
    std::erase_if(attributes_, unreadable);
    if (attributes_.size() != before) complete_ = false;
    std::size_t words = 0;
    for (const CK_ATTRIBUTE& a : attributes_) words += rounded(a.ulValueLen);
    values_.resize(words);
    std::size_t at = 0;
    for (CK_ATTRIBUTE& a : attributes_) {
      a.pValue = a.ulValueLen == 0 ? nullptr : static_cast<void*>(&values_[at]);
      at += rounded(a.ulValueLen);
    }
    rv = port.call<fn::C_GetAttributeValue>(session, object, attributes_.data(),
                                            static_cast<CK_ULONG>(attributes_.size()));
    // Changed by another session between the two reads, say: nothing kept.
    if (rv != CKR_OK) {
      attributes_.clear();
      complete_ = false;
    }
  } catch (const std::bad_alloc&) {
    attributes_.clear();
    complete_ = false;
  }
}

CK_RV AttributeSnapshot::restore(const BackendPort& port, CK_SESSION_HANDLE session,
                                 CK_OBJECT_HANDLE object) const noexcept {
  if (attributes_.empty()) return CKR_OK;
  // C_SetAttributeValue takes a non-const template; the values are not written.
  return port.call<fn::C_SetAttributeValue>(session, object,
                                            const_cast<CK_ATTRIBUTE*>(attributes_.data()),
                                            static_cast<CK_ULONG>(attributes_.size()));
}

}  // namespace p11mux
