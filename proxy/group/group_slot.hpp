// The slot a group shows (issue 15, docs/groups.md): its CK_SLOT_INFO,
// CK_TOKEN_INFO and mechanisms, synthesized from its members' answers.
//
// Pure functions, unit-tested alone (tests/unit/group_slot_test.cpp): the
// runtime asks the members, and passes here the answers of the members it
// counts (the healthy ones for slot and token info; see docs/groups.md for
// which members the mechanisms are taken from). Each rule, flag by flag, and
// why, is in this folder's README.md.
#pragma once

#include "config/config.hpp"

#include <p11mux/pkcs11.h>

#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace p11mux {

// A member's token is the one its configuration names: by label or serial
// number, compared without the field's padding, as [policy] tokens compares
// (policy/filters.hpp, unpadded).
bool member_token_matches(const GroupMember& member, const CK_TOKEN_INFO& token) noexcept;

// One member's slot as the synthesis sees it: its C_GetSlotInfo, and its
// C_GetTokenInfo when a token is present (nullopt: none, or it would not say).
struct MemberSlot {
  CK_SLOT_INFO slot{};
  std::optional<CK_TOKEN_INFO> token;
};

// The group's CK_SLOT_INFO: slotDescription = the group's name,
// manufacturerID = "p11mux", CKF_TOKEN_PRESENT if any member has a token,
// CKF_HW_SLOT if every member's slot is one, CKF_REMOVABLE_DEVICE if any is;
// hardwareVersion 0.0, firmwareVersion p11mux's. No members: no token.
CK_SLOT_INFO group_slot_info(std::string_view group, std::span<const MemberSlot> members) noexcept;

// The group's CK_TOKEN_INFO from the tokens of its members (in member
// order); nullopt when there is none (C_GetTokenInfo then answers
// CKR_TOKEN_NOT_PRESENT). A PIN range that no PIN fits (ulMinPinLen >
// ulMaxPinLen) is reported as found: the members disagree (pin_range_empty).
std::optional<CK_TOKEN_INFO> group_token_info(std::string_view group,
                                              std::span<const CK_TOKEN_INFO> tokens) noexcept;

// No PIN length fits every member: a group its members cannot log in to alike.
bool pin_range_empty(const CK_TOKEN_INFO& token) noexcept;

// The serial number a group's token shows: 16 hex digits of a hash of its
// name, so it stays the same as members come, go or change.
std::string group_serial(std::string_view group);

// One mechanism of a member, with its C_GetMechanismInfo.
struct Mechanism {
  CK_MECHANISM_TYPE type;
  CK_MECHANISM_INFO info;
};
using MechanismList = std::vector<Mechanism>;  // one member's list, in its order

// The mechanisms every member has, in the first member's order, each with
// the key sizes and flags every member supports (group_mechanism_info).
// Those no key size or no function fits are left out. No members: none.
MechanismList intersect_mechanisms(std::span<const MechanismList> members);

// One mechanism's info over its members' infos: the flags every member
// has, the key sizes every member takes (a member whose sizes are both 0
// gives none: the spec lets such values be meaningless); nullopt when the
// sizes leave no key, or the flags no function that a member had.
std::optional<CK_MECHANISM_INFO> group_mechanism_info(std::span<const CK_MECHANISM_INFO> infos);

// C_GetMechanismList and C_GetMechanismInfo answered from a synthesized
// list, with the spec's length rules (policy/filtered_list.hpp) and
// CKR_MECHANISM_INVALID for a mechanism the group does not have.
CK_RV answer_mechanism_list(const MechanismList& mechanisms, CK_MECHANISM_TYPE_PTR list,
                            CK_ULONG_PTR count) noexcept;
CK_RV answer_mechanism_info(const MechanismList& mechanisms, CK_MECHANISM_TYPE type,
                            CK_MECHANISM_INFO_PTR info) noexcept;

}  // namespace p11mux
