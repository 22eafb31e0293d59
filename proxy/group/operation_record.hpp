// What a group needs to replay a single-part operation on another member
// (issue 15, docs/groups.md, "Replay"): a deep copy of the Init's mechanism,
// and per virtual session and kind of operation, the Init's mechanism, key
// and how far the operation got.
//
// A C_Sign, C_Verify, C_Encrypt, C_Decrypt, C_Digest, C_SignRecover or
// C_VerifyRecover whose member dies after its Init is replayed: the Init
// again on another member, then the call. That is the same operation only
// if the member gets the same mechanism bytes; so only the parameter layouts
// in kParamLayouts are copied, and any other (a vendor's, a newer one, a
// length that fits no layout) makes the operation not replayable: the
// application then gets an error rather than a guess. A multi-part
// operation (an Update, or C_DigestKey, happened) is not replayable either:
// the member that died took the data already fed to it.
//
// Not thread-safe: a record belongs to one virtual session, and is used under
// that session's lock, which the runtime holds across the member's call.
#pragma once

#include "forward/operation_state.hpp"
#include "group/resolved_handle.hpp"

#include <p11mux/pkcs11.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <tuple>
#include <utility>

namespace p11mux {

class MemberHealth;

// CK_GCM_PARAMS as the v2.40 specification's text gives it, without the
// ulIvBits that the v2.40 header and v3.0 have (docs/pkcs11-facts.md,
// "Mechanism parameters and replay"): modules take one or the other, told apart by
// ulParameterLen (40 or 48 bytes), so both are copied as they came.
struct GcmParamsV240Text {
  CK_BYTE_PTR pIv;
  CK_ULONG ulIvLen;
  CK_BYTE_PTR pAAD;
  CK_ULONG ulAADLen;
  CK_ULONG ulTagBits;
};

// The parameter a mechanism takes, as far as replay knows it.
enum class Param : std::uint8_t {
  none,         // no parameter
  iv8,          // an 8-byte IV (DES3 CBC)
  iv16,         // a 16-byte IV (AES CBC)
  aes_ctr,      // CK_AES_CTR_PARAMS
  rsa_pss,      // CK_RSA_PKCS_PSS_PARAMS
  rsa_oaep,     // CK_RSA_PKCS_OAEP_PARAMS
  gcm,          // CK_GCM_PARAMS, either layout
  ccm,          // CK_CCM_PARAMS
  eddsa,        // CK_EDDSA_PARAMS
  mac_general,  // CK_MAC_GENERAL_PARAMS
};

// A byte string a parameter points to: where its pointer and its length are.
struct NestedBytes {
  std::size_t pointer;  // offset of the CK_BYTE_PTR (or CK_VOID_PTR)
  std::size_t length;   // offset of its CK_ULONG length in bytes
};

// One parameter layout: its size (ulParameterLen must be exactly this) and
// the byte strings it points to, which are copied too.
struct ParamLayout {
  Param param;
  std::size_t size;
  std::size_t nested_count;
  NestedBytes nested[2];
};

// Every layout replay copies, each described once.
inline constexpr ParamLayout kParamLayouts[] = {
    {Param::iv8, 8, 0, {}},
    {Param::iv16, 16, 0, {}},
    {Param::aes_ctr, sizeof(CK_AES_CTR_PARAMS), 0, {}},
    {Param::rsa_pss, sizeof(CK_RSA_PKCS_PSS_PARAMS), 0, {}},
    {Param::mac_general, sizeof(CK_MAC_GENERAL_PARAMS), 0, {}},
    {Param::rsa_oaep,
     sizeof(CK_RSA_PKCS_OAEP_PARAMS),
     1,
     {{offsetof(CK_RSA_PKCS_OAEP_PARAMS, pSourceData),
       offsetof(CK_RSA_PKCS_OAEP_PARAMS, ulSourceDataLen)}}},
    {Param::gcm,
     sizeof(CK_GCM_PARAMS),
     2,
     {{offsetof(CK_GCM_PARAMS, pIv), offsetof(CK_GCM_PARAMS, ulIvLen)},
      {offsetof(CK_GCM_PARAMS, pAAD), offsetof(CK_GCM_PARAMS, ulAADLen)}}},
    {Param::gcm,
     sizeof(GcmParamsV240Text),
     2,
     {{offsetof(GcmParamsV240Text, pIv), offsetof(GcmParamsV240Text, ulIvLen)},
      {offsetof(GcmParamsV240Text, pAAD), offsetof(GcmParamsV240Text, ulAADLen)}}},
    {Param::ccm,
     sizeof(CK_CCM_PARAMS),
     2,
     {{offsetof(CK_CCM_PARAMS, pNonce), offsetof(CK_CCM_PARAMS, ulNonceLen)},
      {offsetof(CK_CCM_PARAMS, pAAD), offsetof(CK_CCM_PARAMS, ulAADLen)}}},
    {Param::eddsa,
     sizeof(CK_EDDSA_PARAMS),
     1,
     {{offsetof(CK_EDDSA_PARAMS, pContextData), offsetof(CK_EDDSA_PARAMS, ulContextDataLen)}}},
};

// The v2.40 header's CK_GCM_PARAMS is the v3.0 one; the two GCM layouts
// must differ in size, or ulParameterLen could not tell them apart.
static_assert(sizeof(CK_GCM_PARAMS) == 48 && sizeof(GcmParamsV240Text) == 40);

struct ReplayMechanism {
  CK_MECHANISM_TYPE type;
  Param param;
  bool optional = false;  // the parameter may also be absent
};

// Every mechanism replay knows, with its parameter (PKCS#11 v2.40 and v3.0,
// "Mechanisms"). One not listed is not replayable.
inline constexpr ReplayMechanism kReplayMechanisms[] = {
    // RSA
    {CKM_RSA_PKCS, Param::none},
    {CKM_RSA_X_509, Param::none},
    {CKM_SHA1_RSA_PKCS, Param::none},
    {CKM_SHA224_RSA_PKCS, Param::none},
    {CKM_SHA256_RSA_PKCS, Param::none},
    {CKM_SHA384_RSA_PKCS, Param::none},
    {CKM_SHA512_RSA_PKCS, Param::none},
    {CKM_RSA_PKCS_PSS, Param::rsa_pss},
    {CKM_SHA1_RSA_PKCS_PSS, Param::rsa_pss},
    {CKM_SHA224_RSA_PKCS_PSS, Param::rsa_pss},
    {CKM_SHA256_RSA_PKCS_PSS, Param::rsa_pss},
    {CKM_SHA384_RSA_PKCS_PSS, Param::rsa_pss},
    {CKM_SHA512_RSA_PKCS_PSS, Param::rsa_pss},
    {CKM_RSA_PKCS_OAEP, Param::rsa_oaep},
    // EC
    {CKM_ECDSA, Param::none},
    {CKM_ECDSA_SHA1, Param::none},
    {CKM_ECDSA_SHA224, Param::none},
    {CKM_ECDSA_SHA256, Param::none},
    {CKM_ECDSA_SHA384, Param::none},
    {CKM_ECDSA_SHA512, Param::none},
    {CKM_EDDSA, Param::eddsa, /*optional=*/true},
    // Digests
    {CKM_SHA_1, Param::none},
    {CKM_SHA224, Param::none},
    {CKM_SHA256, Param::none},
    {CKM_SHA384, Param::none},
    {CKM_SHA512, Param::none},
    // MACs
    {CKM_SHA_1_HMAC, Param::none},
    {CKM_SHA224_HMAC, Param::none},
    {CKM_SHA256_HMAC, Param::none},
    {CKM_SHA384_HMAC, Param::none},
    {CKM_SHA512_HMAC, Param::none},
    {CKM_SHA_1_HMAC_GENERAL, Param::mac_general},
    {CKM_SHA224_HMAC_GENERAL, Param::mac_general},
    {CKM_SHA256_HMAC_GENERAL, Param::mac_general},
    {CKM_SHA384_HMAC_GENERAL, Param::mac_general},
    {CKM_SHA512_HMAC_GENERAL, Param::mac_general},
    {CKM_AES_CMAC, Param::none},
    {CKM_AES_CMAC_GENERAL, Param::mac_general},
    // Ciphers
    {CKM_AES_ECB, Param::none},
    {CKM_AES_CBC, Param::iv16},
    {CKM_AES_CBC_PAD, Param::iv16},
    {CKM_AES_CTR, Param::aes_ctr},
    {CKM_AES_GCM, Param::gcm},
    {CKM_AES_CCM, Param::ccm},
    {CKM_DES3_ECB, Param::none},
    {CKM_DES3_CBC, Param::iv8},
    {CKM_DES3_CBC_PAD, Param::iv8},
};

// kReplayMechanisms sorted by type, for a binary search: every Init on a
// group's session looks its mechanism up (a scan cost up to 140
// instructions, issue 15's "+50" goal).
inline constexpr auto kReplayMechanismsByType = [] {
  std::array<ReplayMechanism, std::size(kReplayMechanisms)> sorted{};
  std::copy(std::begin(kReplayMechanisms), std::end(kReplayMechanisms), sorted.begin());
  std::sort(sorted.begin(), sorted.end(),
            [](const ReplayMechanism& a, const ReplayMechanism& b) { return a.type < b.type; });
  return sorted;
}();
static_assert(std::adjacent_find(kReplayMechanismsByType.begin(), kReplayMechanismsByType.end(),
                                 [](const ReplayMechanism& a, const ReplayMechanism& b) {
                                   return a.type == b.type;
                                 }) == kReplayMechanismsByType.end(),
              "a mechanism is listed once");

// The mechanism's entry; NULL when replay does not know it.
constexpr const ReplayMechanism* replay_mechanism(CK_MECHANISM_TYPE type) noexcept {
  const auto* found =
      std::lower_bound(kReplayMechanismsByType.begin(), kReplayMechanismsByType.end(), type,
                       [](const ReplayMechanism& m, CK_MECHANISM_TYPE t) { return m.type < t; });
  return found != kReplayMechanismsByType.end() && found->type == type ? found : nullptr;
}

// The layout of `param` that is `size` bytes long; NULL when none is.
constexpr const ParamLayout* param_layout(Param param, std::size_t size) noexcept {
  for (const ParamLayout& l : kParamLayouts) {
    if (l.param == param && l.size == size) return &l;
  }
  return nullptr;
}

enum class CopyResult : std::uint8_t {
  ok,
  unknown_mechanism,  // not in kReplayMechanisms
  bad_parameter,      // no layout of this length, or a nested length without its bytes
  too_large,          // the nested byte strings exceed MechanismCopy::kMaxBytes
  no_memory,
};

// A CK_MECHANISM and its parameter, copied so that the copy owns every byte
// (nested byte strings included) and outlives the application's buffers.
//
// Cost: nothing is allocated for a mechanism without a parameter (ECDSA,
// RSA PKCS#1, the digests), nor for one whose parameter and byte strings fit
// kInline bytes (an IV, PSS, CTR, OAEP without a label, GCM with a 12-byte
// IV and up to 4 bytes of AAD); a larger one costs one heap allocation, kept
// and reused by later copies that fit it. Each copy is one pass of memcpy.
//
// Neither copied nor moved: the copied parameter points into the object itself.
class MechanismCopy {
 public:
  static constexpr std::size_t kInline = 64;
  // More than this in nested byte strings (AAD, an OAEP label, an EdDSA
  // context) is not copied: the operation is then not replayable.
  static constexpr std::size_t kMaxBytes = std::size_t{64} * 1024;

