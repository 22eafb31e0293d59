// An isolated, freshly initialized SoftHSM2 token for one test.
//
// Creates a temporary directory with its own softhsm2.conf and token store, points
// SOFTHSM2_CONF at it and initializes one token with softhsm2-util. Construct it
// BEFORE loading the module: SoftHSM2 reads SOFTHSM2_CONF in C_Initialize (through
// p11mux too, which initializes its backend then). On destruction the variable is
// restored and the directory removed; destroy the Module first.
#pragma once

#include "environment.h"
#include "temp_dir.h"

#include <filesystem>
#include <string>

namespace p11test {

inline constexpr const char* kTokenLabel = "p11mux-test";
inline constexpr const char* kSoPin = "12345678";
inline constexpr const char* kUserPin = "123456";

class SoftHsmToken {
 public:
  // softhsm2-util is taken from P11MUX_TEST_SOFTHSM2_UTIL, else from PATH.
  explicit SoftHsmToken(const std::string& label = kTokenLabel);
  SoftHsmToken(const SoftHsmToken&) = delete;  // owns a directory and an env variable
  SoftHsmToken& operator=(const SoftHsmToken&) = delete;

  const std::string& label() const noexcept { return label_; }
  const std::filesystem::path& directory() const noexcept { return dir_.path(); }

  // Initializes one more token, labelled label, in the same store (the next free
  // slot), with the same PINs: several tokens behind one SOFTHSM2_CONF.
  void add_token(const std::string& label) const;

 private:
  TempDir dir_;
  ScopedEnv conf_;
  std::string label_;
};

}  // namespace p11test
