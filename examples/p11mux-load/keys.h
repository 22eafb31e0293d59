// The keys the operations use: found by label, generated when missing (and
// --create-keys), plus the reference data the verify and find ops check against.
#pragma once

#include <p11mux/pkcs11.h>

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "plan.h"

namespace p11mux::load {

inline constexpr const char* kEcLabel = "p11mux-load-ec";
inline constexpr const char* kRsaLabel = "p11mux-load-rsa";
inline constexpr const char* kAesLabel = "p11mux-load-aes";

// Fixed inputs, shared by setup and the ops.
extern const std::uint8_t kMessage[3];         // "abc"
extern const std::uint8_t kMessageSha256[32];  // its SHA-256 (FIPS 180-2, B.1)

struct Keys {
  CK_OBJECT_HANDLE ec_private = CK_INVALID_HANDLE, ec_public = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE rsa_private = CK_INVALID_HANDLE, rsa_public = CK_INVALID_HANDLE;
  CK_OBJECT_HANDLE aes = CK_INVALID_HANDLE;
  std::vector<CK_BYTE> ec_signature;   // of kMessageSha256, for verify-ec
  std::vector<CK_BYTE> rsa_signature;  // of kMessage, for verify-rsa
  CK_ULONG find_expected = 0;          // objects labelled kEcLabel visible to the session
};

// Finds (or creates) what `mix` needs, using `session` (R/W if keys may have
// to be created, logged in where private keys are needed). `notice` receives
// one-line messages such as "created RSA-2048 key pair ...". Throws SetupError.
Keys prepare_keys(CK_FUNCTION_LIST* fn, CK_SESSION_HANDLE session, const Mix& mix, bool create,
                  bool logged_in, const std::string& token_label,
                  const std::function<void(const std::string&)>& notice);

}  // namespace p11mux::load
