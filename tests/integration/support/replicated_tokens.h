// Several SoftHSM2 tokens holding the same keys: the members of an HSM group
// (issue 15), as a vendor's backup or cloning would provision them.
//
// ReplicatedTokens makes N tokens in one store behind one SOFTHSM2_CONF, each
// with its own label ("p11mux-member-1", ...) and SoftHSM2's own serial, and
// imports into each, with C_CreateObject, the same EC P-256 and RSA-2048 key
// pairs: same private values, same CKA_ID, same CKA_LABEL, token objects,
// private keys sensitive and not extractable. The user PIN is kUserPin.
//
// The import goes through SoftHSM2 itself (P11MUX_TEST_SOFTHSM2_MODULE, else
// the usual path), loaded and finalized inside the constructor. So, as for
// SoftHsmToken, construct it BEFORE loading the module under test, and destroy
// that module first.
//
//   ReplicatedTokens tokens;                     // 3 tokens
//   Module module(module_under_test());
//   for (CK_SLOT_ID slot : replica_slots(module.fn(), tokens)) {
//     Session s(module.fn(), slot, Access::read_only);
//     login_user(module.fn(), s, kUserPin);
//     CK_OBJECT_HANDLE key = require_replica_key(module.fn(), s, CKO_PRIVATE_KEY, kReplicaEc);
//   }
// or ReplicatedFixture below, which does all of that.
#pragma once

#include "bytes.h"
#include "module.h"
#include "session.h"
#include "softhsm_token.h"

#include <p11mux/pkcs11.h>

#include <cstddef>
#include <deque>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace p11test {

// One key pair of every token: its public and private key objects share id and label.
struct ReplicaKey {
  CK_KEY_TYPE type;  // CKK_EC or CKK_RSA
  std::string_view label;
  std::string_view id;  // CKA_ID bytes
};
inline constexpr ReplicaKey kReplicaEc{CKK_EC, "p11mux-member-ec", "\x15\x01"};
inline constexpr ReplicaKey kReplicaRsa{CKK_RSA, "p11mux-member-rsa", "\x15\x02"};

// The fixed public values, to compare with what a token reads back.
// CKA_EC_POINT: the DER OCTET STRING of the uncompressed point (67 bytes).
Bytes replica_ec_point();
Bytes replica_rsa_modulus();  // 256 bytes
Bytes replica_id(const ReplicaKey& key);

inline constexpr std::size_t kDefaultReplicas = 3;
inline constexpr const char* kReplicaLabelPrefix = "p11mux-member-";

// Imports both key pairs as token objects through session (R/W, user logged in).
// Exposed for tests that provision a token of their own (a member joining late).
void import_replica_keys(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session);

class ReplicatedTokens {
 public:
  // count >= 1 tokens, labelled kReplicaLabelPrefix + "1", "2", ...
  explicit ReplicatedTokens(std::size_t count = kDefaultReplicas);
  ReplicatedTokens(const ReplicatedTokens&) = delete;  // owns a directory and an env variable
  ReplicatedTokens& operator=(const ReplicatedTokens&) = delete;

  std::size_t size() const noexcept { return labels_.size(); }
  // Token i (0-based): its label, and its serial as CK_TOKEN_INFO gives it, unpadded.
  const std::string& label(std::size_t i) const { return labels_.at(i); }
  const std::string& serial(std::size_t i) const { return serials_.at(i); }
  const std::vector<std::string>& labels() const noexcept { return labels_; }
  const std::vector<std::string>& serials() const noexcept { return serials_; }
  // The store: SOFTHSM2_CONF is directory()/softhsm2.conf while this object lives.
  const std::filesystem::path& directory() const noexcept { return store_.directory(); }

 private:
  SoftHsmToken store_;  // the first token, the directory and SOFTHSM2_CONF
  std::vector<std::string> labels_;
  std::vector<std::string> serials_;
};

// The slot of each token, in token order, as module fn sees them; throws if one is missing.
std::vector<CK_SLOT_ID> replica_slots(const CK_FUNCTION_LIST& fn, const ReplicatedTokens& tokens);

// The objects of class cls with key's CKA_ID on session's token (public objects
// only unless the user is logged in).
std::vector<CK_OBJECT_HANDLE> find_replica_key(const CK_FUNCTION_LIST& fn,
                                               CK_SESSION_HANDLE session, CK_OBJECT_CLASS cls,
                                               const ReplicaKey& key);
// The one such object; throws std::runtime_error if there are none or several.
CK_OBJECT_HANDLE require_replica_key(const CK_FUNCTION_LIST& fn, CK_SESSION_HANDLE session,
                                     CK_OBJECT_CLASS cls, const ReplicaKey& key);

// The tokens, the module under test (P11MUX_TEST_MODULE) initialized after them,
// the slot of each token and an R/W session on each, the user logged in.
// sessions[i] is on slots[i], the slot of tokens.label(i).
struct ReplicatedFixture {
  explicit ReplicatedFixture(std::size_t count = kDefaultReplicas);

  ReplicatedTokens tokens;  // first: the module must see SOFTHSM2_CONF when it initializes
  Module module;
  const CK_FUNCTION_LIST& p11;
  std::vector<CK_SLOT_ID> slots;
  std::deque<Session> sessions;  // a deque: Session cannot move
};

}  // namespace p11test