  MechanismCopy() noexcept = default;
  ~MechanismCopy() { delete[] heap_; }
  MechanismCopy(const MechanismCopy&) = delete;
  MechanismCopy& operator=(const MechanismCopy&) = delete;

  // Copies `m`; on any result but ok the copy is empty. A mechanism without
  // a parameter (ulParameterLen 0, pParameter ignored) is copied with a NULL
  // pParameter. Inline, the common case: the session's last mechanism
  // again, without a parameter (an ECDSA or HMAC key signing).
  CopyResult assign(const CK_MECHANISM& m) noexcept {
    if (assign_again(m)) [[likely]]
      return CopyResult::ok;
    return assign_looked_up(m);
  }
  // assign's common case alone: true when `m` is the copy's mechanism
  // again, without a parameter, which it now holds; false when it needs
  // assign (and nothing changed).
  bool assign_again(const CK_MECHANISM& m) noexcept {
    if (plain_ && m.ulParameterLen == 0 && m.mechanism == mechanism_.mechanism) [[likely]] {
      held_ = true;
      return true;
    }
    return false;
  }
  void clear() noexcept { held_ = false; }
  bool empty() const noexcept { return !held_; }

  // The copy, for a member's Init (which takes a non-const pointer). NULL
  // when empty. Valid until the next assign() or clear().
  CK_MECHANISM* get() noexcept { return held_ ? &mechanism_ : nullptr; }
  const CK_MECHANISM* get() const noexcept { return held_ ? &mechanism_ : nullptr; }
  // True when the parameter lives on the heap (for tests and the cost above).
  bool on_heap() const noexcept {
    return held_ && heap_ != nullptr && mechanism_.pParameter == heap_;
  }

