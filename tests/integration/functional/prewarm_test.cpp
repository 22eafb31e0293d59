// pool.prewarm over SoftHSM2, which always shows one more slot with a token
// that is not initialized: that slot is left alone, without a warning at
// every C_Initialize. Through p11mux only (prewarm is p11mux's).
#include "support/doctest_ck.h"
#include "support/environment.h"
#include "support/fixture.h"
#include "support/slots.h"
#include "support/temp_dir.h"

#include <fstream>
#include <sstream>
#include <string>

using namespace p11test;

TEST_CASE("prewarm skips a token that is not initialized, without a warning") {
  if (module_under_test().find("p11mux") == std::string::npos) return;  // p11mux's feature
  TempDir logs("p11mux-prewarm-");
  const std::string log = (logs.path() / "p11mux.log").string();
  ScopedEnv prewarm("P11MUX_POOL_PREWARM", "2");
  ScopedEnv file("P11MUX_LOG_FILE", log);
  ScopedEnv level("P11MUX_LOG_LEVEL", "info");
  {
    TokenFixture f;  // one initialized token, and SoftHSM2's free slot
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE_RV(f.p11.C_OpenSession(f.slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h), CKR_OK);
    CHECK_RV(f.p11.C_CloseSession(h), CKR_OK);
  }
  std::ifstream in(log);
  std::stringstream text;
  text << in.rdbuf();
  CHECK(text.str().find("backend '") != std::string::npos);  // the log was written
  CHECK(text.str().find("prewarm stopped") == std::string::npos);
  CHECK(text.str().find("warn") == std::string::npos);
}
