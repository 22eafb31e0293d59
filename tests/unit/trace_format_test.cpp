// Unit tests for the trace record: name tables, mechanisms, templates with
// secrets masked, and the letter-driven argument formatting.
#include "observe/trace_format.hpp"
#include "observe/call_trace.hpp"

#include <p11mux/attribute_names.hpp>
#include <p11mux/mechanism_names.hpp>

#include <doctest/doctest.h>
#include <spdlog/sinks/ostream_sink.h>

#include <memory>
#include <sstream>
#include <vector>

namespace p11mux {
namespace {

std::string text_of(const TraceBuffer& b) { return std::string(b.data(), b.size()); }

std::string mechanism(const CK_MECHANISM& m) {
  TraceBuffer b;
  format_mechanism(b, &m);
  return text_of(b);
}

std::string attributes(std::vector<CK_ATTRIBUTE> t, bool values = true) {
  TraceBuffer b;
  format_template(b, t.data(), static_cast<CK_ULONG>(t.size()), values);
  return text_of(b);
}

// The trace record of one call, as the logger would write it (message only).
template <class F, class... A>
std::string record(const CallFacts& facts, const std::array<CK_ULONG, sizeof...(A)>& caps, A... a) {
  std::ostringstream out;
  auto sink = std::make_shared<spdlog::sinks::ostream_sink_st>(out);
  spdlog::logger log("test", sink);
  log.set_pattern("%v");
  log.set_level(spdlog::level::trace);
  write_trace<F>(log, facts, caps, a...);
  std::string s = out.str();
  if (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

TEST_CASE("name tables: current names, unknown values empty") {
  CHECK(mechanism_name(CKM_SHA256) == "CKM_SHA256");
  CHECK(mechanism_name(CKM_EC_KEY_PAIR_GEN) == "CKM_EC_KEY_PAIR_GEN");  // not the ECDSA alias
  CHECK(mechanism_name(CKM_AES_GCM) == "CKM_AES_GCM");
  CHECK(mechanism_name(CKM_VENDOR_DEFINED + 1).empty());
  CHECK(attribute_name(CKA_EC_PARAMS) == "CKA_EC_PARAMS");
  CHECK(attribute_name(CKA_WRAP_TEMPLATE) == "CKA_WRAP_TEMPLATE");
  CHECK(attribute_name(0x7777).empty());
  CHECK(object_class_name(CKO_PRIVATE_KEY) == "CKO_PRIVATE_KEY");
  CHECK(key_type_name(CKK_EC) == "CKK_EC");
}

TEST_CASE("mechanisms: name and a summary of known parameters, never their bytes") {
  CHECK(mechanism({CKM_SHA256, nullptr, 0}) == "CKM_SHA256");
  unsigned char iv[12] = {0xde, 0xad};
  unsigned char aad[5] = {};
  CK_GCM_PARAMS gcm{iv, 12, 96, aad, 5, 128};
  CHECK(mechanism({CKM_AES_GCM, &gcm, sizeof gcm}) ==
        "CKM_AES_GCM{iv 12 bytes, aad 5 bytes, tag 128 bits}");
  CK_RSA_PKCS_PSS_PARAMS pss{CKM_SHA256, CKG_MGF1_SHA256, 32};
  CHECK(mechanism({CKM_SHA256_RSA_PKCS_PSS, &pss, sizeof pss}) ==
        "CKM_SHA256_RSA_PKCS_PSS{hash CKM_SHA256, mgf CKG_MGF1_SHA256, salt 32 bytes}");
  unsigned char secret_param[16] = {0xab, 0xcd, 0xef};
  std::string cbc = mechanism({CKM_AES_CBC, secret_param, sizeof secret_param});
  CHECK(cbc == "CKM_AES_CBC{parameter 16 bytes}");
  // A PSS parameter of the wrong size is not read as a structure.
  CHECK(mechanism({CKM_RSA_PKCS_PSS, &pss, 3}) == "CKM_RSA_PKCS_PSS{parameter 3 bytes}");
  CHECK(mechanism({CKM_VENDOR_DEFINED + 0x42, nullptr, 0}) == "CKM_VENDOR_DEFINED+0x42");
  CHECK(mechanism({0x7ffffff0, nullptr, 0}) == "CKM_0x7ffffff0");
  TraceBuffer b;
  format_mechanism(b, nullptr);
  CHECK(text_of(b) == "NULL");
}

TEST_CASE("mechanism parameters: MGF, OAEP source and ECDH KDF by name, unknown values in hex") {
  CK_RSA_PKCS_PSS_PARAMS pss{CKM_SHA384, CKG_MGF1_SHA384, 48};
  CHECK(mechanism({CKM_RSA_PKCS_PSS, &pss, sizeof pss}) ==
        "CKM_RSA_PKCS_PSS{hash CKM_SHA384, mgf CKG_MGF1_SHA384, salt 48 bytes}");
  pss.mgf = CKG_MGF1_SHA3_256;
  CHECK(mechanism({CKM_RSA_PKCS_PSS, &pss, sizeof pss}) ==
        "CKM_RSA_PKCS_PSS{hash CKM_SHA384, mgf CKG_MGF1_SHA3_256, salt 48 bytes}");
  pss.mgf = 0x42;
  CHECK(mechanism({CKM_RSA_PKCS_PSS, &pss, sizeof pss}) ==
        "CKM_RSA_PKCS_PSS{hash CKM_SHA384, mgf CKG_0x42, salt 48 bytes}");
  unsigned char label[3] = {1, 2, 3};
  CK_RSA_PKCS_OAEP_PARAMS oaep{CKM_SHA256, CKG_MGF1_SHA256, CKZ_DATA_SPECIFIED, label,
                               sizeof label};
  CHECK(mechanism({CKM_RSA_PKCS_OAEP, &oaep, sizeof oaep}) ==
        "CKM_RSA_PKCS_OAEP{hash CKM_SHA256, mgf CKG_MGF1_SHA256, source CKZ_DATA_SPECIFIED, label "
        "3 bytes}");
  CK_RSA_PKCS_OAEP_PARAMS no_source{CKM_SHA_1, CKG_MGF1_SHA1, 0, nullptr, 0};
  CHECK(mechanism({CKM_RSA_PKCS_OAEP, &no_source, sizeof no_source}) ==
        "CKM_RSA_PKCS_OAEP{hash CKM_SHA_1, mgf CKG_MGF1_SHA1, source CKZ_0x0, label 0 bytes}");
  unsigned char point[65] = {0x04};
  CK_ECDH1_DERIVE_PARAMS ecdh{CKD_NULL, 0, nullptr, sizeof point, point};
  CHECK(mechanism({CKM_ECDH1_DERIVE, &ecdh, sizeof ecdh}) ==
        "CKM_ECDH1_DERIVE{kdf CKD_NULL, shared data 0 bytes, public data 65 bytes}");
  ecdh.kdf = CKD_SHA256_KDF;
  CHECK(mechanism({CKM_ECDH1_DERIVE, &ecdh, sizeof ecdh}) ==
        "CKM_ECDH1_DERIVE{kdf CKD_SHA256_KDF, shared data 0 bytes, public data 65 bytes}");
}

TEST_CASE("templates: types by name, public values shown, secrets masked") {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  CK_KEY_TYPE kt = CKK_AES;
  CK_BBOOL yes = CK_TRUE;
  CK_ULONG len = 32;
  char label[] = "k\"1";
  unsigned char id[] = {0x01, 0xff};
  unsigned char value[] = {0x5e, 0xc2, 0xe7};
  std::string t = attributes({{CKA_CLASS, &cls, sizeof cls},
                              {CKA_KEY_TYPE, &kt, sizeof kt},
                              {CKA_TOKEN, &yes, 1},
                              {CKA_VALUE_LEN, &len, sizeof len},
                              {CKA_LABEL, label, 3},
                              {CKA_ID, id, 2},
                              {CKA_VALUE, value, 3}});
  CHECK(t ==
        "{CKA_CLASS=CKO_SECRET_KEY, CKA_KEY_TYPE=CKK_AES, CKA_TOKEN=true, CKA_VALUE_LEN=32, "
        "CKA_LABEL=\"k\\\"1\", CKA_ID=01ff (2 bytes), CKA_VALUE=*** (3 bytes)}");
  CHECK(t.find("5ec2") == std::string::npos);
}

TEST_CASE("every documented secret attribute, unknown and vendor ones are masked") {
  unsigned char v[] = {0xa1, 0xb2, 0xc3, 0xd4};
  for (CK_ATTRIBUTE_TYPE type :
       {CKA_VALUE, CKA_PRIVATE_EXPONENT, CKA_PRIME_1, CKA_PRIME_2, CKA_EXPONENT_1, CKA_EXPONENT_2,
        CKA_COEFFICIENT, CKA_VENDOR_DEFINED + 1, 0x7777ul}) {
    CAPTURE(type);
    CHECK(attribute_is_secret(type));
    std::string t = attributes({{type, v, sizeof v}});
    CHECK(t.find("a1b2") == std::string::npos);
    CHECK(t.find("***") != std::string::npos);
  }
  CHECK_FALSE(attribute_is_secret(CKA_MODULUS));
  CHECK_FALSE(attribute_is_secret(CKA_LABEL));
}

TEST_CASE("nested templates are masked too; lists of mechanisms by name") {
  unsigned char key[] = {0x99, 0x88};
  CK_ATTRIBUTE inner[] = {{CKA_VALUE, key, sizeof key}};
  CK_MECHANISM_TYPE allowed[] = {CKM_SHA256, CKM_AES_GCM};
  std::string t = attributes({{CKA_WRAP_TEMPLATE, inner, sizeof inner},
                              {CKA_ALLOWED_MECHANISMS, allowed, sizeof allowed}});
  CHECK(t ==
        "{CKA_WRAP_TEMPLATE={CKA_VALUE=*** (2 bytes)}, CKA_ALLOWED_MECHANISMS=[CKM_SHA256, "
        "CKM_AES_GCM]}");
}

TEST_CASE("templates the call did not fill show lengths only") {
  unsigned char buf[8] = {0x42};
  CHECK(attributes({{CKA_ID, buf, 8}}, false) == "{CKA_ID [8 bytes]}");
  CHECK(attributes({{CKA_ID, nullptr, 8}}) == "{CKA_ID (8 bytes)}");
  CHECK(attributes({{CKA_ID, buf, CK_UNAVAILABLE_INFORMATION}}) == "{CKA_ID=unavailable}");
  CHECK(attributes({}) == "{}");
}

TEST_CASE("a PIN and its length are never written; a call's record reads well") {
  CK_UTF8CHAR pin[] = "S3cr3t-P1n";
  CallFacts facts{CKR_PIN_INCORRECT, 12345, 0, 0x5001};
  std::string r = record<fn::C_Login>(facts, {}, CK_SESSION_HANDLE{0x1000001},
                                      CK_USER_TYPE{CKU_USER}, pin, CK_ULONG{10});
  CHECK(r == "C_Login(0x1000001->0x5001, 1, ***) = CKR_PIN_INCORRECT [12.3 us]");
  CHECK(r.find("S3cr3t") == std::string::npos);
  CHECK(r.find(", 10") == std::string::npos);  // nor its length

  CK_UTF8CHAR new_pin[] = "N3w";
  r = record<fn::C_SetPIN>(CallFacts{}, {}, CK_SESSION_HANDLE{1}, pin, CK_ULONG{10}, new_pin,
                           CK_ULONG{3});
  CHECK(r == "C_SetPIN(0x1, ***, ***) = CKR_OK [0.0 us]");

  CK_UTF8CHAR label[32];
  std::fill(std::begin(label), std::end(label), ' ');
  std::copy_n("tok", 3, label);
  r = record<fn::C_InitToken>(CallFacts{}, {}, CK_SLOT_ID{0}, pin, CK_ULONG{10}, label);
  CHECK(r == "C_InitToken(0, ***, \"tok\") = CKR_OK [0.0 us]");
  r = record<fn::C_Login>(CallFacts{}, {}, CK_SESSION_HANDLE{1}, CK_USER_TYPE{CKU_USER},
                          static_cast<CK_UTF8CHAR_PTR>(nullptr), CK_ULONG{0});
  CHECK(r == "C_Login(0x1, 1, NULL) = CKR_OK [0.0 us]");  // protected authentication path
}

// The other two calls that carry a secret (docs/pkcs11-facts.md, "Logging"):
// C_LoginUser's PIN, and its username, whose bytes are never written either
// (only their count, as any input buffer's); C_InitPIN's PIN.
TEST_CASE("C_LoginUser's PIN and username, and C_InitPIN's PIN, are never written") {
  CK_UTF8CHAR pin[] = "S3cr3t-P1n";
  CK_UTF8CHAR user[] = "alice";
  std::string r =
      record<fn::C_LoginUser>(CallFacts{}, {}, CK_SESSION_HANDLE{1}, CK_USER_TYPE{CKU_USER}, pin,
                              CK_ULONG{10}, user, CK_ULONG{5});
  CHECK(r == "C_LoginUser(0x1, 1, ***, [5 bytes]) = CKR_OK [0.0 us]");
  CHECK(r.find("S3cr3t") == std::string::npos);
  CHECK(r.find("alice") == std::string::npos);
  CHECK(r.find("616c696365") == std::string::npos);  // nor in hex

  r = record<fn::C_InitPIN>(CallFacts{CKR_PIN_LEN_RANGE}, {}, CK_SESSION_HANDLE{1}, pin,
                            CK_ULONG{10});
  CHECK(r == "C_InitPIN(0x1, ***) = CKR_PIN_LEN_RANGE [0.0 us]");
  CHECK(r.find("S3cr3t") == std::string::npos);
}

TEST_CASE("buffers by length, output buffers with capacity and returned length") {
  CK_BYTE data[3] = {'a', 'b', 'c'};
  CK_BYTE sig[256];
  CK_ULONG sig_len = 64;  // what the call returned
  std::array<CK_ULONG, 5> caps{0, 0, 0, 256, 0};
  std::string r =
      record<fn::C_Sign>(CallFacts{CKR_OK, 2'500'000, 1500, 0x5002}, caps,
                         CK_SESSION_HANDLE{0x2000003}, data, CK_ULONG{3}, sig, &sig_len);
  CHECK(r ==
        "C_Sign(0x2000003->0x5002, [3 bytes], [256]->64) = CKR_OK [2500.0 us, session lock wait "
        "1.5 us]");
  r = record<fn::C_Sign>(CallFacts{}, {}, CK_SESSION_HANDLE{1}, data, CK_ULONG{3},
                         static_cast<CK_BYTE_PTR>(nullptr), &sig_len);
  CHECK(r == "C_Sign(0x1, [3 bytes], NULL->64) = CKR_OK [0.0 us]");  // a length query
  r = record<fn::C_Sign>(CallFacts{CKR_KEY_HANDLE_INVALID}, caps, CK_SESSION_HANDLE{1}, data,
                         CK_ULONG{3}, sig, &sig_len);
  CHECK(r ==
        "C_Sign(0x1, [3 bytes], [256]) = CKR_KEY_HANDLE_INVALID [0.0 us]");  // length not trusted
}

TEST_CASE("mechanism, template and output handles in one record") {
  CK_MECHANISM mech{CKM_SHA256, nullptr, 0};
  CHECK(record<fn::C_DigestInit>(CallFacts{CKR_OK, 800, 0, 0x5000}, {},
                                 CK_SESSION_HANDLE{0x1000001}, &mech) ==
        "C_DigestInit(0x1000001->0x5000, CKM_SHA256) = CKR_OK [0.8 us]");
  CK_OBJECT_CLASS cls = CKO_DATA;
  CK_ATTRIBUTE t[] = {{CKA_CLASS, &cls, sizeof cls}};
  CK_OBJECT_HANDLE obj = 0xb000001;
  CHECK(record<fn::C_CreateObject>(CallFacts{}, {}, CK_SESSION_HANDLE{1}, t, CK_ULONG{1}, &obj) ==
        "C_CreateObject(0x1, {CKA_CLASS=CKO_DATA}, ->0xb000001) = CKR_OK [0.0 us]");
  CK_OBJECT_HANDLE found[4] = {0xb000001, 0xb000002};
  CK_ULONG n = 2;
  CHECK(record<fn::C_FindObjects>(CallFacts{}, {}, CK_SESSION_HANDLE{1}, found, CK_ULONG{4}, &n) ==
        "C_FindObjects(0x1, [max 4: 0xb000001, 0xb000002], ->2) = CKR_OK [0.0 us]");
  CK_SESSION_INFO info{2, CKS_RW_USER_FUNCTIONS, CKF_SERIAL_SESSION | CKF_RW_SESSION, 0};
  CHECK(record<fn::C_GetSessionInfo>(CallFacts{}, {}, CK_SESSION_HANDLE{1}, &info) ==
        "C_GetSessionInfo(0x1, {slot 2, state 3, flags 0x6}) = CKR_OK [0.0 us]");
}

// C_GetAttributeValue traced as observed_call does: capacities taken on the
// way to the backend, then the "backend" answers.
template <class Backend>
std::string get_attributes(CK_ATTRIBUTE* t, CK_ULONG count, Backend backend) {
  TemplateCapacities caps;
  caps.capture(t, count);
  CK_RV rv = backend();
  return record<fn::C_GetAttributeValue>(CallFacts{rv, 0, 0, 0, &caps}, {}, CK_SESSION_HANDLE{1},
                                         CK_OBJECT_HANDLE{7}, t, count);
}

TEST_CASE("C_GetAttributeValue: values only once the call filled them, secrets masked") {
  unsigned char buf[4] = {0xde, 0xad, 0xbe, 0xef};
  CK_ATTRIBUTE t[] = {{CKA_ID, buf, 4}, {CKA_VALUE, buf, 4}};
  std::string ok = get_attributes(t, 2, [] { return CKR_OK; });
  CHECK(ok ==
        "C_GetAttributeValue(0x1, 7, {CKA_ID=deadbeef (4 bytes), CKA_VALUE=*** (4 bytes)}) = "
        "CKR_OK [0.0 us]");
  std::string failed = get_attributes(t, 2, [] { return CKR_OBJECT_HANDLE_INVALID; });
  CHECK(failed.find("dead") == std::string::npos);
  CHECK(failed.find("{CKA_ID [4 bytes], CKA_VALUE [4 bytes]}") != std::string::npos);
  // A call refused before the backend (no capacities taken): the count alone.
  std::string refused =
      record<fn::C_GetAttributeValue>(CallFacts{CKR_SESSION_HANDLE_INVALID}, {},
                                      CK_SESSION_HANDLE{1}, CK_OBJECT_HANDLE{7}, t, CK_ULONG{2});
  CHECK(refused ==
        "C_GetAttributeValue(0x1, 7, {2 attributes}) = CKR_SESSION_HANDLE_INVALID [0.0 us]");
}

TEST_CASE(
    "C_GetAttributeValue: a backend that reports a length beyond the buffer is not read past it") {
  // A 4-byte buffer, then a canary that must never reach the log (under ASan
  // the heap block ends at the canary: reading further is an overflow).
  const unsigned char bytes[8] = {0x11, 0x22, 0x33, 0x44, 0xca, 0xfe, 0xba, 0xbe};
  auto block = std::make_unique<unsigned char[]>(8);
  std::copy_n(bytes, 8, block.get());
  unsigned char* buf = block.get();
  for (CK_RV lie : {CKR_BUFFER_TOO_SMALL, CKR_OK}) {
    CAPTURE(lie);
    // Non-compliant: the required length (12), not CK_UNAVAILABLE_INFORMATION.
    CK_ATTRIBUTE t[] = {{CKA_ID, buf, 4}, {CKA_LABEL, buf, 4}, {CKA_MODULUS, buf, 4}};
    std::string r = get_attributes(t, 3, [&] {
      for (auto& a : t) a.ulValueLen = 12;
      return lie;
    });
    CHECK(r.find("cafe") == std::string::npos);
    CHECK(r.find("\\xca") == std::string::npos);
    CHECK(r.find("{CKA_ID [4 bytes]->12, CKA_LABEL [4 bytes]->12, CKA_MODULUS [4 bytes]->12}") !=
          std::string::npos);
  }
  // A length within the buffer is shown, and no further than that length.
  CK_ATTRIBUTE fits[] = {{CKA_ID, buf, 4}, {CKA_LABEL, nullptr, 0}, {CKA_SUBJECT, buf, 4}};
  std::string r = get_attributes(fits, 3, [&] {
    fits[0].ulValueLen = 2;
    fits[1].ulValueLen = 5;  // a length query's answer
    fits[2].ulValueLen = CK_UNAVAILABLE_INFORMATION;
    return CKR_BUFFER_TOO_SMALL;
  });
  CHECK(r ==
        "C_GetAttributeValue(0x1, 7, {CKA_ID=1122 (2 bytes), CKA_LABEL (5 bytes), "
        "CKA_SUBJECT=unavailable}) = "
        "CKR_BUFFER_TOO_SMALL [0.0 us]");
  // A nested template's buffers have no known capacity: lengths only.
  unsigned char inner_value[2] = {0x99, 0x88};
  CK_ATTRIBUTE inner[] = {{CKA_LABEL, inner_value, 1000}};
  CK_ATTRIBUTE wrap[] = {{CKA_WRAP_TEMPLATE, inner, sizeof inner}};
  r = get_attributes(wrap, 1, [] { return CKR_OK; });
  CHECK(r.find("{CKA_WRAP_TEMPLATE={CKA_LABEL [1000 bytes]}}") != std::string::npos);
}

TEST_CASE(
    "output buffers: never read beyond the capacity given on entry, whatever length comes back") {
  // C_FindObjects: a backend claiming more handles than ulMaxObjectCount.
  CK_OBJECT_HANDLE found[3] = {0xb000001, 0xb000002, 0xcafe};  // the third is beyond the capacity
  CK_ULONG n = 1000;
  std::string r =
      record<fn::C_FindObjects>(CallFacts{}, {}, CK_SESSION_HANDLE{1}, found, CK_ULONG{2}, &n);
  CHECK(r == "C_FindObjects(0x1, [max 2: 0xb000001, 0xb000002], ->1000) = CKR_OK [0.0 us]");
  // 'o' buffers are shown by capacity and returned length, never by content.
  CK_BYTE out[4] = {0xca, 0xfe, 0xca, 0xfe};
  CK_ULONG out_len = 4096;
  std::array<CK_ULONG, 5> caps{0, 0, 0, 4, 0};
  r = record<fn::C_Encrypt>(CallFacts{CKR_BUFFER_TOO_SMALL}, caps, CK_SESSION_HANDLE{1}, out,
                            CK_ULONG{4}, out, &out_len);
  CHECK(r == "C_Encrypt(0x1, [4 bytes], [4]->4096) = CKR_BUFFER_TOO_SMALL [0.0 us]");
}

TEST_CASE("a template the call refused is not walked: a huge count over a short template") {
  CK_OBJECT_CLASS cls = CKO_DATA;
  CK_ATTRIBUTE one[] = {{CKA_CLASS, &cls, sizeof cls}};
  std::string r = record<fn::C_FindObjectsInit>(CallFacts{CKR_SESSION_HANDLE_INVALID}, {},
                                                CK_SESSION_HANDLE{1}, one, CK_ULONG{1'000'000});
  CHECK(r == "C_FindObjectsInit(0x1, {1000000 attributes}) = CKR_SESSION_HANDLE_INVALID [0.0 us]");
  r = record<fn::C_CreateObject>(CallFacts{CKR_TEMPLATE_INCOMPLETE}, {}, CK_SESSION_HANDLE{1}, one,
                                 CK_ULONG{1}, static_cast<CK_OBJECT_HANDLE_PTR>(nullptr));
  CHECK(r == "C_CreateObject(0x1, {1 attribute}, NULL) = CKR_TEMPLATE_INCOMPLETE [0.0 us]");
  r = record<fn::C_FindObjectsInit>(CallFacts{CKR_OK}, {}, CK_SESSION_HANDLE{1},
                                    static_cast<CK_ATTRIBUTE_PTR>(nullptr), CK_ULONG{0});
  CHECK(r == "C_FindObjectsInit(0x1, {}) = CKR_OK [0.0 us]");
  // An accepted template is shown, its first kMaxAttributesShown attributes.
  std::vector<CK_ATTRIBUTE> many(kMaxAttributesShown + 8,
                                 CK_ATTRIBUTE{CKA_CLASS, &cls, sizeof cls});
  r = record<fn::C_FindObjectsInit>(CallFacts{CKR_OK}, {}, CK_SESSION_HANDLE{1}, many.data(),
                                    static_cast<CK_ULONG>(many.size()));
  CHECK(r.find("CKA_CLASS=CKO_DATA, ... 40 in all}") != std::string::npos);
}

}  // namespace
}  // namespace p11mux