 private:
  CopyResult assign_looked_up(const CK_MECHANISM& m) noexcept;

  CK_MECHANISM mechanism_{};
  // The table's entry for the last mechanism copied: a session's Inits
  // mostly repeat one mechanism, which then needs no search.
  const ReplayMechanism* known_ = nullptr;
  unsigned char* heap_ = nullptr;
  std::uint32_t heap_size_ = 0;  // at most kMaxBytes and a structure: 32 bits keep 112 bytes
  bool held_ = false;
  // mechanism_ is a copy of a mechanism that needs no parameter, without
  // one: the same again needs no write but held_ (assign; checking the
  // table's entry each time cost a C_SignInit about 8 instructions,
  // callgrind).
  bool plain_ = false;
  alignas(std::max_align_t) unsigned char inline_[kInline];
};

// How far an operation got (docs/groups.md, "Replay").
enum class Phase : std::uint8_t {
  finished,     // none active: never started, ended, or cancelled
  initialized,  // only the Init, or also single-part calls that kept it (length queries,
                // CKR_BUFFER_TOO_SMALL): replayable when its mechanism was copied
  updated,      // multi-part in progress (an Update, C_DigestKey, a dual-function
                // update), or restored by C_SetOperationState: not replayable
};

// The operations a record is kept for. The v3.0 message-based operations are
// not: their Init and Final bracket any number of messages, each of which a
// member may have taken (docs/groups.md, "Replay").
inline constexpr OpMask kReplayableOps = op::encrypt | op::decrypt | op::digest | op::sign |
                                         op::verify | op::sign_recover | op::verify_recover;

// What an application gets for an operation a member's failure took and
// that p11mux cannot replay: the token had a problem (the spec's meaning of
// CKR_DEVICE_ERROR); its session and the group's token are still there.
inline constexpr CK_RV kOperationLostRv = CKR_DEVICE_ERROR;

// One operation of one virtual session.
class OperationRecord {
 public:
  Phase phase() const noexcept { return phase_; }
  OpMask kind() const noexcept { return kind_; }          // one op:: bit; 0 before the first Init
  CK_OBJECT_HANDLE key() const noexcept { return key_; }  // the virtual handle
  // Why the mechanism was not copied (ok when it was, or no operation).
  CopyResult copy_result() const noexcept { return copied_; }
  MechanismCopy& mechanism() noexcept { return mechanism_; }
  const MechanismCopy& mechanism() const noexcept { return mechanism_; }

