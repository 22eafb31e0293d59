#include "replicated_tokens.h"

#include "ck_error.h"
#include "crypto.h"
#include "environment.h"
#include "fixture.h"
#include "objects.h"
#include "slots.h"

#include <algorithm>
#include <stdexcept>

namespace p11test {
namespace {

// Fixed test keys, made once with OpenSSL 3.0 (`openssl ecparam -name prime256v1
// -genkey`, `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048`) and
// dumped with `openssl pkey -text`. Test material only: never use them for anything else.
constexpr std::string_view kEcPrivateValue =
    "7edd4177f21be5213b08edec9ccda1d4c87cb4462e53e87399a342c854720cb6";
// 04 || X || Y, uncompressed.
constexpr std::string_view kEcPoint =
    "043c42079b6856a6853190970e716625aa8e92f7d76366837ed0b2e8c822f979"
    "1ce9178efb91af10688892333f11540969d17bdb72ad902158711e6ba4331c1d"
    "46";
// Public exponent 65537.
// 256 bytes
constexpr std::string_view kRsaModulus =
    "b5705cd970eaf097615ebd7151d4c24668b7c964c74ec6fcfe4006cf2c65567d"
    "1cda02f66c16bf2c022780d9d1b5401ed6ad1506d5e6faf466de9331ea606c24"
    "e712dd7cb2df1117b8b7ab930159c4908304644f618c80fbf0a72a153d598750"
    "273dfe8372d25bbc57379c3299ddeaaef750b3fd8a9ffd01e192b62ed1281c33"
    "99b4bfb7aa54a95ca92bd96c09693f429fa529a55747c653be4ea2c9e1f2c5de"
    "bd4d3994aab6c6e059fe93c9d157966933e78589d228fa3f5715ceb6a18779af"
    "0fc60faea3188b36487a578845758d2928f5ce4b488bebbaa1c35cf8ec1221f2"
    "edc53f4799ae616fa84d361cf35f3097dc68d16bd5a77d411e6a646ec7a9dc67";
// 256 bytes
constexpr std::string_view kRsaPrivateExponent =
    "0f34049bb5c201f9f54f3e7985dd599013cb3ea562abffb1884e6e23a2f934d7"
    "93f8d2a1ba69e787f50041643f15bc733912d4bdb763bce888cc22b25e8cc8d3"
    "08c7c46664089c028c585b989c56dcc92d294b8c794490344c347daabcf2c90b"
    "56d67382a936e637f068f8fe2675796a42cff0dd10661a89b3509b526df539f3"
    "96abb152b027e487a283c1acb0771785add061edd176bdd90e5785460577e0a9"
    "e6f8a740346e6532a8a3aac54e4a0279f8ac861c62469de867983a34bf27b9a1"
    "aac1219eae0b285a494a094c53c9060711a605031e8e0aea2d6764a45e937a35"
    "6608d69e2f59844019a738aa29042b38f8105597636ba4cb6a2e5ff7e5257be9";
// 128 bytes
constexpr std::string_view kRsaPrime1 =
    "ec0030fa1a0a732c00efeb39460ce1bc93cab64b645d5a5ed13dd2d328a2c90c"
    "64e4d50a734eab7781557a1685ab548fe19739a7ecc6c4ee68c17135e4892229"
    "dabf4b7def644415f35dcd7f2d2b95f5e072715cee18af86a1998bea2f417a4f"
    "19120250f4861876146b907779568c9616453944648fee7f2deb66553b8e8c4f";
// 128 bytes
constexpr std::string_view kRsaPrime2 =
    "c4d0814c011fb017f2a404bd8972e1d5b32f18bdab31203c6dae06456d1ef098"
    "46e67b9358505f6c061ee831a050c803d46667345e1f777d19d740cf9f1ceed2"
    "8d06bfb9489bab2b89907f04500ce7c9f7531b3d939e73753a1b0967e81b46b4"
    "645d3ebbdcab5e69dc436f8d63ebf5b29aa771d8eff5c5f331241ad3af84b069";
// 128 bytes
constexpr std::string_view kRsaExponent1 =
    "318a14bddb4b88439b6ac168c3609ede13f4007230fe3ba31daf299b33b3801a"
    "7eef5e1d1479561afee62f7b9cd18b2dacc02ed52629cf5af05872e84a31d31f"
    "101109cac4beba601537029508a95690476e1e87d05f143161a8b6ab110260a7"
    "4beef0d7878cc283bee3996ecae4b51c284e9da7d2a837fb306b728ebfb2bb97";
// 128 bytes
constexpr std::string_view kRsaExponent2 =
    "6d9f51151b5f21ff04b814a7d961f2a5cbcb04b5c81f71bc16bf22611319739a"
    "ed8abcf3e1f1ca6469b8574e24e439b3e05f3546b6d242049d1b06cf5de988a0"
    "1fcacd890f071dbcff3f4b7004825bac63a4977ca1b754c9cb967993b57553d9"
    "70397b92b9a37dcfeace68d8d0fa017cfca51d455eca7efa28b9da7363c4bd59";
// 128 bytes
constexpr std::string_view kRsaCoefficient =
    "9021f06e52dd36120502b683b1382deac5d7b9b227c08bf9cb5c92ab951fc43b"
    "0f46cc4da0e553c96792d33aca5bf3eb92709cb9e3eff10cdb0135473c6d94bb"
    "119bcc42f6a1b19ebdf440e28e33c122f31255437998eebadb7a254dd5824460"
    "50f899258df78c96bce1c08d4eb64f3c2741f231e2e0ba59849b16aed40add93";

const Bytes kPublicExponent{0x01, 0x00, 0x01};

// CKA_EC_POINT is the DER encoding of the point: an OCTET STRING around it.
Bytes der_octet_string(const Bytes& content) {
  Bytes der(2 + content.size());
  der[0] = 0x04;
  der[1] = static_cast<CK_BYTE>(content.size());  // short form: < 128 bytes
  std::copy(content.begin(), content.end(), der.begin() + 2);
  return der;
}

// The attributes both objects of a pair carry.
Template key_object(CK_OBJECT_CLASS cls, const ReplicaKey& key) {
  Template t;
  t.add_ulong(CKA_CLASS, cls)
      .add_ulong(CKA_KEY_TYPE, key.type)
      .add_bool(CKA_TOKEN, true)
      .add_bytes(CKA_ID, replica_id(key))
      .add_string(CKA_LABEL, key.label);
  return t;
}

// As an HSM's cloned keys would be: private, sensitive, never extractable.
Template private_key(const ReplicaKey& key) {
  Template t = key_object(CKO_PRIVATE_KEY, key);
  t.add_bool(CKA_PRIVATE, true)
      .add_bool(CKA_SENSITIVE, true)
      .add_bool(CKA_EXTRACTABLE, false)
      .add_bool(CKA_SIGN, true);
  return t;
}

Template public_key(const ReplicaKey& key) {
  Template t = key_object(CKO_PUBLIC_KEY, key);
  t.add_bool(CKA_PRIVATE, false).add_bool(CKA_VERIFY, true);
  return t;
}

void create(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session, Template& object,
            const char* what) {
  CK_OBJECT_HANDLE handle = CK_INVALID_HANDLE;
  ck_check(fn.C_CreateObject(session, object.data(), object.size(), &handle), what);
}

std::string softhsm2_module() {
  return env_or("P11MUX_TEST_SOFTHSM2_MODULE", "/usr/lib/softhsm/libsofthsm2.so");
}

}  // namespace

Bytes replica_ec_point() { return der_octet_string(from_hex(kEcPoint)); }
Bytes replica_rsa_modulus() { return from_hex(kRsaModulus); }
Bytes replica_id(const ReplicaKey& key) { return to_bytes(key.id); }

void import_replica_keys(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session) {
  Template ec_private = private_key(kReplicaEc);
  ec_private.add_bytes(CKA_EC_PARAMS, kPrime256v1Params)
      .add_bytes(CKA_VALUE, from_hex(kEcPrivateValue));
  create(fn, session, ec_private, "C_CreateObject(EC private key)");
  Template ec_public = public_key(kReplicaEc);
  ec_public.add_bytes(CKA_EC_PARAMS, kPrime256v1Params).add_bytes(CKA_EC_POINT, replica_ec_point());
  create(fn, session, ec_public, "C_CreateObject(EC public key)");

  // RSA keys also encrypt and decrypt, for single-part operations other than signing.
  Template rsa_private = private_key(kReplicaRsa);
  rsa_private.add_bool(CKA_DECRYPT, true)
      .add_bytes(CKA_MODULUS, replica_rsa_modulus())
      .add_bytes(CKA_PUBLIC_EXPONENT, kPublicExponent)
      .add_bytes(CKA_PRIVATE_EXPONENT, from_hex(kRsaPrivateExponent))
      .add_bytes(CKA_PRIME_1, from_hex(kRsaPrime1))
      .add_bytes(CKA_PRIME_2, from_hex(kRsaPrime2))
      .add_bytes(CKA_EXPONENT_1, from_hex(kRsaExponent1))
      .add_bytes(CKA_EXPONENT_2, from_hex(kRsaExponent2))
      .add_bytes(CKA_COEFFICIENT, from_hex(kRsaCoefficient));
  create(fn, session, rsa_private, "C_CreateObject(RSA private key)");
  Template rsa_public = public_key(kReplicaRsa);
  rsa_public.add_bool(CKA_ENCRYPT, true)
      .add_bytes(CKA_MODULUS, replica_rsa_modulus())
      .add_bytes(CKA_PUBLIC_EXPONENT, kPublicExponent);
  create(fn, session, rsa_public, "C_CreateObject(RSA public key)");
}

ReplicatedTokens::ReplicatedTokens(std::size_t count)
    : store_(std::string(kReplicaLabelPrefix) + "1") {
  if (count == 0) throw std::invalid_argument("ReplicatedTokens: no tokens");
  labels_.push_back(store_.label());
  for (std::size_t i = 2; i <= count; ++i) {
    labels_.push_back(kReplicaLabelPrefix + std::to_string(i));
    store_.add_token(labels_.back());
  }
  // SoftHSM2 itself, whatever the module under test is: the keys are provisioned
  // beside it, as a vendor's cloning would.
  Module softhsm(softhsm2_module());
  const CK_FUNCTION_LIST& fn = softhsm.fn();
  for (const std::string& label : labels_) {
    const CK_SLOT_ID slot = require_slot_by_label(fn, label);
    CK_TOKEN_INFO info{};
    ck_check(fn.C_GetTokenInfo(slot, &info), "C_GetTokenInfo");
    serials_.push_back(unpad(info.serialNumber));
    Session session(fn, slot, Access::read_write);
    ck_check(login_user(fn, session, kUserPin), "C_Login");
    import_replica_keys(fn, session);
  }
}

std::vector<CK_SLOT_ID> replica_slots(const CK_FUNCTION_LIST& fn, const ReplicatedTokens& tokens) {
  std::vector<CK_SLOT_ID> slots;
  for (const std::string& label : tokens.labels()) {
    slots.push_back(require_slot_by_label(fn, label));
  }
  return slots;
}

std::vector<CK_OBJECT_HANDLE> find_replica_key(const CK_FUNCTION_LIST& fn,
                                               CK_SESSION_HANDLE session, CK_OBJECT_CLASS cls,
                                               const ReplicaKey& key) {
  Template match;
  match.add_ulong(CKA_CLASS, cls).add_bytes(CKA_ID, replica_id(key));
  return find_objects(fn, session, match);
}

CK_OBJECT_HANDLE require_replica_key(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                                     CK_OBJECT_CLASS cls, const ReplicaKey& key) {
  const auto found = find_replica_key(fn, session, cls, key);
  if (found.size() != 1) {
    throw std::runtime_error(std::string(key.label) + ": " + std::to_string(found.size()) +
                             " objects of class " + std::to_string(cls) + ", not one");
  }
  return found.front();
}

ReplicatedFixture::ReplicatedFixture(std::size_t count)
    : tokens(count),
      module(module_under_test()),
      p11(module.fn()),
      slots(replica_slots(p11, tokens)) {
  for (CK_SLOT_ID slot : slots) {
    Session& session = sessions.emplace_back(p11, slot, Access::read_write);
    ck_check(login_user(p11, session, kUserPin), "C_Login");
  }
}

}  // namespace p11test
