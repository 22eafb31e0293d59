// Why a backend session was closed instead of pooled: p11mux could not prove
// it clean (issue 10: deny by default). Counted per slot and reason in the
// pool metrics (p11mux_pool_sessions_unclean_total).
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

namespace p11mux {

enum class CloseReason : std::uint8_t {
  operation_active,        // an operation was active and could not be cancelled
  operation_maybe_active,  // an error may have left one active (no C_SessionCancel to prove
                           // otherwise)
  unknown_mechanism,       // a key made with a mechanism whose returned keys p11mux does not know
  object_untracked,  // a created object whose CKA_TOKEN could not be read, or too many to follow
  object_not_destroyed,  // a session object it created could not be destroyed
  notify_callback,       // opened with the application's Notify callback
};

inline constexpr std::array<std::string_view, 6> kCloseReasonNames{
    "operation_active", "operation_maybe_active", "unknown_mechanism",
    "object_untracked", "object_not_destroyed",   "notify_callback"};
inline constexpr std::size_t kCloseReasonCount = kCloseReasonNames.size();

constexpr std::string_view to_string(CloseReason r) noexcept {
  return kCloseReasonNames[static_cast<std::size_t>(r)];
}

}  // namespace p11mux
