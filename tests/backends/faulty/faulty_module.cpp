// The faulty module's state: initialization, the session table, restarts and
// removal.
#include "faulty_state.hpp"

#include <cstdio>
#include <cstdlib>
#include <vector>

namespace p11mux::faulty {

Module& module() {
  static Module* const instance = [] {
    auto* m = new Module;
    FaultyConfig config{};
    std::string error;
    if (config_from_env(config, error)) m->settings.apply(config);
    // A malformed environment is reported by C_Initialize.
    return m;
  }();
  return *instance;
}

Session::~Session() {
  if (!close_on_destroy.load(std::memory_order_relaxed)) return;
  if (target_closed.exchange(true)) return;
  // Only within the initialization that opened it: after a re-initialization
  // the same target handle may name someone else's session.
  Module& m = module();
  if (!m.initialized() || m.generation() != generation) return;
  if (target->functions.C_CloseSession(target_handle) == CKR_OK) {
    bump(m.counters.target_sessions_closed_by_restart);
  }
}

// ---- lifecycle ----

CK_RV Module::initialize(CK_VOID_PTR init_args) {
  std::lock_guard life(lifecycle_mu_);
  bump(counters.initialize_calls);
  if (initialized()) return CKR_CRYPTOKI_ALREADY_INITIALIZED;
  FaultyConfig env_config{};
  std::string error;
  if (!config_from_env(env_config, error)) {
    std::fprintf(stderr, "libp11mux-faulty: %s\n", error.c_str());
    return CKR_GENERAL_ERROR;
  }
  // Checked by config_from_env above.
  const char* schedule_text = std::getenv("P11MUX_FAULTY_SCHEDULE");
  std::vector<ScheduledFault> schedule =
      parse_schedule(schedule_text != nullptr ? schedule_text : "", error)
          .value_or(std::vector<ScheduledFault>{});
  // The schedule needs a thread of ours, which the application may forbid
  // (PKCS#11 3.0, 5.4 C_Initialize).
  if (!schedule.empty() && init_args != nullptr &&
      (static_cast<CK_C_INITIALIZE_ARGS*>(init_args)->flags & CKF_LIBRARY_CANT_CREATE_OS_THREADS) !=
          0) {
    std::fprintf(stderr,
                 "libp11mux-faulty: P11MUX_FAULTY_SCHEDULE needs a thread: "
                 "CKF_LIBRARY_CANT_CREATE_OS_THREADS\n");
    return CKR_NEED_TO_CREATE_THREADS;
  }
  const Target* t = load_target(settings.target_path(), error);
  if (t == nullptr) {
    std::fprintf(stderr, "libp11mux-faulty: %s\n", error.c_str());
    return CKR_GENERAL_ERROR;
  }
  // The caller's arguments go to the target as they are: its answer (locking
  // accepted or CKR_CANT_LOCK) is the faulty module's, which is thread-safe
  // itself whatever the target is.
  CK_RV rv = t->functions.C_Initialize(init_args);
  if (rv != CKR_OK && rv != CKR_CRYPTOKI_ALREADY_INITIALIZED) return rv;
  owns_target_init_ = rv == CKR_OK;
  target_.store(t, std::memory_order_release);
  generation_.fetch_add(1, std::memory_order_relaxed);
  removed_.store(false, std::memory_order_relaxed);
  initialized_.store(true, std::memory_order_release);
  bump(counters.initialize_ok);
  scheduler.start(std::move(schedule));  // its clock starts now
  return rv;
}

template <class Pred>
std::vector<std::shared_ptr<Session>> Module::take_locked(Pred&& pred) {
  std::vector<std::shared_ptr<Session>> taken;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    if (pred(*it->second)) {
      taken.push_back(std::move(it->second));
      it = sessions_.erase(it);
    } else {
      ++it;
    }
  }
  counters.sessions_open.fetch_sub(taken.size(), std::memory_order_relaxed);
  for (const auto& s : taken) release_slot_places(s->slot);
  return taken;
}

