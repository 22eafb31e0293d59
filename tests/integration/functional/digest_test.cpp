// Digests: known answers, size queries, multi-part, operation state.
#include "support/crypto.h"
#include "support/doctest_ck.h"
#include "support/environment.h"
#include "support/fixture.h"

#include <algorithm>
#include <string>

using namespace p11test;

namespace {

// FIPS 180-2 test vectors.
const std::string kAbc = "abc";
const std::string kAbcSha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad";
const std::string kLong = "abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq";
const std::string kLongSha256 = "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1";
const std::string kEmptySha256 = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

CK_MECHANISM sha256{CKM_SHA256, nullptr, 0};

}  // namespace

TEST_CASE_FIXTURE(SessionFixture, "SHA-256 known answers") {
  CHECK(to_hex(digest(p11, session, CKM_SHA256, to_bytes(kAbc))) == kAbcSha256);
  CHECK(to_hex(digest(p11, session, CKM_SHA256, to_bytes(kLong))) == kLongSha256);
  CHECK(to_hex(digest(p11, session, CKM_SHA256, {})) == kEmptySha256);
  CHECK(to_hex(digest(p11, session, CKM_SHA_1, to_bytes(kAbc))) ==
        "a9993e364706816aba3e25717850c26c9cd0d89d");
}

TEST_CASE_FIXTURE(SessionFixture,
                  "C_Digest: size query and a too small buffer keep the operation") {
  Bytes data = to_bytes(kAbc);
  REQUIRE_RV(p11.C_DigestInit(session, &sha256), CKR_OK);

  CK_ULONG length = 0;
  REQUIRE_RV(p11.C_Digest(session, data.data(), data.size(), nullptr, &length), CKR_OK);
  CHECK(length == 32);

  Bytes out(64, 0);
  length = 16;
  REQUIRE_RV(p11.C_Digest(session, data.data(), data.size(), out.data(), &length),
             CKR_BUFFER_TOO_SMALL);
  CHECK(length == 32);

  length = out.size();
  REQUIRE_RV(p11.C_Digest(session, data.data(), data.size(), out.data(), &length), CKR_OK);
  REQUIRE(length == 32);
  out.resize(length);
  CHECK(to_hex(out) == kAbcSha256);

  // The successful call ended the operation.
  length = 32;
  CHECK_RV(p11.C_Digest(session, data.data(), data.size(), out.data(), &length),
           CKR_OPERATION_NOT_INITIALIZED);
}

TEST_CASE_FIXTURE(SessionFixture, "multi-part SHA-256 equals single-part") {
  Bytes data = to_bytes(kLong);
  REQUIRE_RV(p11.C_DigestInit(session, &sha256), CKR_OK);
  // Parts of 0, 1, 2, 3, ... bytes.
  std::size_t offset = 0;
  for (std::size_t part = 0; offset < data.size(); ++part) {
    const std::size_t size = std::min(part, data.size() - offset);
    REQUIRE_RV(p11.C_DigestUpdate(session, data.data() + offset, size), CKR_OK);
    offset += size;
  }
  CK_ULONG length = 0;
  REQUIRE_RV(p11.C_DigestFinal(session, nullptr, &length), CKR_OK);  // size query
  REQUIRE(length == 32);
  Bytes out(length);
  REQUIRE_RV(p11.C_DigestFinal(session, out.data(), &length), CKR_OK);
  CHECK(to_hex(out) == kLongSha256);

  // A larger input, fed in uneven parts, against the module's own single-part digest.
  Bytes big(10000);
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<CK_BYTE>(i * 7 + i / 256);
  const Bytes single = digest(p11, session, CKM_SHA256, big);
  REQUIRE_RV(p11.C_DigestInit(session, &sha256), CKR_OK);
  for (std::size_t at = 0; at < big.size(); at += 997) {
    REQUIRE_RV(
        p11.C_DigestUpdate(session, big.data() + at, std::min<std::size_t>(997, big.size() - at)),
        CKR_OK);
  }
  length = out.size();
  REQUIRE_RV(p11.C_DigestFinal(session, out.data(), &length), CKR_OK);
  CHECK(out == single);
}

TEST_CASE_FIXTURE(SessionFixture, "digest operation state: not initialized, already active") {
  Bytes data = to_bytes(kAbc);
  CHECK_RV(p11.C_DigestUpdate(session, data.data(), data.size()), CKR_OPERATION_NOT_INITIALIZED);

  REQUIRE_RV(p11.C_DigestInit(session, &sha256), CKR_OK);
  CHECK_RV(p11.C_DigestInit(session, &sha256), CKR_OPERATION_ACTIVE);
  // The refused C_DigestInit left the first operation intact.
  REQUIRE_RV(p11.C_DigestUpdate(session, data.data(), data.size()), CKR_OK);
  Bytes out(32);
  CK_ULONG length = out.size();
  REQUIRE_RV(p11.C_DigestFinal(session, out.data(), &length), CKR_OK);
  CHECK(to_hex(out) == kAbcSha256);
}

// SoftHSM2 keeps a digest active after C_DigestKey fails with
// CKR_KEY_HANDLE_INVALID, where the spec says the error ends it. Through
// p11mux the next session (on the same pooled backend session) must still
// start from nothing: its own digest, of its own data (issue 10, defect 2).
// Run in both session modes; directly, the second session is a new one anyway.
TEST_CASE("an operation an error left active does not reach the next session") {
  for (std::string mode : {"serialize", "multiplex"}) {
    CAPTURE(mode);
    ScopedEnv session_mode("P11MUX_SESSION_MODE", mode);
    TokenFixture f;
    const Bytes previous = to_bytes("the previous session's data");
    {
      Session first(f.p11, f.slot, Access::read_only);
      REQUIRE_RV(f.p11.C_DigestInit(first, &sha256), CKR_OK);
      REQUIRE_RV(
          f.p11.C_DigestUpdate(first, const_cast<CK_BYTE*>(previous.data()), previous.size()),
          CKR_OK);
      CHECK(f.p11.C_DigestKey(first, 0x7fffff) != CKR_OK);
    }
    Session next(f.p11, f.slot, Access::read_only);
    CHECK_RV(f.p11.C_DigestInit(next, &sha256), CKR_OK);
    Bytes data = to_bytes(kAbc);
    REQUIRE_RV(f.p11.C_DigestUpdate(next, data.data(), data.size()), CKR_OK);
    Bytes out(32, 0);
    CK_ULONG length = out.size();
    REQUIRE_RV(f.p11.C_DigestFinal(next, out.data(), &length), CKR_OK);
    out.resize(length);
    CHECK(to_hex(out) == kAbcSha256);
  }
}
