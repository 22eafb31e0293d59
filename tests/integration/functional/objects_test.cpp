// Objects: search by label, attributes, destruction, and object lifetimes.
#include "support/objects.h"
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/fixture.h"

#include <algorithm>
#include <vector>

using namespace p11test;

namespace {

std::vector<CK_OBJECT_HANDLE> find_by_label(const CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE session,
                                            std::string_view label, CK_ULONG batch = 16) {
  Template match;
  match.add_string(CKA_LABEL, label);
  return find_objects(p11, session, match, batch);
}

std::vector<CK_OBJECT_HANDLE> sorted(std::vector<CK_OBJECT_HANDLE> handles) {
  std::sort(handles.begin(), handles.end());
  return handles;
}

}  // namespace

TEST_CASE_FIXTURE(LoggedInFixture, "find objects by label") {
  const CK_OBJECT_HANDLE a1 = create_data_object(p11, session, "find-a", "1", Lifetime::session);
  const CK_OBJECT_HANDLE a2 = create_data_object(p11, session, "find-a", "2", Lifetime::token);
  const CK_OBJECT_HANDLE b = create_data_object(p11, session, "find-b", "3", Lifetime::session);
  const CK_OBJECT_HANDLE key = generate_aes(p11, session, 32, "find-a");

  CHECK(sorted(find_by_label(p11, session, "find-a")) == sorted({a1, a2, key}));
  CHECK(sorted(find_by_label(p11, session, "find-a", 1)) == sorted({a1, a2, key}));
  CHECK(find_by_label(p11, session, "find-b") == std::vector{b});
  CHECK(find_by_label(p11, session, "find-c").empty());
  CHECK(find_by_label(p11, session, "find-").empty());  // whole-value match, not prefix

  Template data_a;
  data_a.add_string(CKA_LABEL, "find-a").add_ulong(CKA_CLASS, CKO_DATA);
  CHECK(sorted(find_objects(p11, session, data_a)) == sorted({a1, a2}));
  Template token_data_a = data_a;
  token_data_a.add_bool(CKA_TOKEN, true);
  CHECK(find_objects(p11, session, token_data_a) == std::vector{a2});
  Template secret_keys;
  secret_keys.add_ulong(CKA_CLASS, CKO_SECRET_KEY);
  CHECK(find_objects(p11, session, secret_keys) == std::vector{key});
}

TEST_CASE_FIXTURE(LoggedInFixture, "find operation state") {
  CK_OBJECT_HANDLE found[4];
  CK_ULONG count = 99;
  CHECK_RV(p11.C_FindObjects(session, found, 4, &count), CKR_OPERATION_NOT_INITIALIZED);
  CHECK_RV(p11.C_FindObjectsFinal(session), CKR_OPERATION_NOT_INITIALIZED);

  create_data_object(p11, session, "find-state", "x", Lifetime::session);
  Template match;
  match.add_string(CKA_LABEL, "find-state");
  REQUIRE_RV(p11.C_FindObjectsInit(session, match.data(), match.size()), CKR_OK);
  CHECK_RV(p11.C_FindObjectsInit(session, match.data(), match.size()), CKR_OPERATION_ACTIVE);
  REQUIRE_RV(p11.C_FindObjects(session, found, 4, &count), CKR_OK);
  CHECK(count == 1);
  REQUIRE_RV(p11.C_FindObjects(session, found, 4, &count), CKR_OK);
  CHECK(count == 0);
  REQUIRE_RV(p11.C_FindObjectsFinal(session), CKR_OK);
  CHECK_RV(p11.C_FindObjects(session, found, 4, &count), CKR_OPERATION_NOT_INITIALIZED);
}

