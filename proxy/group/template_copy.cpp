#include "group/template_copy.hpp"

#include <cstring>  // explicit_bzero (glibc)

namespace p11mux {

namespace {

constexpr std::size_t kAlign = sizeof(std::max_align_t);

std::size_t words(CK_ULONG length) noexcept { return (length + kAlign - 1) / kAlign; }

bool is_array(const CK_ATTRIBUTE& a) noexcept { return (a.type & CKF_ARRAY_ATTRIBUTE) != 0; }

}  // namespace

TemplateCopy::Result TemplateCopy::copy(const CK_ATTRIBUTE* templ, CK_ULONG count) {
  wipe();
  if (count != 0 && templ == nullptr) return Result::bad_template;
  // First the room: every value, nested ones included, rounded to words.
  std::size_t need = 0;
  for (CK_ULONG i = 0; i < count; ++i) {
    const CK_ATTRIBUTE& a = templ[i];
    if (a.ulValueLen != 0 && a.pValue == nullptr) return Result::bad_template;
    if (a.ulValueLen > kMaxBytes) return Result::too_large;
    if (is_array(a)) {
      if (a.ulValueLen % sizeof(CK_ATTRIBUTE) != 0) return Result::bad_template;
      const auto* inner = static_cast<const CK_ATTRIBUTE*>(a.pValue);
      for (std::size_t j = 0; j < a.ulValueLen / sizeof(CK_ATTRIBUTE); ++j) {
        if (is_array(inner[j])) return Result::nested_too_deep;
        if (inner[j].ulValueLen != 0 && inner[j].pValue == nullptr) return Result::bad_template;
        if (inner[j].ulValueLen > kMaxBytes) return Result::too_large;
        need += words(inner[j].ulValueLen);
      }
    } else {
      need += words(a.ulValueLen);
    }
    if (need * kAlign > kMaxBytes) return Result::too_large;
  }
  values_.resize(need);
  std::size_t at = 0;
  auto place = [&](const CK_ATTRIBUTE& from) -> CK_ATTRIBUTE {
    CK_ATTRIBUTE to{from.type, nullptr, from.ulValueLen};
    if (from.ulValueLen != 0) {
      to.pValue = &values_[at];
      std::memcpy(to.pValue, from.pValue, from.ulValueLen);
      at += words(from.ulValueLen);
    }
    return to;
  };
  top_.reserve(count);
  for (CK_ULONG i = 0; i < count; ++i) {
    const CK_ATTRIBUTE& a = templ[i];
    if (!is_array(a)) {
      top_.push_back(place(a));
      continue;
    }
    // The nested attributes in a vector of their own; the values in ours.
    const auto* inner = static_cast<const CK_ATTRIBUTE*>(a.pValue);
    std::vector<CK_ATTRIBUTE>& list = nested_.emplace_back();
    for (std::size_t j = 0; j < a.ulValueLen / sizeof(CK_ATTRIBUTE); ++j)
      list.push_back(place(inner[j]));
    top_.push_back({a.type, list.empty() ? nullptr : list.data(), a.ulValueLen});
  }
  return Result::ok;
}

void TemplateCopy::wipe() noexcept {
  if (!values_.empty()) explicit_bzero(values_.data(), values_.size() * kAlign);
  values_.clear();
  top_.clear();
  nested_.clear();
}

}  // namespace p11mux
