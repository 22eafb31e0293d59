#include "workload.hpp"

#include <stdexcept>

namespace p11mux::reliability {
namespace {

// The input pointer for data: never NULL (SoftHSM2 refuses NULL even with length 0).
CK_BYTE* input(const Bytes& data) { return const_cast<CK_BYTE*>(data.data()); }

}  // namespace

void compute_digests(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE s, Token& token) {
  CK_MECHANISM sha256{CKM_SHA256, nullptr, 0};
  token.digests.clear();
  for (const Bytes& m : token.messages) {
    Bytes out(64);
    CK_ULONG len = out.size();
    CK_RV rv = p11.C_DigestInit(s, &sha256);
    if (rv == CKR_OK) rv = p11.C_Digest(s, input(m), m.size(), out.data(), &len);
    if (rv != CKR_OK) throw std::runtime_error("reference digest: " + rv_string(rv));
    out.resize(len);
    token.digests.push_back(out);
  }
}

CK_RV Workload::open(CK_SESSION_HANDLE& out, bool rw) {
  CK_FLAGS flags = CKF_SERIAL_SESSION | (rw ? CKF_RW_SESSION : 0);
  CK_RV rv = p11_.C_OpenSession(token_.slot, flags, nullptr, nullptr, &out);
  tally_.record("C_OpenSession", rv, transient_count_ ? Allowed::open_transient : RvSet{});
  return rv;
}

CK_RV Workload::close(CK_SESSION_HANDLE s) {
  CK_RV rv = p11_.C_CloseSession(s);
  tally_.record("C_CloseSession", rv);
  return rv;
}

CK_RV Workload::open_use_close(bool rw) {
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  if (CK_RV rv = open(s, rw); rv != CKR_OK) return rv;
  CK_RV rv = random(s);
  if (rv == CKR_OK) {
    CK_SESSION_INFO info{};
    rv = p11_.C_GetSessionInfo(s, &info);
    tally_.record("C_GetSessionInfo", rv);
    if (rv == CKR_OK && (info.slotID != token_.slot || ((info.flags & CKF_RW_SESSION) != 0) != rw))
      ++wrong_;
  }
  CK_RV closed = close(s);
  return rv != CKR_OK ? rv : closed;
}

CK_RV Workload::sign(CK_SESSION_HANDLE s, bool shared, std::size_t m,
                     CK_SESSION_HANDLE verify_session) {
  CK_MECHANISM ecdsa{CKM_ECDSA, nullptr, 0};
  const Bytes& data = token_.digests[m];  // ECDSA signs a hash
  CK_RV rv = p11_.C_SignInit(s, &ecdsa, token_.key.private_key);
  tally_.record("C_SignInit", rv, shared ? Allowed::init_shared : RvSet{});
  if (rv != CKR_OK) return rv;
  Bytes sig(256);
  CK_ULONG len = sig.size();
  rv = p11_.C_Sign(s, input(data), data.size(), sig.data(), &len);
  tally_.record("C_Sign", rv);
  if (rv != CKR_OK) return rv;
  sig.resize(len);
  if (sig.empty()) ++wrong_;
  rv = p11_.C_VerifyInit(verify_session, &ecdsa, token_.key.public_key);
  tally_.record("C_VerifyInit", rv);
  if (rv != CKR_OK) return rv;
  rv = p11_.C_Verify(verify_session, input(data), data.size(), sig.data(), sig.size());
  // CKR_SIGNATURE_INVALID is a wrong result: the signature was of other data.
  if (rv == CKR_SIGNATURE_INVALID) {
    ++wrong_;
    tally_.record("C_Verify", rv, {CKR_SIGNATURE_INVALID});
    return CKR_OK;
  }
  tally_.record("C_Verify", rv);
  return rv;
}

CK_RV Workload::digest(CK_SESSION_HANDLE s, bool shared, std::size_t m) {
  CK_MECHANISM sha256{CKM_SHA256, nullptr, 0};
  CK_RV rv = p11_.C_DigestInit(s, &sha256);
  tally_.record("C_DigestInit", rv, shared ? Allowed::init_shared : RvSet{});
  if (rv != CKR_OK) return rv;
  Bytes out(64);
  CK_ULONG len = out.size();
  const Bytes& data = token_.messages[m];
  rv = p11_.C_Digest(s, input(data), data.size(), out.data(), &len);
  tally_.record("C_Digest", rv);
  if (rv != CKR_OK) return rv;
  out.resize(len);
  if (out != token_.digests[m]) ++wrong_;
  return CKR_OK;
}

CK_RV Workload::find(CK_SESSION_HANDLE s, bool shared) {
  CK_ATTRIBUTE templ[] = {
      {CKA_LABEL, const_cast<char*>(token_.key_label.data()), token_.key_label.size()}};
  CK_RV rv = p11_.C_FindObjectsInit(s, templ, 1);
  tally_.record("C_FindObjectsInit", rv, shared ? Allowed::init_shared : RvSet{});
  if (rv != CKR_OK) return rv;
  CK_OBJECT_HANDLE found[8];
  CK_ULONG n = 0;
  rv = p11_.C_FindObjects(s, found, 8, &n);
  tally_.record("C_FindObjects", rv);
  CK_RV final_rv = p11_.C_FindObjectsFinal(s);
  tally_.record("C_FindObjectsFinal", final_rv);
  if (rv != CKR_OK) return rv;
  if (final_rv != CKR_OK) return final_rv;
  // Exactly the key pair: both halves, nothing else.
  bool pub = false, priv = false;
  for (CK_ULONG i = 0; i < n; ++i) {
    pub = pub || found[i] == token_.key.public_key;
    priv = priv || found[i] == token_.key.private_key;
  }
  if (n != 2 || !pub || !priv) ++wrong_;
  return CKR_OK;
}

CK_RV Workload::login_logout(CK_SESSION_HANDLE s) {
  auto* pin = reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(token_.user_pin.data()));
  CK_RV rv = p11_.C_Login(s, CKU_USER, pin, token_.user_pin.size());
  if (!tally_.record("C_Login", rv, Allowed::login)) return rv;
  rv = p11_.C_Logout(s);
  if (!tally_.record("C_Logout", rv, Allowed::logout)) return rv;
  return CKR_OK;
}

CK_RV Workload::session_info(CK_SESSION_HANDLE s) {
  CK_SESSION_INFO info{};
  CK_RV rv = p11_.C_GetSessionInfo(s, &info);
  tally_.record("C_GetSessionInfo", rv);
  if (rv == CKR_OK && info.slotID != token_.slot) ++wrong_;
  return rv;
}

CK_RV Workload::random(CK_SESSION_HANDLE s) {
  CK_BYTE buf[32] = {};
  CK_RV rv = p11_.C_GenerateRandom(s, buf, sizeof buf);
  tally_.record("C_GenerateRandom", rv);
  return rv;
}

}  // namespace p11mux::reliability