  // True when a member's failure now can be hidden by replay_init.
  bool replayable() const noexcept {
    return phase_ == Phase::initialized && copied_ == CopyResult::ok;
  }

  // A successful Init: copies the mechanism (a failed copy leaves the
  // operation active but not replayable; the application's call is unaffected).
  void started(OpMask kind, const CK_MECHANISM& m, CK_OBJECT_HANDLE virtual_key) noexcept {
    key_ = virtual_key;
    // kind_, phase_ and copied_ are adjacent: written as constants, they are
    // one store, which a copy that needs more than assign_again then
    // corrects (callgrind: 4 instructions a C_SignInit).
    kind_ = kind;
    phase_ = Phase::initialized;
    copied_ = CopyResult::ok;
    if (!mechanism_.assign_again(m)) [[unlikely]]
      copied_ = mechanism_.assign(m);
  }
  // A call that continues the operation (Update, C_DigestKey) returned rv.
  void continued(CK_RV rv) noexcept {
    if (phase_ == Phase::finished) return;
    if (rv == CKR_OK || rv == CKR_BUFFER_TOO_SMALL) {
      phase_ = Phase::updated;
    } else {
      end();
    }
  }
  // A call that may end the operation (single-part, Final) returned rv.
  void finishing(CK_RV rv, bool length_query) noexcept {
    if (rv == CKR_BUFFER_TOO_SMALL || (rv == CKR_OK && length_query)) return;
    end();
  }
  // C_SetOperationState succeeded: whatever it restored cannot be replayed.
  void restored() noexcept {
    phase_ = Phase::updated;
    copied_ = CopyResult::ok;
    mechanism_.clear();
  }
  void end() noexcept {
    phase_ = Phase::finished;
    copied_ = CopyResult::ok;
    mechanism_.clear();
  }