bool Module::finalize_locked() {
  if (!initialized()) return false;
  scheduler.stop();  // its faults touch the session table and the target
  unsigned long inside = active.load(std::memory_order_relaxed);
  if (inside != 0) bump(counters.finalize_during_call, inside);
  initialized_.store(false, std::memory_order_release);
  std::vector<std::shared_ptr<Session>> left;
  {
    std::unique_lock table(table_mu_);
    left = take_locked([](const Session&) { return true; });
  }
  {
    std::unique_lock table(table_mu_);
    removed_sessions_.clear();  // handles are never reused: any of them is stale now
  }
  // The target's C_Finalize closes them.
  for (auto& s : left) s->target_closed.store(true, std::memory_order_relaxed);
  bump(counters.sessions_open_at_finalize, left.size());
  close_kept_sessions(target());
  if (owns_target_init_) (void)target().functions.C_Finalize(nullptr);
  owns_target_init_ = false;
  return true;
}

CK_RV Module::finalize(CK_VOID_PTR reserved) {
  std::lock_guard life(lifecycle_mu_);
  bump(counters.finalize_calls);
  if (reserved != nullptr) return CKR_ARGUMENTS_BAD;
  return finalize_locked() ? CKR_OK : CKR_CRYPTOKI_NOT_INITIALIZED;
}

int Module::reset() {
  std::lock_guard life(lifecycle_mu_);
  int was_initialized = finalize_locked() ? 1 : 0;
  FaultyConfig config{};
  std::string error;
  if (!config_from_env(config, error)) config = FaultyConfig{};
  settings.apply(config);
  counters.reset();
  removed_.store(false, std::memory_order_relaxed);
  slot_faults.reset();
  return was_initialized;
}

const Target* Module::probe_target() {
  if (initialized()) return &target();
  std::string error;
  return load_target(settings.target_path(), error);
}

// ---- sessions ----

CK_RV Module::lookup(CK_SESSION_HANDLE handle, std::shared_ptr<Session>& out) {
  {
    std::shared_lock table(table_mu_);
    if (auto it = sessions_.find(handle); it != sessions_.end()) {
      out = it->second;
      return CKR_OK;
    }
  }
  bump(counters.stale_handle_calls);
  if (removed()) return CKR_DEVICE_REMOVED;
  if (slot_faults.any()) {
    std::optional<CK_SLOT_ID> slot;
    {
      std::shared_lock table(table_mu_);
      if (auto it = removed_sessions_.find(handle); it != removed_sessions_.end())
        slot = it->second;
    }
    if (slot && slot_faults.removed(*slot)) return CKR_DEVICE_REMOVED;
  }
  return CKR_SESSION_HANDLE_INVALID;
}

namespace {

// The target calls Notify with its own handle: the application gets ours.
CK_RV notify_trampoline(CK_SESSION_HANDLE, CK_NOTIFICATION event, CK_VOID_PTR context) {
  auto* s = static_cast<Session*>(context);
  return s->notify(s->handle, event, s->application);
}

}  // namespace

