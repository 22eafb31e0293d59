#include "group/operation_record.hpp"

#include "sessions/session_table.hpp"

#include <cstring>
#include <new>

namespace p11mux {

namespace {

CK_ULONG read_ulong(const unsigned char* base, std::size_t offset) noexcept {
  CK_ULONG v;
  std::memcpy(&v, base + offset, sizeof v);
  return v;
}

const void* read_pointer(const unsigned char* base, std::size_t offset) noexcept {
  const void* p;
  std::memcpy(&p, base + offset, sizeof p);
  return p;
}

void write_pointer(unsigned char* base, std::size_t offset, const void* p) noexcept {
  std::memcpy(base + offset, &p, sizeof p);
}

}  // namespace

CopyResult MechanismCopy::assign_looked_up(const CK_MECHANISM& m) noexcept {
  held_ = false;
  plain_ = false;
  if (known_ == nullptr || known_->type != m.mechanism) known_ = replay_mechanism(m.mechanism);
  const ReplayMechanism* known = known_;
  if (known == nullptr) return CopyResult::unknown_mechanism;

  // No parameter: nothing to copy, nothing allocated (the ECDSA sign path).
  if (m.ulParameterLen == 0 && (known->param == Param::none || known->optional)) {
    mechanism_ = {m.mechanism, nullptr, 0};
    held_ = true;
    plain_ = true;
    return CopyResult::ok;
  }
  const ParamLayout* layout = param_layout(known->param, m.ulParameterLen);
  if (layout == nullptr || m.pParameter == nullptr) return CopyResult::bad_parameter;

  // The structure, then each byte string it points to, in one buffer.
  const auto* source = static_cast<const unsigned char*>(m.pParameter);
  std::size_t total = layout->size;
  for (std::size_t i = 0; i < layout->nested_count; ++i) {
    const NestedBytes& n = layout->nested[i];
    const CK_ULONG len = read_ulong(source, n.length);
    if (len == 0) continue;
    if (read_pointer(source, n.pointer) == nullptr) return CopyResult::bad_parameter;
    if (len > kMaxBytes - (total - layout->size)) return CopyResult::too_large;
    total += len;
  }

  unsigned char* buffer = inline_;
  if (total > kInline) {
    if (total > heap_size_) {
      auto* grown = new (std::nothrow) unsigned char[total];
      if (grown == nullptr) return CopyResult::no_memory;
      delete[] heap_;
      heap_ = grown;
      heap_size_ = static_cast<std::uint32_t>(total);
    }
    buffer = heap_;
  }

  std::memcpy(buffer, source, layout->size);
  std::size_t at = layout->size;
  for (std::size_t i = 0; i < layout->nested_count; ++i) {
    const NestedBytes& n = layout->nested[i];
    const CK_ULONG len = read_ulong(source, n.length);
    if (len == 0) {
      // Nothing to read there: a pointer into the application's memory would
      // be left dangling, so the member gets NULL.
      write_pointer(buffer, n.pointer, nullptr);
      continue;
    }
    std::memcpy(buffer + at, read_pointer(source, n.pointer), len);
    write_pointer(buffer, n.pointer, buffer + at);
    at += len;
  }
  mechanism_ = {m.mechanism, buffer, m.ulParameterLen};
  held_ = true;
  return CopyResult::ok;
}

void SessionOperationsDeleter::operator()(SessionOperations* operations) const noexcept {
  delete operations;
}

}  // namespace p11mux