TEST_CASE_FIXTURE(LoggedInFixture, "get and set attribute values") {
  const CK_OBJECT_HANDLE object =
      create_data_object(p11, session, "attributes", "hello", Lifetime::session);

  // Size query, then the value.
  CK_ATTRIBUTE value{CKA_VALUE, nullptr, 0};
  REQUIRE_RV(p11.C_GetAttributeValue(session, object, &value, 1), CKR_OK);
  CHECK(value.ulValueLen == 5);
  CHECK(attribute_string(p11, session, object, CKA_VALUE) == "hello");
  CHECK(attribute_string(p11, session, object, CKA_LABEL) == "attributes");
  CHECK(attribute_ulong(p11, session, object, CKA_CLASS) == CKO_DATA);

  // A buffer too small.
  CK_BYTE small[2];
  value = {CKA_VALUE, small, sizeof small};
  CHECK_RV(p11.C_GetAttributeValue(session, object, &value, 1), CKR_BUFFER_TOO_SMALL);
  CHECK(value.ulValueLen == CK_UNAVAILABLE_INFORMATION);

  // An attribute a data object does not have; the other attributes are still returned.
  CK_BYTE label[32];
  CK_BYTE modulus[32];
  CK_ATTRIBUTE mixed[] = {{CKA_LABEL, label, sizeof label}, {CKA_MODULUS, modulus, sizeof modulus}};
  CHECK_RV(p11.C_GetAttributeValue(session, object, mixed, 2), CKR_ATTRIBUTE_TYPE_INVALID);
  CHECK(mixed[0].ulValueLen == 10);
  CHECK(std::string(label, label + 10) == "attributes");
  CHECK(mixed[1].ulValueLen == CK_UNAVAILABLE_INFORMATION);

  // Set.
  Template update;
  update.add_string(CKA_LABEL, "renamed");
  REQUIRE_RV(p11.C_SetAttributeValue(session, object, update.data(), update.size()), CKR_OK);
  CHECK(attribute_string(p11, session, object, CKA_LABEL) == "renamed");
  CHECK(attribute_string(p11, session, object, CKA_VALUE) == "hello");
  CHECK(find_by_label(p11, session, "renamed") == std::vector{object});
  CHECK(find_by_label(p11, session, "attributes").empty());

  Template class_change;
  class_change.add_ulong(CKA_CLASS, CKO_SECRET_KEY);
  CHECK_RV(p11.C_SetAttributeValue(session, object, class_change.data(), class_change.size()),
           CKR_ATTRIBUTE_READ_ONLY);
  CHECK(attribute_ulong(p11, session, object, CKA_CLASS) == CKO_DATA);
}

TEST_CASE_FIXTURE(LoggedInFixture, "destroyed objects are gone") {
  const CK_OBJECT_HANDLE session_object =
      create_data_object(p11, session, "doomed", "s", Lifetime::session);
  const CK_OBJECT_HANDLE token_object =
      create_data_object(p11, session, "doomed", "t", Lifetime::token);
  const KeyPair pair = generate_ec_p256(p11, session, "doomed");
  REQUIRE(find_by_label(p11, session, "doomed").size() == 4);

  for (CK_OBJECT_HANDLE object :
       {session_object, token_object, pair.public_key, pair.private_key}) {
    CAPTURE(object);
    REQUIRE_RV(p11.C_DestroyObject(session, object), CKR_OK);
    CK_ATTRIBUTE label{CKA_LABEL, nullptr, 0};
    CHECK_RV(p11.C_GetAttributeValue(session, object, &label, 1), CKR_OBJECT_HANDLE_INVALID);
    CHECK_RV(p11.C_DestroyObject(session, object), CKR_OBJECT_HANDLE_INVALID);
  }
  CHECK(find_by_label(p11, session, "doomed").empty());
}

TEST_CASE_FIXTURE(LoggedInFixture, "session objects end with their session, token objects stay") {
  CK_OBJECT_HANDLE ephemeral = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE persistent = CK_INVALID_HANDLE;
  {
    Session other(p11, slot, Access::read_write);
    ephemeral = create_data_object(p11, other, "ephemeral", "e", Lifetime::session);
    persistent = create_data_object(p11, other, "persistent", "p", Lifetime::token);
    // Visible from every session of the application while their session lives.
    CHECK(find_by_label(p11, session, "ephemeral") == std::vector{ephemeral});
    CHECK(find_by_label(p11, session, "persistent") == std::vector{persistent});
  }
  CHECK(find_by_label(p11, session, "ephemeral").empty());
  CK_ATTRIBUTE label{CKA_LABEL, nullptr, 0};
  CHECK_RV(p11.C_GetAttributeValue(session, ephemeral, &label, 1), CKR_OBJECT_HANDLE_INVALID);
  CHECK(find_by_label(p11, session, "persistent") == std::vector{persistent});
  CHECK(attribute_string(p11, session, persistent, CKA_VALUE) == "p");
}

TEST_CASE_FIXTURE(LoggedInFixture, "a read-only session cannot create token objects") {
  Session read_only(p11, slot, Access::read_only);
  Template object;
  object.add_ulong(CKA_CLASS, CKO_DATA).add_bool(CKA_TOKEN, true).add_string(CKA_LABEL, "ro");
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  CHECK_RV(p11.C_CreateObject(read_only, object.data(), object.size(), &handle),
           CKR_SESSION_READ_ONLY);
  CHECK(find_by_label(p11, session, "ro").empty());
}
