#include "stats.h"

#include <algorithm>

namespace p11mux::load {

std::string_view call_name(Call call) {
  switch (call) {
    case Call::GenerateRandom:
      return "C_GenerateRandom";
    case Call::DigestInit:
      return "C_DigestInit";
    case Call::Digest:
      return "C_Digest";
    case Call::SignInit:
      return "C_SignInit";
    case Call::Sign:
      return "C_Sign";
    case Call::VerifyInit:
      return "C_VerifyInit";
    case Call::Verify:
      return "C_Verify";
    case Call::EncryptInit:
      return "C_EncryptInit";
    case Call::Encrypt:
      return "C_Encrypt";
    case Call::DecryptInit:
      return "C_DecryptInit";
    case Call::Decrypt:
      return "C_Decrypt";
    case Call::OpenSession:
      return "C_OpenSession";
    case Call::CloseSession:
      return "C_CloseSession";
    case Call::Login:
      return "C_Login";
    case Call::Logout:
      return "C_Logout";
    case Call::FindObjectsInit:
      return "C_FindObjectsInit";
    case Call::FindObjects:
      return "C_FindObjects";
    case Call::FindObjectsFinal:
      return "C_FindObjectsFinal";
  }
  return "?";
}

void OpStats::merge(const OpStats& o) noexcept {
  latency.merge(o.latency);
  ops += o.ops;
  errors += o.errors;
  collisions += o.collisions;
  checks += o.checks;
  check_failures += o.check_failures;
}

void ErrorTable::add(OpKind op, Call call, CK_RV rv) noexcept {
  for (std::size_t i = 0; i < used_; ++i) {
    Entry& e = entries_[i];
    if (e.op == op && e.call == call && e.rv == rv) {
      ++e.count;
      return;
    }
  }
  if (used_ < kSlots) {
    entries_[used_++] = Entry{op, call, rv, 1};
  } else {
    ++overflow_;
  }
}

ThreadStats::ThreadStats(const Mix& mix, bool track_service_time) {
  for (const MixEntry& e : mix.entries())
    per_op[static_cast<std::size_t>(e.op)] = std::make_unique<OpStats>();
  if (track_service_time) service = std::make_unique<LatencyHistogram>();
}

Summary merge_stats(const Mix& mix, const std::vector<std::unique_ptr<ThreadStats>>& threads) {
  Summary s;
  bool service = !threads.empty() && threads.front()->service;
  if (service) s.service = std::make_unique<LatencyHistogram>();
  for (const MixEntry& e : mix.entries())
    s.per_op[static_cast<std::size_t>(e.op)] = std::make_unique<OpStats>();
  for (const auto& t : threads) {
    for (std::size_t i = 0; i < kOpKinds; ++i) {
      if (t->per_op[i]) s.per_op[i]->merge(*t->per_op[i]);
    }
    if (service) s.service->merge(*t->service);
    for (const ErrorTable::Entry& e : t->errors) {
      s.errors[ErrorKey{e.op, e.call, e.rv}] += e.count;
      s.errors_by_rv[e.rv] += e.count;
    }
    s.error_overflow += t->errors.overflow();
    s.warmup_ops += t->warmup_ops;
    s.warmup_errors += t->warmup_errors;
    const AfterWindow& a = t->after_window;
    s.after_window.ops += a.ops;
    s.after_window.errors += a.errors;
    s.after_window.check_failures += a.check_failures;
    for (const ErrorTable::Entry& e : a.kinds) s.after_window.kinds[ErrorKey{e.op, e.call, e.rv}] += e.count;
    s.after_window.overflow += a.kinds.overflow();
  }
  for (const auto& op : s.per_op) {
    if (op) s.total.merge(*op);
  }
  return s;
}

}  // namespace p11mux::load
