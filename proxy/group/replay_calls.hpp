// Failover without an error for the application (issue 15; docs/groups.md,
// "Replay"): a call on a group's session that its member's failure
// interrupted is made again on another member, when doing so is the same
// call. That holds for
//   - an Init (the failed member kept nothing the new one lacks);
//   - a call continuing an operation of a kind replay knows that had not
//     yet taken data (OperationRecord::replayable: only its Init ran): the
//     Init is replayed on the new member from the record's copy of the
//     mechanism and the key's virtual handle, then the call is made there.
// Anything else that a member's failure interrupted answers the member's
// code, and an operation that cannot be replayed answers kOperationLostRv to
// the call continuing it (member_calls.hpp).
//
// Serialize mode, under the session's lock, on the group's path only
// (forward.hpp's call_on_group_session).
#pragma once

#include "forward/multiplex.hpp"
#include "functions/function_traits.hpp"
#include "group/member_calls.hpp"
#include "group/operation_record.hpp"
#include "sessions/session_table.hpp"

#include <p11mux/pkcs11.h>

#include <array>
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <variant>

namespace p11mux {

// The kinds replay knows that F continues (an Update, a Final, a single-part call).
template <class F>
inline constexpr OpMask kContinuedReplayable =
    continues(effect<F>) ? static_cast<OpMask>(effect<F>.ops& kReplayableOps) : OpMask{0};

// F is made again on another member when its member fails under it: an
// Init, or a call continuing only kinds replay knows.
template <class F>
inline constexpr bool kRetriedOnFailover = effect<F>.step == Step::start ||
                                           (kContinuedReplayable<F> != 0 &&
                                            kContinuedReplayable<F> == effect<F>.ops);

// Replays the operations pending since `s` moved (SessionOperations::moved)
// on its backend session on its new member, which it holds. CKR_OK, or the
// new member's failure (what is not replayed stays pending for the next
// member); an operation the new member refuses is lost.
CK_RV replay_pending(Runtime& rt, Session& s) noexcept REQUIRES(s.lock);

// Ends on `s`'s member the operations replayed there that the
// application's calls have ended since (an error of the call continuing
// one, or an answer p11mux gave without reaching the member) but the
// member may have kept: a module that keeps an operation after an error
// (SoftHSM2; the spec bender's KEEP_OP) would otherwise refuse the
// application's next Init with CKR_OPERATION_ACTIVE, for an operation
// p11mux started. v3.0 C_SessionCancel; else (v2.40) a fresh backend
// session in place of one holding nothing else; else the member answers
// as it would have.
void end_kept_replays(Runtime& rt, Session& s) noexcept REQUIRES(s.lock);

// Ends on `s`'s member the operations of `kinds` that an error of the
// application's call ended (the spec ends them: PKCS#11 v2.40 5.x) but that
// the member may have kept (Binding::maybe, not ops), as end_kept_replays
// does. Whether there were any, and they are ended.
bool end_kept_after_error(Runtime& rt, Session& s, OpMask kinds) noexcept REQUIRES(s.lock);

// After F ran on `s` and its member answered `rv`: whether F is to be made
// again, an Init refused with CKR_OPERATION_ACTIVE for an operation of its
// kind that only a module keeping operations after errors still holds
// (SoftHSM2; the spec bender's KEEP_OP), once that operation is ended here:
// the application gets the spec's answer (docs/groups.md, "Replay"). No cost
// to an Init the member accepts. A test, not a callback making the call: a
// closure holding the call's own closure kept that in memory on the common
// path, 11 instructions a C_SignInit (callgrind, issue 15's "+50").
template <class F>
[[gnu::always_inline]] inline bool init_past_kept(Runtime& rt, Session& s, CK_RV rv) noexcept
    REQUIRES(s.lock) {
  if constexpr (effect<F>.step == Step::start) {
    if (rv == CKR_OPERATION_ACTIVE && end_kept_after_error(rt, s, effect<F>.ops)) [[unlikely]]
      return true;
  }
  return false;
}

// Before F runs on `s`, bound to its backend session: what a failover left.
template <class F>
[[gnu::always_inline]] inline CK_RV restore_operations(Runtime& rt, Session& s) noexcept
    REQUIRES(s.lock) {
  SessionOperations& ops = *s.operations;
  if (!ops.marked()) [[likely]]
    return CKR_OK;
  if (ops.replayed() != 0) end_kept_replays(rt, s);
  if (ops.pending() != 0) {
    if (CK_RV rv = replay_pending(rt, s); rv != CKR_OK) return rv;
  }
  if constexpr (kContinuedReplayable<F> != 0) {
    if (ops.take_lost(kContinuedReplayable<F>)) return kOperationLostRv;
  }
  return CKR_OK;
}

// Whether F, interrupted on `s`'s member, is made again. When the member
// did not run it (`not_run`: its backend session was gone, or none could be
// had): any call, unless it continues an operation replay does not record
// (a search, a message-based one), which is lost. Else, its member down:
// on the next member, an Init, or a call continuing operations that are
// all still replayable.
template <class F>
bool retried_on_failover(const Session& s, bool not_run) noexcept REQUIRES(s.lock) {
  if (not_run) return !continues(effect<F>) || (effect<F>.ops & ~kReplayableOps) == 0;
  if constexpr (effect<F>.step == Step::start) {
    return true;
  } else if constexpr (kRetriedOnFailover<F>) {
    const SessionOperations& ops = *s.operations;
    for (std::size_t i = 0; i < SessionOperations::kKinds; ++i) {
      const auto kind = static_cast<OpMask>(1u << i);
      if ((kContinuedReplayable<F> & kind) != 0 && !ops.of(kind).replayable()) return false;
    }
    return true;
  } else {
    return false;
  }
}

// The lengths F's output buffers were given (the CK_ULONG_PTR after each 'o'
// argument, include/p11mux/functions.h): a member that failed may have
// written one, and the call made again must see the application's.
// `A...`: the arguments after the session handle.
template <class F, class... A>
class OutputLengths {
  static constexpr std::size_t kCount = [] {
    std::size_t n = 0;
    for (std::size_t i = 1; i + 1 < F::args.size(); ++i) n += F::args[i] == 'o';
    return n;
  }();