 private:
  MechanismCopy mechanism_;
  CK_OBJECT_HANDLE key_ = CK_INVALID_HANDLE;
  OpMask kind_ = 0;
  Phase phase_ = Phase::finished;
  CopyResult copied_ = CopyResult::ok;
};

// The records of one virtual session, one per kind in kReplayableOps, kept up
// to date after each call the session makes, by the same per-function facts
// that keep backend sessions clean (forward/operation_state.hpp).
class SessionOperations {
 public:
  static constexpr std::size_t kKinds = 7;
  static_assert(kReplayableOps == (1u << kKinds) - 1, "the kinds are op's low bits");

  // The record of one kind (a single op:: bit of kReplayableOps).
  OperationRecord& of(OpMask kind) noexcept { return records_[index(kind)]; }
  const OperationRecord& of(OpMask kind) const noexcept { return records_[index(kind)]; }

  // A session opened: nothing recorded, nothing pending.
  void reset() noexcept {
    for (OperationRecord& r : records_) r.end();
    last_resolved = {};
    marks_ = {};
  }

  // The session moved off `from`, a member that failed, with its backend
  // session: the operations it had there are to be replayed on the new
  // member (pending()), or lost, each told to the application by the next
  // call continuing it (take_lost), not by a later one of another kind.
  void moved(std::uint32_t from) noexcept {
    from_ = from;
    marks_.replayed = 0;  // the backend session that had them is gone
    for (std::size_t i = 0; i < kKinds; ++i) {
      const auto kind = static_cast<OpMask>(1u << i);
      OperationRecord& r = records_[i];
      if (r.replayable()) {
        marks_.pending |= kind;
      } else if (r.phase() != Phase::finished) {
        r.end();
        marks_.lost |= kind;
      }
    }
  }
  // The kinds waiting to be replayed on the session's member, and the member
  // they were lost on (for its replay count).
  OpMask pending() const noexcept { return marks_.pending; }
  // Anything pending, lost, replayed or interrupted: one load and a test on
  // every call (replay_calls.hpp, restore_operations), where the separate
  // tests cost a C_Sign 8 instructions (callgrind, issue 15's "+50").
  bool marked() const noexcept { return std::bit_cast<std::uint64_t>(marks_) != 0; }
  std::uint32_t replayed_from() const noexcept { return from_; }
  // No operation recorded, pending or lost: the session may move to another
  // member without losing anything (member_calls.hpp, rebalance).
  bool idle() const noexcept {
    if (marks_.pending != 0 || marks_.lost != 0) return false;
    for (const OperationRecord& r : records_) {
      if (r.phase() != Phase::finished) return false;
    }
    return true;
  }
  // The group's admissions the session has seen (GroupRuntime::admissions).
  std::uint32_t admissions_seen = 0;
  // Its member's gate (MemberHealth::gate) when the session last saw that
  // member up and every admission (member_calls.hpp, before_member_call).
  std::uint32_t gate_seen = 0;
  // What each call on the session checks (group/member_calls.hpp,
  // before_member_call, MemberCall), kept here so that it is one load away:
  // its member's health, which follows Session::member (on_member).
  MemberHealth* member_health = nullptr;
  // Its last object handle resolved (resolved_handle.hpp).
  ResolvedHandle last_resolved;

