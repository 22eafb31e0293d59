// A deep copy of a CK_ATTRIBUTE template, kept after the call that passed it
// (issue 15: a change to a token object that a down member missed is made
// there when it returns; docs/groups.md "Objects", "A member that missed
// changes"). The values, those of one level of nested array attributes
// (CKA_WRAP_TEMPLATE and its kin) included, live in one aligned buffer the
// copy owns, zeroed with explicit_bzero when the copy goes: a template may
// hold a secret key's CKA_VALUE.
#pragma once

#include <p11mux/pkcs11.h>

#include <cstddef>
#include <vector>

namespace p11mux {

class TemplateCopy {
 public:
  TemplateCopy() = default;
  ~TemplateCopy() { wipe(); }
  // Moved, never copied: a second copy of a secret is a second place to
  // zero (a moved-from copy holds nothing; no assignment, which would drop
  // values unzeroed).
  TemplateCopy(TemplateCopy&&) noexcept = default;
  TemplateCopy& operator=(TemplateCopy&&) = delete;
  TemplateCopy(const TemplateCopy&) = delete;
  TemplateCopy& operator=(const TemplateCopy&) = delete;

  enum class Result { ok, too_large, nested_too_deep, bad_template };
  // Copies `count` attributes of `templ`. Refused, leaving the copy empty:
  // more than kMaxBytes of values in all, an array attribute inside an
  // array attribute, or a value with a length and a NULL pointer. Throws
  // std::bad_alloc.
  Result copy(const CK_ATTRIBUTE* templ, CK_ULONG count);

  // The template, for a backend call (which takes a non-const pointer but
  // does not write to a template it creates or changes with).
  CK_ATTRIBUTE* data() noexcept { return top_.data(); }
  CK_ULONG size() const noexcept { return static_cast<CK_ULONG>(top_.size()); }
  std::size_t bytes() const noexcept { return values_.size() * sizeof(std::max_align_t); }

  // Every value byte zeroed (explicit_bzero: not dropped by the compiler)
  // and the copy emptied. The destructor calls it.
  void wipe() noexcept;

  // All value bytes a copy takes, at most: a template beyond it is not kept.
  static constexpr std::size_t kMaxBytes = std::size_t{64} * 1024;

 private:
  std::vector<CK_ATTRIBUTE> top_;
  std::vector<std::vector<CK_ATTRIBUTE>> nested_;  // one per array attribute of top_
  std::vector<std::max_align_t> values_;           // aligned: a module may read a CK_ULONG in place
};

}  // namespace p11mux