 public:
  explicit OutputLengths(A... args) noexcept {
    std::size_t n = 0;
    each(args..., [&](CK_ULONG_PTR length) { saved_[n++] = length == nullptr ? 0 : *length; });
  }
  void restore(A... args) const noexcept {
    std::size_t n = 0;
    each(args..., [&](CK_ULONG_PTR length) {
      if (length != nullptr) *length = saved_[n];
      ++n;
    });
  }

 private:
  // `fn` on each output length pointer among `args`, in order.
  template <class Fn>
  static void each(A... args, Fn fn) noexcept {
    const std::tuple<A...> t{args...};
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (..., [&] {
        // Argument I is letter I + 1 (letter 0 is the session handle): an
        // output's length when letter I is that output's 'o'.
        if constexpr (I >= 1 && F::args[I] == 'o') fn(std::get<I>(t));
      }());
    }
    (std::index_sequence_for<A...>{});
  }

  std::array<CK_ULONG, kCount> saved_{};
};

// The value lengths of C_GetAttributeValue's template, which the member
// writes (the needed length, or CK_UNAVAILABLE_INFORMATION): a member that
// wrote them and then answered that its session is gone (a module failing
// late) must not hand the call made again a length the application's
// buffer does not have. Other functions' templates are read only: nothing
// kept. Up to kMax attributes, inline; a longer template is not restorable,
// and its call is not made again.
template <class F, class... A>
class TemplateLengths {
  static constexpr bool kWritten = F::name == "C_GetAttributeValue";
  static constexpr std::size_t kMax = 64;

 public:
  explicit TemplateLengths(A... args) noexcept {
    if constexpr (kWritten) {
      restorable_ = true;
      const std::tuple<A...> t{args...};
      const CK_ATTRIBUTE_PTR templ = std::get<1>(t);
      const CK_ULONG count = std::get<2>(t);
      if (templ == nullptr || count > kMax) {
        restorable_ = templ == nullptr;
        return;
      }
      for (CK_ULONG i = 0; i < count; ++i) saved_[i] = templ[i].ulValueLen;
    }
  }
  bool restorable() const noexcept {
    if constexpr (kWritten) {
      return restorable_;
    } else {
      return true;
    }
  }
  void restore(A... args) const noexcept {
    if constexpr (kWritten) {
      const std::tuple<A...> t{args...};
      const CK_ATTRIBUTE_PTR templ = std::get<1>(t);
      const CK_ULONG count = std::get<2>(t);
      if (templ == nullptr || count > kMax) return;
      for (CK_ULONG i = 0; i < count; ++i) templ[i].ulValueLen = saved_[i];
    }
  }

 private:
  std::array<CK_ULONG, kWritten ? kMax : 0> saved_{};
  [[no_unique_address]] std::conditional_t<kWritten, bool, std::monostate> restorable_{};
};

}  // namespace p11mux
