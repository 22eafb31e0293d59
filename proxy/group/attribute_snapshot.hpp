// The old values of the attributes a C_SetAttributeValue changes, read from
// one member's copy of a token object before the change, to set them back
// when another member refuses it (issue 15: a change of a token object is
// made on every member, or undone; docs/groups.md "Objects").
#pragma once

#include "port/backend_port.hpp"

#include <p11mux/pkcs11.h>

#include <cstddef>
#include <vector>

namespace p11mux {

class AttributeSnapshot {
 public:
  // C_GetAttributeValue on `session` of the types `templ` names: their
  // lengths, then their values. An attribute that cannot be read (sensitive,
  // absent, an array attribute, a read that fails) is left out, and
  // complete() is then false: restore cannot put it back. Never throws.
  void read(const BackendPort& port, CK_SESSION_HANDLE session, CK_OBJECT_HANDLE object,
            const CK_ATTRIBUTE* templ, CK_ULONG count) noexcept;
  bool complete() const noexcept { return complete_; }
  // C_SetAttributeValue of the values read; CKR_OK when none was.
  CK_RV restore(const BackendPort& port, CK_SESSION_HANDLE session,
                CK_OBJECT_HANDLE object) const noexcept;

 private:
  // Values over this are not kept (as the object map reads none over 64 KiB).
  static constexpr CK_ULONG kMaxValue = CK_ULONG{64} * 1024;
  std::vector<CK_ATTRIBUTE> attributes_;  // pValue into values_
  std::vector<std::max_align_t> values_;  // aligned: a module may read a CK_ULONG in place
  bool complete_ = true;
};

}  // namespace p11mux