CK_RV Module::open_session(Fn fn, CK_SLOT_ID slot, CK_FLAGS flags, CK_VOID_PTR application,
                           CK_NOTIFY notify, CK_SESSION_HANDLE_PTR out) {
  if (out == nullptr) return CKR_ARGUMENTS_BAD;
  if (removed()) return CKR_TOKEN_NOT_PRESENT;
  if (slot_faults.any()) {
    if (auto rv = slot_faults.enter(slot, SlotCall::token, true)) return *rv;
  }
  // Reserve a place first, so that racing opens never exceed the limit:
  // the slot's first, so that an open its slot refuses is never counted
  // in sessions_open, whose peak (max_sessions_open) tests compare with the
  // slots' limits together.
  if (!reserve_slot_place(slot)) {
    bump(counters.session_count_refusals);
    return CKR_SESSION_COUNT;
  }
  unsigned long now = counters.sessions_open.fetch_add(1, std::memory_order_relaxed) + 1;
  if (unsigned long max = settings.max_sessions(); max != 0 && now > max) {
    counters.sessions_open.fetch_sub(1, std::memory_order_relaxed);
    release_slot_places(slot);
    bump(counters.session_count_refusals);
    return CKR_SESSION_COUNT;
  }
  auto unreserve = [&] {
    counters.sessions_open.fetch_sub(1, std::memory_order_relaxed);
    release_slot_places(slot);
  };
  if (auto rv = settings.inject(fn, counters)) {
    unreserve();
    return *rv;
  }
  settings.delay(fn, counters);

  const Target& t = target();
  if (settings.keep_object_handles()) keep_target_session(t, slot);
  auto s = std::make_shared<Session>(next_handle_.fetch_add(1, std::memory_order_relaxed), slot, &t,
                                     generation(), notify, application);
  std::uint64_t epoch, slot_epoch;
  {
    std::shared_lock table(table_mu_);
    epoch = restart_epoch_;
    slot_epoch = slot_epoch_locked(slot);
  }
  std::shared_lock opening(open_mu_);
  CK_RV rv = t.functions.C_OpenSession(slot, flags, notify ? s.get() : application,
                                       notify ? &notify_trampoline : nullptr, &s->target_handle);
  if (rv != CKR_OK) {
    unreserve();
    return rv;
  }
  bool published = false;
  {
    std::unique_lock table(table_mu_);
    if (restart_epoch_ == epoch && slot_epoch_locked(slot) == slot_epoch)
      published = sessions_.emplace(s->handle, s).second;
  }
  if (!published) {
    // The device (or the slot's token) restarted or went away while the
    // session was being opened: it is gone with the others, and the open failed.
    unreserve();
    s->close_on_destroy.store(true, std::memory_order_relaxed);
    return removed() || slot_faults.removed(slot) ? CKR_DEVICE_REMOVED : CKR_DEVICE_ERROR;
  }
  bump(counters.sessions_opened);
  raise_peak(counters.max_sessions_open, now);
  *out = s->handle;
  return CKR_OK;
}

void Module::keep_target_session(const Target& t, CK_SLOT_ID slot) {
  std::lock_guard kept(kept_mu_);
  if (kept_.contains(slot)) return;
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  // A failure here is the application's open failing next, with its own code.
  if (t.functions.C_OpenSession(slot, CKF_SERIAL_SESSION, nullptr, nullptr, &h) == CKR_OK)
    kept_.emplace(slot, h);
}

void Module::close_kept_sessions(const Target& t) {
  std::lock_guard kept(kept_mu_);
  for (auto [slot, h] : kept_) (void)t.functions.C_CloseSession(h);
  kept_.clear();
}

CK_RV Module::close_session(Fn fn, CK_SESSION_HANDLE handle) {
  std::shared_ptr<Session> s;
  if (CK_RV rv = lookup(handle, s); rv != CKR_OK) return rv;
  if (s->inside.fetch_add(1, std::memory_order_relaxed) != 0) bump(counters.session_violations);
  struct Leave {
    Session& s;
    ~Leave() { s.inside.fetch_sub(1, std::memory_order_relaxed); }
  } leave{*s};
  if (removed()) return CKR_DEVICE_REMOVED;
  if (slot_faults.any()) {
    // A failed close leaves the session open, as a failing HSM would.
    if (auto rv = slot_faults.enter(s->slot, SlotCall::session, true)) return *rv;
  }
  // An injected failure leaves the session open, as a failing HSM would.
  if (auto rv = settings.inject(fn, counters)) return *rv;
  settings.delay(fn, counters);

  if (s->target_closed.exchange(true)) return CKR_SESSION_HANDLE_INVALID;  // raced a restart
  CK_RV rv = s->target->functions.C_CloseSession(s->target_handle);
  if (rv != CKR_OK && rv != CKR_SESSION_HANDLE_INVALID && rv != CKR_SESSION_CLOSED) {
    s->target_closed.store(false, std::memory_order_relaxed);  // still open there
    return rv;
  }
  std::unique_lock table(table_mu_);
  if (auto it = sessions_.find(handle); it != sessions_.end() && it->second == s) {
    sessions_.erase(it);
    counters.sessions_open.fetch_sub(1, std::memory_order_relaxed);
    release_slot_places(s->slot);
    bump(counters.sessions_closed);
  }
  return rv;
}

