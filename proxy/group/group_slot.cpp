#include "group/group_slot.hpp"

#include "group/fnv1a.hpp"
#include "policy/filtered_list.hpp"
#include "policy/filters.hpp"

#include <p11mux/version.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

namespace p11mux {
namespace {

// v3.0's CK_TOKEN_INFO flag "the token failed a self-test": not in the v2.40 header.
constexpr CK_FLAGS kErrorState = 1UL << 24;

// The token flags, rule by rule (README.md of this folder). Set only if
// every member has it: a call may go to any member, so the group can do
// only what all of them can.
constexpr CK_FLAGS kAllMembers = CKF_RNG | CKF_USER_PIN_INITIALIZED | CKF_RESTORE_KEY_NOT_NEEDED |
                                 CKF_CLOCK_ON_TOKEN | CKF_PROTECTED_AUTHENTICATION_PATH |
                                 CKF_DUAL_CRYPTO_OPERATIONS | CKF_TOKEN_INITIALIZED |
                                 CKF_SECONDARY_AUTHENTICATION;
// Set if any member has it: a restriction or a warning that holds for the
// group as soon as it holds for one member (a login goes to every member).
constexpr CK_FLAGS kAnyMember =
    CKF_WRITE_PROTECTED | CKF_LOGIN_REQUIRED | CKF_USER_PIN_COUNT_LOW | CKF_USER_PIN_FINAL_TRY |
    CKF_USER_PIN_LOCKED | CKF_USER_PIN_TO_BE_CHANGED | CKF_SO_PIN_COUNT_LOW | CKF_SO_PIN_FINAL_TRY |
    CKF_SO_PIN_LOCKED | CKF_SO_PIN_TO_BE_CHANGED | kErrorState;
static_assert((kAllMembers & kAnyMember) == 0);

// The mechanism flags that name a function a mechanism can be used with
// (CKF_ENCRYPT to CKF_DERIVE, and v3.0's message-based ones).
constexpr CK_FLAGS kFunctionFlags =
    CKF_ENCRYPT | CKF_DECRYPT | CKF_DIGEST | CKF_SIGN | CKF_SIGN_RECOVER | CKF_VERIFY |
    CKF_VERIFY_RECOVER | CKF_GENERATE | CKF_GENERATE_KEY_PAIR | CKF_WRAP | CKF_UNWRAP | CKF_DERIVE |
    CKF_MESSAGE_ENCRYPT | CKF_MESSAGE_DECRYPT | CKF_MESSAGE_SIGN | CKF_MESSAGE_VERIFY;

// PKCS#11 text fields are padded with blanks, not NUL-terminated.
template <std::size_t N>
void set_padded(CK_UTF8CHAR (&field)[N], std::string_view text) noexcept {
  std::memset(field, ' ', N);
  std::memcpy(field, text.data(), std::min(N, text.size()));
}

constexpr CK_VERSION kP11muxVersion{P11MUX_VERSION_MAJOR, P11MUX_VERSION_MINOR};

// The largest count that is not CK_UNAVAILABLE_INFORMATION: where a sum saturates.
constexpr CK_ULONG kMostCount = CK_UNAVAILABLE_INFORMATION - 1;

CK_ULONG saturating_add(CK_ULONG a, CK_ULONG b) noexcept {
  return a > kMostCount - b ? kMostCount : a + b;
}

// Sessions open: the sum; unknown if any member's is.
CK_ULONG add_count(CK_ULONG a, CK_ULONG b) noexcept {
  if (a == CK_UNAVAILABLE_INFORMATION || b == CK_UNAVAILABLE_INFORMATION)
    return CK_UNAVAILABLE_INFORMATION;
  return saturating_add(a, b);
}

// Session limits: the sum (each session lives on one member); no limit if
// any member has none, else unknown if any member's is.
CK_ULONG add_limit(CK_ULONG a, CK_ULONG b) noexcept {
  if (a == CK_EFFECTIVELY_INFINITE || b == CK_EFFECTIVELY_INFINITE) return CK_EFFECTIVELY_INFINITE;
  if (a == CK_UNAVAILABLE_INFORMATION || b == CK_UNAVAILABLE_INFORMATION)
    return CK_UNAVAILABLE_INFORMATION;
  return saturating_add(a, b);
}

// Memory: the least (every token object is on every member); unknown if any member's is.
CK_ULONG least_memory(CK_ULONG a, CK_ULONG b) noexcept {
  if (a == CK_UNAVAILABLE_INFORMATION || b == CK_UNAVAILABLE_INFORMATION)
    return CK_UNAVAILABLE_INFORMATION;
  return std::min(a, b);
}

// PIN lengths: the tightest bound; a member that does not say sets none.
CK_ULONG tighter(CK_ULONG a, CK_ULONG b, bool lower) noexcept {
  if (a == CK_UNAVAILABLE_INFORMATION) return b;
  if (b == CK_UNAVAILABLE_INFORMATION) return a;
  return lower ? std::max(a, b) : std::min(a, b);
}

// Key sizes both 0: the spec lets "meaningless" values stand for no key size.
bool no_key_size(const CK_MECHANISM_INFO& info) noexcept {
  return info.ulMinKeySize == 0 && info.ulMaxKeySize == 0;
}

// Fnv1a in 16 hex digits: the same on every build and platform.
void serial_digits(std::string_view group, CK_UTF8CHAR (&out)[16]) noexcept {
  Fnv1a f;
  f.add(group.data(), group.size());
  std::uint64_t hash = f.h;
  static constexpr char kHex[] = "0123456789ABCDEF";
  for (int i = 15; i >= 0; --i, hash >>= 4) out[i] = static_cast<CK_UTF8CHAR>(kHex[hash & 0xF]);
}

}  // namespace

bool member_token_matches(const GroupMember& member, const CK_TOKEN_INFO& token) noexcept {
  const bool by_label = member.by == GroupMember::By::label;
  const std::string_view field =
      by_label ? std::string_view(reinterpret_cast<const char*>(token.label), sizeof token.label)
               : std::string_view(reinterpret_cast<const char*>(token.serialNumber),
                                  sizeof token.serialNumber);
  return unpadded(field) == member.token;
}

CK_SLOT_INFO group_slot_info(std::string_view group, std::span<const MemberSlot> members) noexcept {
  CK_SLOT_INFO info{};
  set_padded(info.slotDescription, group);
  set_padded(info.manufacturerID, "p11mux");
  info.hardwareVersion = CK_VERSION{0, 0};
  info.firmwareVersion = kP11muxVersion;
  bool all_hw = !members.empty();
  for (const MemberSlot& m : members) {
    if (m.token) info.flags |= CKF_TOKEN_PRESENT;
    if (m.slot.flags & CKF_REMOVABLE_DEVICE) info.flags |= CKF_REMOVABLE_DEVICE;
    all_hw = all_hw && (m.slot.flags & CKF_HW_SLOT) != 0;
  }
  if (all_hw) info.flags |= CKF_HW_SLOT;
  return info;
}

std::optional<CK_TOKEN_INFO> group_token_info(std::string_view group,
                                              std::span<const CK_TOKEN_INFO> tokens) noexcept {
  if (tokens.empty()) return std::nullopt;
  const CK_TOKEN_INFO& first = tokens.front();
  CK_TOKEN_INFO info = first;  // utcTime is the first member's; the rest is set below
  set_padded(info.label, group);
  set_padded(info.manufacturerID, "p11mux");
  set_padded(info.model, "group");
  serial_digits(group, info.serialNumber);
  info.hardwareVersion = CK_VERSION{0, 0};
  info.firmwareVersion = kP11muxVersion;
  CK_FLAGS all = kAllMembers, any = 0;
  for (const CK_TOKEN_INFO& t : tokens) {
    all &= t.flags;
    any |= t.flags;
  }
  info.flags = (all & kAllMembers) | (any & kAnyMember);
  // Counts, limits, memory and PIN lengths start as the first member's (the copy).
  for (const CK_TOKEN_INFO& t : tokens.subspan(1)) {
    info.ulSessionCount = add_count(info.ulSessionCount, t.ulSessionCount);
    info.ulRwSessionCount = add_count(info.ulRwSessionCount, t.ulRwSessionCount);
    info.ulMaxSessionCount = add_limit(info.ulMaxSessionCount, t.ulMaxSessionCount);
    info.ulMaxRwSessionCount = add_limit(info.ulMaxRwSessionCount, t.ulMaxRwSessionCount);
    info.ulTotalPublicMemory = least_memory(info.ulTotalPublicMemory, t.ulTotalPublicMemory);
    info.ulFreePublicMemory = least_memory(info.ulFreePublicMemory, t.ulFreePublicMemory);
    info.ulTotalPrivateMemory = least_memory(info.ulTotalPrivateMemory, t.ulTotalPrivateMemory);
    info.ulFreePrivateMemory = least_memory(info.ulFreePrivateMemory, t.ulFreePrivateMemory);
    info.ulMinPinLen = tighter(info.ulMinPinLen, t.ulMinPinLen, true);
    info.ulMaxPinLen = tighter(info.ulMaxPinLen, t.ulMaxPinLen, false);
  }
  return info;
}

bool pin_range_empty(const CK_TOKEN_INFO& token) noexcept {
  return token.ulMinPinLen != CK_UNAVAILABLE_INFORMATION &&
         token.ulMaxPinLen != CK_UNAVAILABLE_INFORMATION && token.ulMinPinLen > token.ulMaxPinLen;
}

std::string group_serial(std::string_view group) {
  CK_UTF8CHAR digits[16];
  serial_digits(group, digits);
  return std::string(reinterpret_cast<const char*>(digits), sizeof digits);
}

std::optional<CK_MECHANISM_INFO> group_mechanism_info(std::span<const CK_MECHANISM_INFO> infos) {
  if (infos.empty()) return std::nullopt;
  CK_MECHANISM_INFO out{0, 0, ~CK_FLAGS{0}};
  CK_FLAGS any = 0;
  bool sized = false;
  for (const CK_MECHANISM_INFO& i : infos) {
    out.flags &= i.flags;
    any |= i.flags;
    if (no_key_size(i)) continue;
    out.ulMinKeySize = sized ? std::max(out.ulMinKeySize, i.ulMinKeySize) : i.ulMinKeySize;
    out.ulMaxKeySize = sized ? std::min(out.ulMaxKeySize, i.ulMaxKeySize) : i.ulMaxKeySize;
    sized = true;
  }
  if (sized && out.ulMinKeySize > out.ulMaxKeySize) return std::nullopt;
  if ((any & kFunctionFlags) != 0 && (out.flags & kFunctionFlags) == 0) return std::nullopt;
  return out;
}

MechanismList intersect_mechanisms(std::span<const MechanismList> members) {
  MechanismList out;
  if (members.empty()) return out;
  std::vector<CK_MECHANISM_INFO> infos;
  infos.reserve(members.size());
  for (const Mechanism& m : members.front()) {
    const bool seen =
        std::any_of(out.begin(), out.end(), [&](const Mechanism& o) { return o.type == m.type; });
    if (seen) continue;  // a member listing one twice: the first counts
    infos.clear();
    for (const MechanismList& member : members) {
      const auto it = std::find_if(member.begin(), member.end(),
                                   [&](const Mechanism& x) { return x.type == m.type; });
      if (it == member.end()) break;
      infos.push_back(it->info);
    }
    if (infos.size() != members.size()) continue;
    if (std::optional<CK_MECHANISM_INFO> info = group_mechanism_info(infos))
      out.push_back({m.type, *info});
  }
  return out;
}

CK_RV answer_mechanism_list(const MechanismList& mechanisms, CK_MECHANISM_TYPE_PTR list,
                            CK_ULONG_PTR count) noexcept {
  if (count == nullptr) return CKR_ARGUMENTS_BAD;
  // The synthesized list, asked as a backend's would be; filtered_list
  // answers the application with the spec's length rules.
  auto ask = [&](CK_MECHANISM_TYPE* out, CK_ULONG* n) -> CK_RV {
    if (out != nullptr) {
      if (*n < mechanisms.size()) {
        *n = mechanisms.size();
        return CKR_BUFFER_TOO_SMALL;
      }
      for (std::size_t i = 0; i < mechanisms.size(); ++i) out[i] = mechanisms[i].type;
    }
    *n = mechanisms.size();
    return CKR_OK;
  };
  return filtered_list<CK_MECHANISM_TYPE>(
      ask, [](CK_MECHANISM_TYPE) { return true; }, list, count);
}

CK_RV answer_mechanism_info(const MechanismList& mechanisms, CK_MECHANISM_TYPE type,
                            CK_MECHANISM_INFO_PTR info) noexcept {
  if (info == nullptr) return CKR_ARGUMENTS_BAD;
  const auto it = std::find_if(mechanisms.begin(), mechanisms.end(),
                               [&](const Mechanism& m) { return m.type == type; });
  if (it == mechanisms.end()) return CKR_MECHANISM_INVALID;
  *info = it->info;
  return CKR_OK;
}

}  // namespace p11mux
