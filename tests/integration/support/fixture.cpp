#include "fixture.h"

#include "ck_error.h"
#include "environment.h"
#include "slots.h"

namespace p11test {

std::string module_under_test() { return required_env("P11MUX_TEST_MODULE"); }

TokenFixture::TokenFixture()
    : module(module_under_test()),
      p11(module.fn()),
      slot(require_slot_by_label(p11, token.label())) {}

SessionFixture::SessionFixture() : session(p11, slot, Access::read_write) {}

LoggedInFixture::LoggedInFixture() { ck_check(login_user(p11, session, kUserPin), "C_Login"); }

}  // namespace p11test