  // A member answered one of the session's calls with a code saying the call
  // was interrupted (member_calls.hpp, MemberCall); true once per attempt.
  // ... before the call reached it: no backend session could be had there.
  // Read and cleared once per attempt (take_interruption).
  enum class Interruption : std::uint8_t { none, interrupted, unreached };
  void member_interrupted() noexcept {
    if (marks_.interruption == Interruption::none) marks_.interruption = Interruption::interrupted;
  }
  void member_unreached() noexcept { marks_.interruption = Interruption::unreached; }
  bool interrupted() const noexcept { return marks_.interruption != Interruption::none; }
  Interruption take_interruption() noexcept {
    return std::exchange(marks_.interruption, Interruption::none);
  }

  // A pending kind whose operation ended meanwhile (a call the member failed
  // under answered the application, which ends it): nothing to replay.
  void drop_pending(OpMask kind) noexcept { marks_.pending &= static_cast<OpMask>(~kind); }
  // The replay of `kind` ran: it is live on the member (ok), or lost.
  void replayed(OpMask kind, bool ok) noexcept {
    marks_.pending &= static_cast<OpMask>(~kind);
    if (ok) {
      marks_.replayed |= kind;
    } else {
      of(kind).end();
      marks_.lost |= kind;
    }
  }
  // The kinds replayed on the session's backend session, until a call
  // after their end has looked (replayed_ended, settled): the member's
  // operation was p11mux's Init, so p11mux ends it if the member kept it
  // past the application's end of it (replay_calls.hpp, end_kept_replays).
  OpMask replayed() const noexcept { return marks_.replayed; }
  OpMask replayed_ended() const noexcept {
    OpMask ended = 0;
    for (std::size_t i = 0; i < kKinds; ++i) {
      if ((marks_.replayed & (1u << i)) != 0 && records_[i].phase() == Phase::finished)
        ended |= static_cast<OpMask>(1u << i);
    }
    return ended;
  }
  void settled(OpMask kinds) noexcept { marks_.replayed &= static_cast<OpMask>(~kinds); }
  // True once for a kind of `kinds` that a failover lost: the call
  // continuing it answers kOperationLostRv instead of reaching the member.
  bool take_lost(OpMask kinds) noexcept {
    const auto hit = static_cast<OpMask>(marks_.lost & kinds);
    if (hit == 0) [[likely]]
      return false;
    marks_.lost &= static_cast<OpMask>(~hit);
    return true;
  }

  // After the member answered rv to F (fn::C_X) with `args` (the session
  // handle included), unless the member failed: a member's failure changes
  // nothing, so that a single-part call it interrupted stays replayable.
  template <class F, class... A>
  void after(CK_RV rv, A... args) noexcept {
    constexpr Effect e = effect<F>;
    constexpr auto kinds = static_cast<OpMask>(e.ops & kReplayableOps);
    if constexpr (e.step == Step::restore) {
      if (rv == CKR_OK) {
        for (OperationRecord& r : records_) r.restored();
      }
    } else if constexpr (e.step == Step::cancel) {
      if (rv != CKR_OK) return;
      const OpMask cancelled = ops_of_cancel_flags(std::get<1>(std::tuple<A...>{args...}));
      for_each(static_cast<OpMask>(cancelled & kReplayableOps),
               [](OperationRecord& r) { r.end(); });
    } else if constexpr (kinds == 0) {
      return;
    } else if constexpr (e.step == Step::start) {
      if (rv != CKR_OK) return;
      const std::tuple<A...> t{args...};
      const CK_MECHANISM* m = std::get<1>(t);
      CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
      if constexpr (F::args.size() > 2) key = std::get<2>(t);
      // v3.0: an Init with a NULL mechanism cancels the operation.
      marks_.lost &= static_cast<OpMask>(~kinds);
      if (m == nullptr) {
        of(kinds).end();
      } else {
        of(kinds).started(kinds, *m, key);
      }
    } else if constexpr (e.step == Step::update) {
      for_each<kinds>([rv](OperationRecord& r) { r.continued(rv); });
    } else if constexpr (e.step == Step::finish) {
      const bool query = is_length_query<F>(args...);
      for_each<kinds>([rv, query](OperationRecord& r) { r.finishing(rv, query); });
    }
  }

