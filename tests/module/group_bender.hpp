// What the module tests of groups over the spec bender share
// (group_spec_bender_test.cpp in serialize mode, group_multiplex_bender_test.cpp
// on lanes): the bender's configuration, a token key made through the group,
// MACs made and checked with it, and digests checked against the bender's
// reference.
#pragma once

#include "group_harness.hpp"

#include <array>
#include <cstring>
#include <string>
#include <string_view>
#include <utility>

namespace p11mux::test {

// Every bend but the transient CKR_SESSION_COUNT, which would refuse the
// tests' own C_OpenSession now and then (spec_bender_test.cpp tests that one).
inline constexpr unsigned long kBends = MOCK_BEND_ALL & ~MOCK_BEND_TRANSIENT_COUNT;

// The bender's three tokens, and a failure of its own when `fail` names a
// function: the Nth call of it answers `rv` without doing its work, and
// (KEEP_OP) leaves its operation active.
inline MockConfig bender_config(const char* fail = "", CK_RV rv = CKR_OK, unsigned long nth = 0) {
  MockConfig c = mock_tokens(3);
  c.bend = kBends;
  std::strncpy(c.fail_function, fail, sizeof c.fail_function - 1);
  c.fail_rv = rv;
  c.fail_nth = nth;
  return c;
}

inline constexpr std::string_view kData = "signed over the spec bender";
inline CK_MECHANISM hmac{CKM_SHA256_HMAC, nullptr, 0};

struct Mac {
  CK_RV rv = CKR_OK;
  std::array<CK_BYTE, 64> bytes{};
  CK_ULONG len = 64;
};

inline Mac sign(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, CK_ULONG len = 64) {
  Mac out;
  out.len = len;
  std::string data(kData);
  out.rv = p->C_Sign(s, reinterpret_cast<CK_BYTE*>(data.data()), data.size(), out.bytes.data(),
                     &out.len);
  return out;
}

inline CK_RV verify(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, const Mac& mac) {
  std::string data(kData);
  return p->C_Verify(s, reinterpret_cast<CK_BYTE*>(data.data()), data.size(),
                     const_cast<CK_BYTE*>(mac.bytes.data()), mac.len);
}

// SHA-256 of one text on one session, part by part or at once; each
// answer checked by the caller, the digest against the bender's reference.
class Digests {
 public:
  Digests(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE s, std::string data)
      : p_(p), s_(s), data_(std::move(data)) {}
  CK_RV init() {
    CK_MECHANISM sha{CKM_SHA256, nullptr, 0};
    return p_->C_DigestInit(s_, &sha);
  }
  CK_RV update() { return p_->C_DigestUpdate(s_, bytes(), data_.size()); }
  CK_RV final_part() {
    len_ = out_.size();
    return p_->C_DigestFinal(s_, out_.data(), &len_);
  }
  CK_RV digest() {
    len_ = out_.size();
    return p_->C_Digest(s_, bytes(), data_.size(), out_.data(), &len_);
  }
  // The last digest is the text's.
  bool right() const {
    std::array<CK_BYTE, MOCK_DIGEST_LEN> expected{};
    bender().reference_digest(reinterpret_cast<const CK_BYTE*>(data_.data()), data_.size(),
                              expected.data());
    return len_ == expected.size() && std::memcmp(expected.data(), out_.data(), len_) == 0;
  }

 private:
  CK_BYTE* bytes() { return reinterpret_cast<CK_BYTE*>(data_.data()); }
  CK_FUNCTION_LIST* p_;
  CK_SESSION_HANDLE s_;
  std::string data_;
  std::array<CK_BYTE, 64> out_{};
  CK_ULONG len_ = 0;
};

}  // namespace p11mux::test
