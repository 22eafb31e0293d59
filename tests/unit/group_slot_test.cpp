// Unit tests for proxy/group/group_slot: a group's slot info, token info and
// mechanisms synthesized from its members' (README.md of proxy/group/, each
// rule), and the matching of a member's token.
#include "group/group_slot.hpp"

#include <p11mux/version.h>

#include <doctest/doctest.h>

#include <cstring>
#include <string>
#include <vector>

namespace p11mux {
namespace {

template <std::size_t N>
std::string text(const CK_UTF8CHAR (&field)[N]) {
  return std::string(reinterpret_cast<const char*>(field), N);
}

std::string padded(std::string_view s, std::size_t n) {
  std::string out(s);
  out.resize(n, ' ');
  return out;
}

CK_TOKEN_INFO token(std::string_view label = "member", CK_FLAGS flags = 0) {
  CK_TOKEN_INFO t{};
  std::memset(t.label, ' ', sizeof t.label);
  std::memcpy(t.label, label.data(), label.size());
  std::memset(t.manufacturerID, ' ', sizeof t.manufacturerID);
  std::memset(t.model, ' ', sizeof t.model);
  std::memset(t.serialNumber, ' ', sizeof t.serialNumber);
  std::memcpy(t.utcTime, "2026120222000000", 16);
  t.flags = flags;
  t.ulMaxSessionCount = 16;
  t.ulSessionCount = 1;
  t.ulMaxRwSessionCount = 16;
  t.ulRwSessionCount = 0;
  t.ulMaxPinLen = 64;
  t.ulMinPinLen = 4;
  t.ulTotalPublicMemory = t.ulFreePublicMemory = CK_UNAVAILABLE_INFORMATION;
  t.ulTotalPrivateMemory = t.ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
  t.hardwareVersion = {2, 0};
  t.firmwareVersion = {7, 1};
  return t;
}

CK_SLOT_INFO slot(CK_FLAGS flags) {
  CK_SLOT_INFO s{};
  s.flags = flags;
  return s;
}

constexpr CK_FLAGS kUsual = CKF_RNG | CKF_LOGIN_REQUIRED | CKF_USER_PIN_INITIALIZED |
                            CKF_TOKEN_INITIALIZED | CKF_RESTORE_KEY_NOT_NEEDED;

}  // namespace

TEST_CASE("a member's token: by label or serial, without the padding, blanks or NULs") {
  CK_TOKEN_INFO t = token("signing key");
  std::memcpy(t.serialNumber, "4711", 4);
  const GroupMember by_label{"hsm1", GroupMember::By::label, "signing key"};
  const GroupMember by_serial{"hsm1", GroupMember::By::serial, "4711"};
  CHECK(member_token_matches(by_label, t));
  CHECK(member_token_matches(by_serial, t));
  CHECK_FALSE(member_token_matches({"hsm1", GroupMember::By::label, "4711"}, t));
  CHECK_FALSE(member_token_matches({"hsm1", GroupMember::By::serial, "signing key"}, t));
  CHECK_FALSE(member_token_matches({"hsm1", GroupMember::By::label, "signing"}, t));
  // NUL padding, as some modules write it.
  std::memset(t.label, 0, sizeof t.label);
  std::memcpy(t.label, "signing key", 11);
  CHECK(member_token_matches(by_label, t));
  // A label that fills all 32 bytes.
  const std::string full(32, 'L');
  std::memcpy(t.label, full.data(), 32);
  CHECK(member_token_matches({"hsm1", GroupMember::By::label, full}, t));
}

TEST_CASE("slot info: the group's name, p11mux's, token present if any, hardware only if all") {
  const std::vector<MemberSlot> members{{slot(CKF_HW_SLOT | CKF_TOKEN_PRESENT), token()},
                                        {slot(CKF_HW_SLOT), std::nullopt}};
  CK_SLOT_INFO info = group_slot_info("signing", members);
  CHECK(text(info.slotDescription) == padded("signing", 64));
  CHECK(text(info.manufacturerID) == padded("p11mux", 32));
  CHECK(info.flags == (CKF_TOKEN_PRESENT | CKF_HW_SLOT));
  CHECK(info.hardwareVersion.major == 0);
  CHECK(info.hardwareVersion.minor == 0);
  CHECK(info.firmwareVersion.major == P11MUX_VERSION_MAJOR);
  CHECK(info.firmwareVersion.minor == P11MUX_VERSION_MINOR);

  SUBCASE("one member not a hardware slot: none") {
    const std::vector<MemberSlot> mixed{{slot(CKF_HW_SLOT), token()}, {slot(0), token()}};
    CHECK(group_slot_info("g", mixed).flags == CKF_TOKEN_PRESENT);
  }
  SUBCASE("no member with a token: no token") {
    const std::vector<MemberSlot> empty{{slot(CKF_HW_SLOT), std::nullopt},
                                        {slot(CKF_HW_SLOT | CKF_REMOVABLE_DEVICE), std::nullopt}};
    CHECK(group_slot_info("g", empty).flags == (CKF_HW_SLOT | CKF_REMOVABLE_DEVICE));
  }
  SUBCASE("any member removable: the group's token may go too") {
    const std::vector<MemberSlot> removable{{slot(0), token()},
                                            {slot(CKF_REMOVABLE_DEVICE), token()}};
    CHECK(group_slot_info("g", removable).flags == (CKF_TOKEN_PRESENT | CKF_REMOVABLE_DEVICE));
  }
  SUBCASE("no members (all down): no token, no hardware") {
    CHECK(group_slot_info("g", {}).flags == 0);
  }
}

TEST_CASE("token info: label, manufacturer, model, serial and versions are the group's") {
  const std::vector<CK_TOKEN_INFO> tokens{token("a", kUsual), token("b", kUsual)};
  const std::optional<CK_TOKEN_INFO> info = group_token_info("signing", tokens);
  REQUIRE(info);
  CHECK(text(info->label) == padded("signing", 32));
  CHECK(text(info->manufacturerID) == padded("p11mux", 32));
  CHECK(text(info->model) == padded("group", 16));
  CHECK(text(info->serialNumber) == group_serial("signing"));
  CHECK(info->hardwareVersion.major == 0);
  CHECK(info->firmwareVersion.major == P11MUX_VERSION_MAJOR);
  CHECK(info->firmwareVersion.minor == P11MUX_VERSION_MINOR);
  CHECK(std::string(reinterpret_cast<const char*>(info->utcTime), 16) == "2026120222000000");
  // A 32-byte name fills the label.
  CHECK(text(group_token_info(std::string(32, 'g'), tokens)->label) == std::string(32, 'g'));
}

TEST_CASE("the group's serial number: 16 hex digits, stable, distinct per name") {
  const std::string s = group_serial("signing");
  CHECK(s.size() == 16);
  CHECK(s.find_first_not_of("0123456789ABCDEF") == std::string::npos);
  CHECK(group_serial("signing") == s);
  CHECK(group_serial("signing2") != s);
  // FNV-1a 64 of the empty string: the offset basis, so the digits are the hash's.
  CHECK(group_serial("") == "CBF29CE484222325");
}

TEST_CASE("token flags: what every member can do, and any member's restrictions and warnings") {
  SUBCASE("all-member flags: set only if every member has them") {
    for (CK_FLAGS f :
         {CKF_RNG, CKF_USER_PIN_INITIALIZED, CKF_RESTORE_KEY_NOT_NEEDED, CKF_CLOCK_ON_TOKEN,
          CKF_PROTECTED_AUTHENTICATION_PATH, CKF_DUAL_CRYPTO_OPERATIONS, CKF_TOKEN_INITIALIZED,
          CKF_SECONDARY_AUTHENTICATION}) {
      CAPTURE(f);
      const std::vector<CK_TOKEN_INFO> both{token("a", f), token("b", f)};
      const std::vector<CK_TOKEN_INFO> one{token("a", f), token("b", 0)};
      CHECK(group_token_info("g", both)->flags == f);
      CHECK(group_token_info("g", one)->flags == 0);
    }
  }
  SUBCASE("any-member flags: set if one member has them") {
    for (CK_FLAGS f : {CKF_WRITE_PROTECTED, CKF_LOGIN_REQUIRED, CKF_USER_PIN_COUNT_LOW,
                       CKF_USER_PIN_FINAL_TRY, CKF_USER_PIN_LOCKED, CKF_USER_PIN_TO_BE_CHANGED,
                       CKF_SO_PIN_COUNT_LOW, CKF_SO_PIN_FINAL_TRY, CKF_SO_PIN_LOCKED,
                       CKF_SO_PIN_TO_BE_CHANGED, CK_FLAGS{1} << 24 /* v3.0 CKF_ERROR_STATE */}) {
      CAPTURE(f);
      const std::vector<CK_TOKEN_INFO> one{token("a", 0), token("b", f)};
      const std::vector<CK_TOKEN_INFO> none{token("a", 0), token("b", 0)};
      CHECK(group_token_info("g", one)->flags == f);
      CHECK(group_token_info("g", none)->flags == 0);
    }
  }
  SUBCASE("flags outside the table (unknown, vendor bits) are not passed on") {
    const CK_FLAGS unknown = (CK_FLAGS{1} << 4) | (CK_FLAGS{1} << 7) | (CK_FLAGS{1} << 30);
    const std::vector<CK_TOKEN_INFO> one{token("a", unknown | CKF_RNG)};
    CHECK(group_token_info("g", one)->flags == CKF_RNG);
  }
  SUBCASE("one member: its flags, less the unknown ones") {
    const std::vector<CK_TOKEN_INFO> one{token("a", kUsual | CKF_USER_PIN_COUNT_LOW)};
    CHECK(group_token_info("g", one)->flags == (kUsual | CKF_USER_PIN_COUNT_LOW));
  }
}

TEST_CASE("token info: no token among the members: none (CKR_TOKEN_NOT_PRESENT)") {
  CHECK_FALSE(group_token_info("g", {}).has_value());
}

TEST_CASE("session counts and limits: summed, with the special values") {
  CK_TOKEN_INFO a = token("a"), b = token("b");
  a.ulSessionCount = 3;
  a.ulRwSessionCount = 1;
  b.ulSessionCount = 4;
  b.ulRwSessionCount = 2;
  a.ulMaxSessionCount = 16;
  b.ulMaxSessionCount = 32;
  a.ulMaxRwSessionCount = 8;
  b.ulMaxRwSessionCount = 8;
  std::vector<CK_TOKEN_INFO> tokens{a, b};
  CK_TOKEN_INFO info = *group_token_info("g", tokens);
  CHECK(info.ulSessionCount == 7);
  CHECK(info.ulRwSessionCount == 3);
  CHECK(info.ulMaxSessionCount == 48);
  CHECK(info.ulMaxRwSessionCount == 16);

  SUBCASE("one member without a limit: the group has none") {
    tokens[1].ulMaxSessionCount = CK_EFFECTIVELY_INFINITE;
    tokens[0].ulMaxRwSessionCount = CK_UNAVAILABLE_INFORMATION;
    tokens[1].ulMaxRwSessionCount = CK_EFFECTIVELY_INFINITE;
    info = *group_token_info("g", tokens);
    CHECK(info.ulMaxSessionCount == CK_EFFECTIVELY_INFINITE);
    CHECK(info.ulMaxRwSessionCount == CK_EFFECTIVELY_INFINITE);  // infinite beats unknown
  }
  SUBCASE("one member that does not say: unknown") {
    tokens[0].ulMaxSessionCount = CK_UNAVAILABLE_INFORMATION;
    tokens[1].ulSessionCount = CK_UNAVAILABLE_INFORMATION;
    info = *group_token_info("g", tokens);
    CHECK(info.ulMaxSessionCount == CK_UNAVAILABLE_INFORMATION);
    CHECK(info.ulSessionCount == CK_UNAVAILABLE_INFORMATION);
    CHECK(info.ulRwSessionCount == 3);
  }
  SUBCASE("a sessions-open count of 0 is zero, not infinite") {
    tokens[0].ulSessionCount = 0;
    tokens[1].ulSessionCount = 0;
    CHECK(group_token_info("g", tokens)->ulSessionCount == 0);
  }
  SUBCASE("a sum that would reach the special values saturates below them") {
    tokens[0].ulMaxSessionCount = CK_UNAVAILABLE_INFORMATION - 1;
    tokens[1].ulMaxSessionCount = 5;
    CHECK(group_token_info("g", tokens)->ulMaxSessionCount == CK_UNAVAILABLE_INFORMATION - 1);
  }
  SUBCASE("one member: its own figures") {
    info = *group_token_info("g", std::span(tokens).first(1));
    CHECK(info.ulSessionCount == 3);
    CHECK(info.ulMaxSessionCount == 16);
  }
}

TEST_CASE("memory: the least of the members (objects are on every one), unknown if any is") {
  CK_TOKEN_INFO a = token("a"), b = token("b");
  a.ulTotalPublicMemory = 1000;
  b.ulTotalPublicMemory = 800;
  a.ulFreePublicMemory = 100;
  b.ulFreePublicMemory = 300;
  a.ulTotalPrivateMemory = 1000;
  b.ulTotalPrivateMemory = CK_UNAVAILABLE_INFORMATION;
  a.ulFreePrivateMemory = CK_UNAVAILABLE_INFORMATION;
  b.ulFreePrivateMemory = 5;
  const std::vector<CK_TOKEN_INFO> tokens{a, b};
  const CK_TOKEN_INFO info = *group_token_info("g", tokens);
  CHECK(info.ulTotalPublicMemory == 800);
  CHECK(info.ulFreePublicMemory == 100);
  CHECK(info.ulTotalPrivateMemory == CK_UNAVAILABLE_INFORMATION);
  CHECK(info.ulFreePrivateMemory == CK_UNAVAILABLE_INFORMATION);
}

TEST_CASE("PIN lengths: the lengths every member takes") {
  CK_TOKEN_INFO a = token("a"), b = token("b");
  a.ulMinPinLen = 4;
  a.ulMaxPinLen = 255;
  b.ulMinPinLen = 6;
  b.ulMaxPinLen = 32;
  std::vector<CK_TOKEN_INFO> tokens{a, b};
  CK_TOKEN_INFO info = *group_token_info("g", tokens);
  CHECK(info.ulMinPinLen == 6);
  CHECK(info.ulMaxPinLen == 32);
  CHECK_FALSE(pin_range_empty(info));

  SUBCASE("a member that does not say sets no bound") {
    tokens[1].ulMaxPinLen = CK_UNAVAILABLE_INFORMATION;
    CHECK(group_token_info("g", tokens)->ulMaxPinLen == 255);
  }
  SUBCASE("ranges that do not meet: reported as found, and told apart") {
    tokens[1].ulMinPinLen = 8;
    tokens[0].ulMaxPinLen = 6;
    info = *group_token_info("g", tokens);
    CHECK(info.ulMinPinLen == 8);
    CHECK(info.ulMaxPinLen == 6);
    CHECK(pin_range_empty(info));
  }
}

// ---- mechanisms -------------------------------------------------------------------------

namespace {

CK_MECHANISM_INFO mech(CK_ULONG min, CK_ULONG max, CK_FLAGS flags) { return {min, max, flags}; }

bool same(const CK_MECHANISM_INFO& a, const CK_MECHANISM_INFO& b) {
  return a.ulMinKeySize == b.ulMinKeySize && a.ulMaxKeySize == b.ulMaxKeySize && a.flags == b.flags;
}

std::vector<CK_MECHANISM_TYPE> types(const MechanismList& list) {
  std::vector<CK_MECHANISM_TYPE> out;
  for (const Mechanism& m : list) out.push_back(m.type);
  return out;
}

}  // namespace

TEST_CASE("mechanism info: flags every member has, key sizes every member takes") {
  const std::vector<CK_MECHANISM_INFO> ec{mech(256, 521, CKF_SIGN | CKF_VERIFY | CKF_HW),
                                          mech(192, 384, CKF_SIGN | CKF_VERIFY)};
  const auto info = group_mechanism_info(ec);
  REQUIRE(info);
  CHECK(same(*info, mech(256, 384, CKF_SIGN | CKF_VERIFY)));

  SUBCASE("key sizes that do not meet: left out") {
    const std::vector<CK_MECHANISM_INFO> apart{mech(16, 32, CKF_ENCRYPT),
                                               mech(128, 256, CKF_ENCRYPT)};
    CHECK_FALSE(group_mechanism_info(apart).has_value());
  }
  SUBCASE("sizes that meet at one size are kept") {
    const std::vector<CK_MECHANISM_INFO> touch{mech(16, 32, CKF_ENCRYPT),
                                               mech(32, 64, CKF_ENCRYPT)};
    CHECK(same(*group_mechanism_info(touch), mech(32, 32, CKF_ENCRYPT)));
  }
  SUBCASE("a member with no key sizes (0, 0) sets none") {
    const std::vector<CK_MECHANISM_INFO> digest{mech(0, 0, CKF_DIGEST), mech(0, 0, CKF_DIGEST)};
    CHECK(same(*group_mechanism_info(digest), mech(0, 0, CKF_DIGEST)));
    const std::vector<CK_MECHANISM_INFO> one_says{mech(0, 0, CKF_SIGN), mech(2048, 4096, CKF_SIGN)};
    CHECK(same(*group_mechanism_info(one_says), mech(2048, 4096, CKF_SIGN)));
  }
  SUBCASE("no function every member can use it for: left out") {
    const std::vector<CK_MECHANISM_INFO> split{mech(1024, 4096, CKF_SIGN | CKF_HW),
                                               mech(1024, 4096, CKF_ENCRYPT | CKF_HW)};
    CHECK_FALSE(group_mechanism_info(split).has_value());
    // v3.0 message flags count as functions.
    const std::vector<CK_MECHANISM_INFO> message{mech(16, 32, CKF_MESSAGE_ENCRYPT),
                                                 mech(16, 32, CKF_MESSAGE_ENCRYPT | CKF_ENCRYPT)};
    CHECK(same(*group_mechanism_info(message), mech(16, 32, CKF_MESSAGE_ENCRYPT)));
  }
  SUBCASE("members that list no function at all: kept, as they say") {
    const std::vector<CK_MECHANISM_INFO> bare{mech(0, 0, 0), mech(0, 0, CKF_HW)};
    CHECK(same(*group_mechanism_info(bare), mech(0, 0, 0)));
  }
  SUBCASE("one member: its info") {
    const std::vector<CK_MECHANISM_INFO> one{mech(1, 2, CKF_DERIVE)};
    CHECK(same(*group_mechanism_info(one), mech(1, 2, CKF_DERIVE)));
  }
  SUBCASE("no members: nothing") { CHECK_FALSE(group_mechanism_info({}).has_value()); }
}

TEST_CASE("mechanism list: those every member has, in the first member's order") {
  const CK_FLAGS sv = CKF_SIGN | CKF_VERIFY;
  const MechanismList first{{CKM_ECDSA, mech(256, 521, sv)},
                            {CKM_SHA256, mech(0, 0, CKF_DIGEST)},
                            {CKM_RSA_PKCS, mech(1024, 4096, sv | CKF_ENCRYPT)},
                            {CKM_AES_CBC, mech(16, 32, CKF_ENCRYPT)},
                            {CKM_ECDSA, mech(1, 1, 0)}};  // listed twice: the first counts
  const MechanismList second{{CKM_AES_CBC, mech(128, 256, CKF_ENCRYPT)},  // bits: no overlap
                             {CKM_RSA_PKCS, mech(2048, 8192, sv)},
                             {CKM_ECDSA, mech(256, 384, sv | CKF_HW)},
                             {CKM_SHA256, mech(0, 0, CKF_DIGEST)},
                             {CKM_SHA384, mech(0, 0, CKF_DIGEST)}};
  const std::vector<MechanismList> members{first, second};
  const MechanismList group = intersect_mechanisms(members);
  CHECK(types(group) == std::vector<CK_MECHANISM_TYPE>{CKM_ECDSA, CKM_SHA256, CKM_RSA_PKCS});
  CHECK(same(group[0].info, mech(256, 384, sv)));
  CHECK(same(group[2].info, mech(2048, 4096, sv)));

  SUBCASE("one member: its list") {
    const std::vector<MechanismList> one{second};
    CHECK(types(intersect_mechanisms(one)) == types(second));
  }
  SUBCASE("nothing in common: an empty list") {
    const MechanismList other{{CKM_SHA512, mech(0, 0, CKF_DIGEST)}};
    const std::vector<MechanismList> apart{first, other};
    CHECK(intersect_mechanisms(apart).empty());
  }
  SUBCASE("a member with no mechanisms: none") {
    const std::vector<MechanismList> with_empty{first, MechanismList{}};
    CHECK(intersect_mechanisms(with_empty).empty());
  }
  SUBCASE("no members: none") { CHECK(intersect_mechanisms({}).empty()); }
}

TEST_CASE("C_GetMechanismList from the group's list: the spec's length rules") {
  const MechanismList group{{CKM_ECDSA, mech(256, 384, CKF_SIGN)},
                            {CKM_SHA256, mech(0, 0, CKF_DIGEST)},
                            {CKM_RSA_PKCS, mech(2048, 4096, CKF_SIGN)}};
  CK_ULONG n = 0;
  CHECK(answer_mechanism_list(group, nullptr, &n) == CKR_OK);
  CHECK(n == 3);
  CK_MECHANISM_TYPE list[4] = {};
  n = 2;
  CHECK(answer_mechanism_list(group, list, &n) == CKR_BUFFER_TOO_SMALL);
  CHECK(n == 3);
  n = 4;
  CHECK(answer_mechanism_list(group, list, &n) == CKR_OK);
  CHECK(n == 3);
  CHECK(list[0] == CKM_ECDSA);
  CHECK(list[1] == CKM_SHA256);
  CHECK(list[2] == CKM_RSA_PKCS);
  // An empty list: a count of 0, with or without a buffer.
  n = 5;
  CHECK(answer_mechanism_list({}, nullptr, &n) == CKR_OK);
  CHECK(n == 0);
  n = 4;
  CHECK(answer_mechanism_list({}, list, &n) == CKR_OK);
  CHECK(n == 0);
  CHECK(answer_mechanism_list(group, list, nullptr) == CKR_ARGUMENTS_BAD);
}

TEST_CASE("C_GetMechanismInfo from the group's list: CKR_MECHANISM_INVALID for the others") {
  const MechanismList group{{CKM_ECDSA, mech(256, 384, CKF_SIGN)}};
  CK_MECHANISM_INFO info{};
  CHECK(answer_mechanism_info(group, CKM_ECDSA, &info) == CKR_OK);
  CHECK(same(info, mech(256, 384, CKF_SIGN)));
  CHECK(answer_mechanism_info(group, CKM_AES_CBC, &info) == CKR_MECHANISM_INVALID);
  CHECK(answer_mechanism_info(group, CKM_ECDSA, nullptr) == CKR_ARGUMENTS_BAD);
}

}  // namespace p11mux