 private:
  static constexpr std::size_t index(OpMask kind) noexcept {
    return static_cast<std::size_t>(std::countr_zero(kind)) % kKinds;
  }
  template <class Fn>
  void for_each(OpMask kinds, Fn fn) noexcept {
    for (std::size_t i = 0; i < kKinds; ++i) {
      if (kinds & (1u << i)) fn(records_[i]);
    }
  }
  // The same for kinds known when compiled (a function's own): no loop, a
  // scan cost a C_Sign 30 instructions (callgrind, issue 15's "+50").
  template <OpMask kMask, class Fn>
  void for_each(Fn fn) noexcept {
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (..., [&] {
        if constexpr ((kMask & (1u << I)) != 0) fn(records_[I]);
      }());
    }
    (std::make_index_sequence<kKinds>{});
  }

  // What a failover or a member's failure left, in one word that a call
  // tests once (marked()).
  struct alignas(8) Marks {
    OpMask pending = 0;   // replayable, to be replayed on the new member
    OpMask lost = 0;      // lost by a failover, not yet told
    OpMask replayed = 0;  // replayed on the backend session the session holds
    Interruption interruption = Interruption::none;
    std::uint8_t zero = 0;  // never set: the word has no padding
  };
  static_assert(sizeof(Marks) == sizeof(std::uint64_t));

  std::array<OperationRecord, kKinds> records_;
  Marks marks_;
  std::uint32_t from_ = 0;
};

// Runs the record's Init again on another member's session, so that the
// runtime can then issue the interrupted call there. `member` is anything
// with BackendPort's call<fn::C_X>(args...); `resolve` maps the record's
// virtual key to that member's handle: CK_RV(CK_OBJECT_HANDLE virtual,
// CK_OBJECT_HANDLE& member) (not called for a digest, which has no key).
// Returns CKR_OK when the member's Init succeeded; kOperationLostRv when the
// record is not replayable; else the resolver's or the member's answer (the
// runtime may try another member, or count the operation lost:
// SessionOperations::replayed).
template <class Member, class Resolve>
CK_RV replay_init(OperationRecord& record, const Member& member, CK_SESSION_HANDLE session,
                  Resolve&& resolve) noexcept {
  if (!record.replayable()) return kOperationLostRv;
  CK_MECHANISM* m = record.mechanism().get();
  const OpMask kind = record.kind();
  if (kind == op::digest) return member.template call<fn::C_DigestInit>(session, m);
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  if (const CK_RV rv = resolve(record.key(), key); rv != CKR_OK) return rv;
  switch (kind) {
    case op::encrypt:
      return member.template call<fn::C_EncryptInit>(session, m, key);
    case op::decrypt:
      return member.template call<fn::C_DecryptInit>(session, m, key);
    case op::sign:
      return member.template call<fn::C_SignInit>(session, m, key);
    case op::verify:
      return member.template call<fn::C_VerifyInit>(session, m, key);
    case op::sign_recover:
      return member.template call<fn::C_SignRecoverInit>(session, m, key);
    case op::verify_recover:
      return member.template call<fn::C_VerifyRecoverInit>(session, m, key);
    default:
      return kOperationLostRv;
  }
}

}  // namespace p11mux
