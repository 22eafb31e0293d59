// The application traffic the stress and fault suites run: small PKCS#11
// conversations (open/use/close, sign and verify, digest, find,
// login/logout, session info, random), each recording every call and its
// return code in a Tally against the codes the spec allows it, and counting
// wrong results (a digest that differs from the single-threaded one, a
// signature that does not verify, a search that finds the wrong objects).
#pragma once

#include "support.hpp"

#include <string>
#include <vector>

namespace p11mux::reliability {

// The token as the workload sees it, prepared single-threaded by a suite.
struct Token {
  CK_SLOT_ID slot = 0;
  std::string user_pin;
  KeyPair key;                  // non-private signing pair (make_sign_key)
  std::string key_label;        // label of exactly the two objects of `key`
  std::vector<Bytes> messages;  // inputs for digests and signatures
  std::vector<Bytes> digests;   // their SHA-256 digests, computed up front
};

// Computes token.digests for token.messages, single-threaded, on session s.
void compute_digests(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE s, Token& token);

// Codes a call may return besides CKR_OK, by where it runs. On a session
// shared between threads another thread's operation may be active
// (CKR_OPERATION_ACTIVE on the Init calls); the login state belongs to the
// token, so C_Login/C_Logout may find it already changed by another thread.
struct Allowed {
  static constexpr RvSet init_shared{CKR_OPERATION_ACTIVE};
  static constexpr RvSet login{CKR_USER_ALREADY_LOGGED_IN};
  static constexpr RvSet logout{CKR_USER_NOT_LOGGED_IN};
  // A backend that refuses sessions now and then below its limit (the spec
  // bender): the application may see it.
  static constexpr RvSet open_transient{CKR_SESSION_COUNT};
};

class Workload {
 public:
  Workload(CK_FUNCTION_LIST& p11, const Token& token, Tally& tally)
      : p11_(p11), token_(token), tally_(tally) {}

  // Each returns CKR_OK or the first code that ended the conversation
  // (recorded like every call). `shared`: other threads use the session too.
  CK_RV open(CK_SESSION_HANDLE& out, bool rw);
  CK_RV close(CK_SESSION_HANDLE s);
  CK_RV open_use_close(bool rw);  // open, random, session info, close
  // SignInit+Sign of message m; if the signature came out, C_VerifyInit+C_Verify
  // on verify_session (a session of this thread's own).
  CK_RV sign(CK_SESSION_HANDLE s, bool shared, std::size_t m, CK_SESSION_HANDLE verify_session);
  CK_RV digest(CK_SESSION_HANDLE s, bool shared, std::size_t m);
  CK_RV find(CK_SESSION_HANDLE s, bool shared);
  CK_RV login_logout(CK_SESSION_HANDLE s);
  CK_RV session_info(CK_SESSION_HANDLE s);
  CK_RV random(CK_SESSION_HANDLE s);

  // C_OpenSession may answer CKR_SESSION_COUNT (a backend refusing now and then).
  void allow_transient_session_count() { transient_count_ = true; }

  // Results that were wrong although every call returned CKR_OK.
  unsigned long wrong_results() const { return wrong_; }
  std::size_t message_count() const { return token_.messages.size(); }

 private:
  CK_FUNCTION_LIST& p11_;
  const Token& token_;
  Tally& tally_;
  unsigned long wrong_ = 0;
  bool transient_count_ = false;
};

}  // namespace p11mux::reliability