CK_RV Module::close_all_sessions(Fn fn, CK_SLOT_ID slot) {
  if (removed()) return CKR_TOKEN_NOT_PRESENT;
  if (slot_faults.any()) {
    if (auto rv = slot_faults.enter(slot, SlotCall::token, true)) return *rv;
  }
  if (auto rv = settings.inject(fn, counters)) return *rv;
  std::unique_lock opening(open_mu_);
  CK_RV rv = target().functions.C_CloseAllSessions(slot);
  if (rv != CKR_OK) return rv;
  {
    std::lock_guard kept(kept_mu_);
    kept_.erase(slot);  // closed with the others
  }
  std::vector<std::shared_ptr<Session>> closed;
  {
    std::unique_lock table(table_mu_);
    closed = take_locked([&](const Session& s) { return s.slot == slot; });
  }
  for (auto& s : closed) {
    s->target_closed.store(true, std::memory_order_relaxed);
    // Closing a session under a call in progress on it is the same race as
    // two calls on it at once.
    if (s->inside.load(std::memory_order_relaxed) != 0) bump(counters.session_violations);
  }
  bump(counters.sessions_closed_all, closed.size());
  return rv;
}

unsigned long Module::restart() {
  std::vector<std::shared_ptr<Session>> dropped;
  {
    std::unique_lock table(table_mu_);
    ++restart_epoch_;
    dropped = take_locked([](const Session&) { return true; });
  }
  for (auto& s : dropped) s->close_on_destroy.store(true, std::memory_order_relaxed);
  bump(counters.sessions_dropped, dropped.size());
  bump(counters.restarts);
  // Each target session is closed by whoever drops the last reference: here,
  // or the call still inside it when that call returns.
  return dropped.size();
}

std::uint64_t Module::slot_epoch_locked(CK_SLOT_ID slot) const {
  auto it = slot_epochs_.find(slot);
  return it == slot_epochs_.end() ? 0 : it->second;
}

bool Module::reserve_slot_place(CK_SLOT_ID slot) {
  std::lock_guard places(slot_open_mu_);
  unsigned long& open = slot_open_[slot];
  if (unsigned long max = settings.max_slot_sessions(); max != 0 && open >= max) return false;
  ++open;
  return true;
}

void Module::release_slot_places(CK_SLOT_ID slot, unsigned long n) {
  std::lock_guard places(slot_open_mu_);
  slot_open_[slot] -= n;
}

unsigned long Module::restart_slot(CK_SLOT_ID slot, bool removal) {
  std::vector<std::shared_ptr<Session>> dropped;
  {
    std::unique_lock table(table_mu_);
    ++slot_epochs_[slot];  // an open in progress on the slot fails
    dropped = take_locked([slot](const Session& s) { return s.slot == slot; });
    if (removal) {
      for (const auto& s : dropped) removed_sessions_.emplace(s->handle, slot);
    }
  }
  // Closed in the target as for a whole restart: by the last reference.
  for (auto& s : dropped) s->close_on_destroy.store(true, std::memory_order_relaxed);
  bump(counters.sessions_dropped, dropped.size());
  slot_faults.count_restart(slot, dropped.size());
  return dropped.size();
}

void Module::set_slot_removed(CK_SLOT_ID slot, bool removed) {
  // Removed first, then the restart, as for the whole device.
  slot_faults.set_removed(slot, removed);
  if (removed) restart_slot(slot, true);
}

unsigned long Module::sessions_on(CK_SLOT_ID slot) {
  std::shared_lock table(table_mu_);
  unsigned long n = 0;
  for (const auto& [handle, s] : sessions_) n += s->slot == slot ? 1 : 0;
  return n;
}

void Module::set_removed(bool removed) {
  // Removed first, then the restart: a session whose open overlaps the
  // removal is dropped by the restart or refused by the epoch check.
  removed_.store(removed, std::memory_order_relaxed);
  if (removed) restart();
}

}  // namespace p11mux::faulty
