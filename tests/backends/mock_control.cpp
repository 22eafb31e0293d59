// The mock_* control functions declared in mock_control.h.
#include <cstring>

#include "mock_state.h"

using namespace p11mux::mock;

MOCK_EXPORT int mock_configure(const MockConfig* config) {
  return module().settings.apply(config ? *config : MockConfig{}) ? 0 : -1;
}

MOCK_EXPORT void mock_stats(MockStats* out) {
  if (out == nullptr) return;
  Module& m = module();
  const Counters& c = m.counters;
  auto get = [](const std::atomic<unsigned long>& a) { return a.load(std::memory_order_relaxed); };
  *out = MockStats{};
  out->initialized = m.initialized();
  InitRecord rec = m.init_record();
  out->init_null_args = rec.null_args;
  out->init_had_callbacks = rec.had_callbacks;
  out->init_locking = rec.locking;
  out->init_flags = rec.flags;
  std::memcpy(out->init_reserved, rec.reserved.data(),
              std::min(rec.reserved.size(), sizeof out->init_reserved - 1));
  out->initialize_calls = get(c.initialize_calls);
  out->initialize_ok = get(c.initialize_ok);
  out->finalize_calls = get(c.finalize_calls);
  out->sessions_open = get(c.sessions_open);
  out->sessions_opened_total = get(c.sessions_opened_total);
  out->sessions_closed_total = get(c.sessions_closed_total);
  out->sessions_closed_by_finalize = get(c.sessions_closed_by_finalize);
  out->sessions_dropped = get(c.sessions_dropped);
  m.objects.count(out->session_objects, out->token_objects);
  out->calls_total = get(c.calls_total);
  out->max_concurrent_calls = get(c.max_concurrent_calls);
  out->library_violations = get(c.library_violations);
  out->session_violations = get(c.session_violations);
  out->finalize_during_call = get(c.finalize_during_call);
  out->calls_after_finalize = get(c.calls_after_finalize);
  out->last_session = get(c.last_session);
  out->last_random_len = get(c.last_random_len);
  for (std::size_t i = 0; i < kFunctionCount; ++i) out->calls[i] = get(c.calls[i]);
  out->sessions_open_peak = get(c.sessions_open_peak);
  out->bend_ops_kept = get(c.bend_ops_kept);
  out->bend_lengths_filled = get(c.bend_lengths_filled);
  out->bend_handles_reused = get(c.bend_handles_reused);
  out->bend_key_mat_keys = get(c.bend_key_mat_keys);
  out->bend_session_count = get(c.bend_session_count);
}

MOCK_EXPORT int mock_reset(void) { return module().reset(); }

MOCK_EXPORT unsigned long mock_calls(const char* function_name) {
  int i = function_index(function_name);
  return i < 0 ? ~0UL
               : module().counters.calls[static_cast<unsigned>(i)].load(std::memory_order_relaxed);
}

MOCK_EXPORT const char* mock_function_name(unsigned long index) {
  return index < kFunctionCount ? kFunctions[index].name : nullptr;
}

MOCK_EXPORT void mock_trigger_slot_event(unsigned long slot_id) { module().trigger_event(slot_id); }

MOCK_EXPORT unsigned long mock_fire_notify(unsigned long event) {
  unsigned long called = 0;
  for (const auto& s : module().sessions_with_notify()) {
    s->notify(s->handle, event, s->application);
    ++called;
  }
  return called;
}

MOCK_EXPORT unsigned long mock_drop_sessions(void) { return module().drop_sessions(); }

MOCK_EXPORT unsigned long mock_token_user(unsigned long slot_id) {
  std::shared_ptr<Token> token;
  if (module().token(slot_id, token) != CKR_OK) return MOCK_NOBODY;
  return token->user.load(std::memory_order_relaxed);
}

MOCK_EXPORT void mock_reference_digest(const unsigned char* data, unsigned long len,
                                       unsigned char out[MOCK_DIGEST_LEN]) {
  Digest d = reference_digest(data, len);
  std::memcpy(out, d.data(), d.size());
}

MOCK_EXPORT void mock_reference_signature(unsigned long key_id, const unsigned char* data,
                                          unsigned long len, unsigned char out[MOCK_DIGEST_LEN]) {
  Digest d = reference_signature(key_id, data, len);
  std::memcpy(out, d.data(), d.size());
}

MOCK_EXPORT unsigned char mock_reference_xor_byte(unsigned long key_id) { return xor_byte(key_id); }

MOCK_EXPORT const MockControl* mock_get_control(void) {
  static const MockControl control = {
      mock_configure,
      mock_stats,
      mock_reset,
      mock_calls,
      mock_function_name,
      mock_trigger_slot_event,
      mock_fire_notify,
      mock_drop_sessions,
      mock_token_user,
      mock_reference_digest,
      mock_reference_signature,
      mock_reference_xor_byte,
  };
  return &control;
}
