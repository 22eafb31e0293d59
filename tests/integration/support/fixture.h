// Test fixtures: a fresh SoftHSM2 token and the module under test, loaded from
// P11MUX_TEST_MODULE (SoftHSM2 itself, p11mux in front of it, or any module
// that sees the token through SOFTHSM2_CONF). Each fixture object creates its
// own token and loads and initializes the module anew, so tests are independent
// and every test also exercises C_Initialize/C_Finalize.
#pragma once

#include "module.h"
#include "session.h"
#include "softhsm_token.h"

#include <p11mux/pkcs11.h>

#include <string>

namespace p11test {

// The path in P11MUX_TEST_MODULE; throws if it is not set.
std::string module_under_test();

struct TokenFixture {
  TokenFixture();

  SoftHsmToken token;  // first: the module must see SOFTHSM2_CONF when it initializes
  Module module;
  const CK_FUNCTION_LIST& p11;
  CK_SLOT_ID slot;  // the slot of token
};

// Adds an open R/W session, not logged in.
struct SessionFixture : TokenFixture {
  SessionFixture();

  Session session;
};

// Adds a user login on session (hence on all sessions of the token).
struct LoggedInFixture : SessionFixture {
  LoggedInFixture();
};

}  // namespace p11test
