// The faulty_* control functions declared in faulty_control.h.
#include "faulty_state.hpp"

#include <cstring>
#include <mutex>
#include <string>

using namespace p11mux::faulty;

#define FAULTY_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

std::mutex error_mu;
std::string last_error;  // guarded by error_mu

}  // namespace

FAULTY_EXPORT int faulty_config_from_env(FaultyConfig* out) {
  if (out == nullptr) return -1;
  FaultyConfig config{};
  std::string error;
  if (!config_from_env(config, error)) {
    std::lock_guard lock(error_mu);
    last_error = error;
    return -1;
  }
  *out = config;
  return 0;
}

FAULTY_EXPORT const char* faulty_last_error(void) {
  std::lock_guard lock(error_mu);
  return last_error.c_str();
}

FAULTY_EXPORT int faulty_configure(const FaultyConfig* config) {
  FaultyConfig c{};
  if (config != nullptr) {
    c = *config;
  } else if (faulty_config_from_env(&c) != 0) {
    return -1;
  }
  return module().settings.apply(c) ? 0 : -1;
}

FAULTY_EXPORT void faulty_stats(FaultyStats* out) {
  if (out == nullptr) return;
  Module& m = module();
  const Counters& c = m.counters;
  auto get = [](const std::atomic<unsigned long>& a) { return a.load(std::memory_order_relaxed); };
  *out = FaultyStats{};
  out->initialized = m.initialized();
  out->initialize_calls = get(c.initialize_calls);
  out->initialize_ok = get(c.initialize_ok);
  out->finalize_calls = get(c.finalize_calls);
  out->calls_total = get(c.calls_total);
  out->calls_not_initialized = get(c.calls_not_initialized);
  out->max_concurrent_calls = get(c.max_concurrent_calls);
  out->session_violations = get(c.session_violations);
  out->finalize_during_call = get(c.finalize_during_call);
  out->sessions_open = get(c.sessions_open);
  out->sessions_opened = get(c.sessions_opened);
  out->sessions_closed = get(c.sessions_closed);
  out->sessions_closed_all = get(c.sessions_closed_all);
  out->sessions_dropped = get(c.sessions_dropped);
  out->sessions_open_at_finalize = get(c.sessions_open_at_finalize);
  out->max_sessions_open = get(c.max_sessions_open);
  out->stale_handle_calls = get(c.stale_handle_calls);
  out->session_count_refusals = get(c.session_count_refusals);
  out->restarts = get(c.restarts);
  out->target_sessions_closed_by_restart = get(c.target_sessions_closed_by_restart);
  out->faults_injected = get(c.faults_injected);
  out->delayed_calls = get(c.delayed_calls);
  for (std::size_t i = 0; i < kFunctionCount; ++i) {
    out->calls[i] = get(c.calls[i]);
    out->faults[i] = get(c.faults[i]);
  }
}

FAULTY_EXPORT int faulty_reset(void) { return module().reset(); }

FAULTY_EXPORT unsigned long faulty_restart(void) { return module().restart(); }

FAULTY_EXPORT void faulty_set_removed(int removed) { module().set_removed(removed != 0); }

FAULTY_EXPORT const char* faulty_function_name(unsigned long i) {
  return i < kFunctionCount ? kNames[i].data() : nullptr;
}

FAULTY_EXPORT unsigned long faulty_calls(const char* name) {
  int i = name != nullptr ? function_index(name) : -1;
  return i < 0
             ? ~0UL
             : module().counters.calls[static_cast<std::size_t>(i)].load(std::memory_order_relaxed);
}

FAULTY_EXPORT void faulty_fail_slot(unsigned long slot, unsigned long rv) {
  module().slot_faults.fail(slot, rv);
}

FAULTY_EXPORT void faulty_set_slot_removed(unsigned long slot, int removed) {
  module().set_slot_removed(slot, removed != 0);
}

FAULTY_EXPORT unsigned long faulty_restart_slot(unsigned long slot) {
  return module().restart_slot(slot);
}

FAULTY_EXPORT void faulty_hang_slot(unsigned long slot, unsigned long ms) {
  module().slot_faults.hang(slot, ms);
}

FAULTY_EXPORT unsigned long faulty_release_slot(unsigned long slot) {
  return module().slot_faults.release(slot);
}

FAULTY_EXPORT void faulty_clear_slot(unsigned long slot) { module().slot_faults.clear(slot); }

FAULTY_EXPORT void faulty_slot_stats(unsigned long slot, FaultySlotStats* out) {
  if (out == nullptr) return;
  *out = module().slot_faults.stats(slot);
  out->sessions_open = module().sessions_on(slot);
}

FAULTY_EXPORT const FaultyControl* faulty_get_control(void) {
  static const FaultyControl control = {
      faulty_configure, faulty_config_from_env, faulty_last_error,       faulty_stats,
      faulty_reset,     faulty_restart,         faulty_set_removed,      faulty_function_name,
      faulty_calls,     faulty_fail_slot,       faulty_set_slot_removed, faulty_restart_slot,
      faulty_hang_slot, faulty_release_slot,    faulty_clear_slot,       faulty_slot_stats,
  };
  return &control;
}
