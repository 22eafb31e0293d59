// Module state: initialization, the session table, login, slot events.
#include <algorithm>
#include <cstring>

#include "mock_state.h"

namespace p11mux::mock {

Token::Token(CK_SLOT_ID slot_id)
    : id(slot_id),
      label("mock-token-" + std::to_string(slot_id)),
      user_pin(MOCK_USER_PIN),
      so_pin(MOCK_SO_PIN) {}

void Session::end(Op o) {
  if (o == Op::Find) {
    found.clear();
    found_pos = 0;
  }
  op(o) = OpState{};
}

void Session::end_all() {
  for (std::size_t i = 0; i < kOpCount; ++i) end(static_cast<Op>(i));
}

// ---- lifecycle ----

namespace {

// Which C_Initialize form the arguments ask for; CKR_OK or CKR_ARGUMENTS_BAD.
CK_RV locking_form(const CK_C_INITIALIZE_ARGS* args, unsigned long accepted, unsigned long& form) {
  if (args == nullptr) {
    form = MOCK_LOCK_NONE;
    return CKR_OK;
  }
  int set = (args->CreateMutex != nullptr) + (args->DestroyMutex != nullptr) +
            (args->LockMutex != nullptr) + (args->UnlockMutex != nullptr);
  if (set != 0 && set != 4) return CKR_ARGUMENTS_BAD;
  bool os = (args->flags & CKF_OS_LOCKING_OK) != 0;
  if (os && set == 4)  // the library may use either
    form = (accepted & MOCK_LOCK_OS) ? MOCK_LOCK_OS : MOCK_LOCK_CALLBACKS;
  else if (os)
    form = MOCK_LOCK_OS;
  else
    form = set == 4 ? MOCK_LOCK_CALLBACKS : MOCK_LOCK_NONE;
  return CKR_OK;
}

}  // namespace

CK_RV Module::initialize(CK_VOID_PTR init_args) {
  std::lock_guard life(lifecycle_mu_);
  if (initialized()) return CKR_CRYPTOKI_ALREADY_INITIALIZED;
  if (!settings.apply_environment()) return CKR_GENERAL_ERROR;

  auto* args = static_cast<CK_C_INITIALIZE_ARGS*>(init_args);
  unsigned long accepted = settings.accept_locking.load(std::memory_order_relaxed);
  unsigned long form = 0;
  if (CK_RV rv = locking_form(args, accepted, form); rv != CKR_OK) return rv;
  if ((accepted & form) == 0) return CKR_CANT_LOCK;

  void* mutex = nullptr;
  if (form == MOCK_LOCK_CALLBACKS) {
    // Exercise the caller's callbacks once so a broken set fails loudly.
    CK_RV rv = args->CreateMutex(&mutex);
    if (rv == CKR_OK && (rv = args->LockMutex(mutex)) == CKR_OK) rv = args->UnlockMutex(mutex);
    if (rv != CKR_OK) {
      if (mutex != nullptr) args->DestroyMutex(mutex);
      return rv;
    }
    callbacks_ = *args;
  }
  callback_mutex_ = mutex;

  InitRecord rec;
  rec.null_args = args == nullptr;
  rec.had_callbacks = args != nullptr && args->CreateMutex != nullptr;
  rec.locking = form;
  rec.flags = args ? args->flags : 0;
  if (args != nullptr && args->pReserved != nullptr) {
    const char* text = static_cast<const char*>(args->pReserved);
    rec.reserved.assign(text, strnlen(text, 255));
  }
  record_ = std::move(rec);

  unsigned long slots = settings.slot_count.load(std::memory_order_relaxed);
  {
    std::unique_lock table(table_mu_);
    for (CK_SLOT_ID id = slots; id < tokens_.size(); ++id) objects.erase_token_objects(id);
    tokens_.resize(slots);
    for (CK_SLOT_ID id = 0; id < slots; ++id)
      if (!tokens_[id]) tokens_[id] = std::make_shared<Token>(id);
    thread_safe_.store(form != MOCK_LOCK_NONE, std::memory_order_relaxed);
    initialized_flag_.store(true, std::memory_order_relaxed);
  }
  bump(counters.initialize_ok);
  return CKR_OK;
}

CK_RV Module::finalize() {
  std::lock_guard life(lifecycle_mu_);
  return finalize_locked() ? CKR_OK : CKR_CRYPTOKI_NOT_INITIALIZED;
}

bool Module::finalize_locked() {
  std::vector<std::shared_ptr<Session>> victims;
  {
    std::unique_lock table(table_mu_);
    if (!initialized()) return false;
    initialized_flag_.store(false, std::memory_order_relaxed);
    for (auto& [handle, s] : sessions_) victims.push_back(s);
    sessions_.clear();
    bump(counters.sessions_closed_by_finalize, victims.size());
    forget_sessions_locked(victims);
    for (auto& t : tokens_) t->user.store(kNobody, std::memory_order_relaxed);
  }
  objects.erase_session_objects();
  if (callback_mutex_ != nullptr) callbacks_.DestroyMutex(callback_mutex_);
  callback_mutex_ = nullptr;
  callbacks_ = {};
  {
    std::lock_guard events(event_mu_);
    std::fill(pending_.begin(), pending_.end(), false);
    ++finalize_generation_;
  }
  event_cv_.notify_all();
  return true;
}

int Module::reset() {
  std::lock_guard life(lifecycle_mu_);
  int was_initialized = finalize_locked() ? 1 : 0;
  settings.apply(MockConfig{});
  counters.reset();
  objects.clear();
  {
    std::unique_lock table(table_mu_);
    tokens_.clear();
    next_session_ = MOCK_SESSION_HANDLE_BASE;
    thread_safe_.store(true, std::memory_order_relaxed);
  }
  {
    std::lock_guard events(event_mu_);
    pending_.clear();
  }
  record_ = InitRecord{};
  return was_initialized;
}

InitRecord Module::init_record() const {
  std::lock_guard life(lifecycle_mu_);
  return record_;
}

// ---- lookups ----

CK_RV Module::token(CK_SLOT_ID slot, std::shared_ptr<Token>& out) const {
  std::shared_lock table(table_mu_);
  if (!initialized()) return CKR_CRYPTOKI_NOT_INITIALIZED;
  if (slot >= tokens_.size()) return CKR_SLOT_ID_INVALID;
  out = tokens_[slot];
  return CKR_OK;
}

CK_RV Module::session(CK_SESSION_HANDLE handle, std::shared_ptr<Session>& out) const {
  std::shared_lock table(table_mu_);
  if (!initialized()) return CKR_CRYPTOKI_NOT_INITIALIZED;
  auto it = sessions_.find(handle);
  if (it == sessions_.end()) return CKR_SESSION_HANDLE_INVALID;
  out = it->second;
  return CKR_OK;
}

unsigned long Module::slot_count() const {
  std::shared_lock table(table_mu_);
  return tokens_.size();
}

// ---- sessions ----

CK_RV Module::open_session(const std::shared_ptr<Token>& token, CK_FLAGS flags, CK_VOID_PTR app,
                           CK_NOTIFY notify, CK_SESSION_HANDLE& out) {
  if ((flags & CKF_SERIAL_SESSION) == 0) return CKR_SESSION_PARALLEL_NOT_SUPPORTED;
  auto relaxed = std::memory_order_relaxed;
  unsigned long delay = settings.open_session_us.load(relaxed);
  if (delay == 0 && settings.bends(MOCK_BEND_SLOW_OPEN)) delay = MOCK_BEND_SLOW_OPEN_US;
  pause_us(delay);
  std::unique_lock table(table_mu_);
  if (!initialized()) return CKR_CRYPTOKI_NOT_INITIALIZED;  // finalized meanwhile
  std::lock_guard lock(token->mu);
  unsigned long limit = settings.max_sessions.load(relaxed);
  if (limit != 0 && token->ro_sessions + token->rw_sessions >= limit) return CKR_SESSION_COUNT;
  bool rw = (flags & CKF_RW_SESSION) != 0;
  if (!rw && token->user.load(relaxed) == CKU_SO) return CKR_SESSION_READ_WRITE_SO_EXISTS;
  if (settings.bends(MOCK_BEND_TRANSIENT_COUNT)) {
    unsigned long every = std::max(settings.transient_count_every.load(relaxed), 1UL);
    if ((settings.opens_seen.fetch_add(1, relaxed) + 1) % every == 0) {
      bump(counters.bend_session_count);
      return CKR_SESSION_COUNT;
    }
  }
  CK_SESSION_HANDLE handle = next_session_;
  if (settings.bends(MOCK_BEND_REUSE_HANDLES)) {
    handle = lowest_free(sessions_, MOCK_SESSION_HANDLE_BASE);
    if (handle < next_session_) bump(counters.bend_handles_reused);
  }
  next_session_ = std::max(next_session_, handle + 1);
  sessions_.emplace(handle, std::make_shared<Session>(handle, token, flags, app, notify));
  ++(rw ? token->rw_sessions : token->ro_sessions);
  bump(counters.sessions_open);
  bump(counters.sessions_opened_total);
  // Exact: sessions_open only changes under table_mu_ held exclusively.
  unsigned long now = counters.sessions_open.load(relaxed);
  if (now > counters.sessions_open_peak.load(relaxed))
    counters.sessions_open_peak.store(now, relaxed);
  out = handle;
  return CKR_OK;
}

void Module::forget_sessions_locked(const std::vector<std::shared_ptr<Session>>& victims) {
  for (const auto& s : victims) {
    Token& t = *s->token;
    {
      std::lock_guard lock(t.mu);
      --(s->rw() ? t.rw_sessions : t.ro_sessions);
      // The login belongs to the application's sessions on the token: the
      // last one closing logs out.
      if (t.ro_sessions + t.rw_sessions == 0) t.user.store(kNobody, std::memory_order_relaxed);
    }
    objects.erase_owned_by(s->handle);
    drop(counters.sessions_open);
  }
}

CK_RV Module::close_session(Session& s) {
  std::unique_lock table(table_mu_);
  auto it = sessions_.find(s.handle);
  if (it == sessions_.end() || it->second.get() != &s) return CKR_SESSION_HANDLE_INVALID;
  std::vector<std::shared_ptr<Session>> victims{it->second};
  sessions_.erase(it);
  forget_sessions_locked(victims);
  bump(counters.sessions_closed_total);
  return CKR_OK;
}

CK_RV Module::close_all_sessions(Token& token) {
  std::unique_lock table(table_mu_);
  std::vector<std::shared_ptr<Session>> victims;
  for (auto it = sessions_.begin(); it != sessions_.end();) {
    if (it->second->token.get() == &token) {
      // Closing a session another thread is using is the same race as two
      // calls on it.
      if (it->second->inside.load(std::memory_order_relaxed) != 0)
        bump(counters.session_violations);
      victims.push_back(it->second);
      it = sessions_.erase(it);
    } else {
      ++it;
    }
  }
  forget_sessions_locked(victims);
  bump(counters.sessions_closed_total, victims.size());
  return CKR_OK;
}

unsigned long Module::drop_sessions() {
  std::unique_lock table(table_mu_);
  std::vector<std::shared_ptr<Session>> victims;
  for (auto& [handle, s] : sessions_) victims.push_back(s);
  sessions_.clear();
  forget_sessions_locked(victims);
  bump(counters.sessions_dropped, victims.size());
  return victims.size();
}

std::vector<std::shared_ptr<Session>> Module::sessions_with_notify() const {
  std::shared_lock table(table_mu_);
  std::vector<std::shared_ptr<Session>> out;
  for (const auto& [handle, s] : sessions_)
    if (s->notify != nullptr) out.push_back(s);
  return out;
}

// ---- login ----

namespace {
bool pin_matches(const std::string& expected, const unsigned char* pin, CK_ULONG len) {
  return len == expected.size() && (len == 0 || std::memcmp(pin, expected.data(), len) == 0);
}
}  // namespace

CK_RV Module::login(Session& s, CK_USER_TYPE user, const unsigned char* pin, CK_ULONG pin_len) {
  if (user != CKU_SO && user != CKU_USER && user != CKU_CONTEXT_SPECIFIC)
    return CKR_USER_TYPE_INVALID;
  if (pin == nullptr && pin_len != 0) return CKR_ARGUMENTS_BAD;
  pause_us(settings.open_session_us.load(std::memory_order_relaxed));
  Token& t = *s.token;
  std::lock_guard lock(t.mu);
  if (user == CKU_CONTEXT_SPECIFIC) {
    OpState& sign = s.op(Op::Sign);
    if (!sign.active || !sign.needs_context_login) return CKR_OPERATION_NOT_INITIALIZED;
    if (!pin_matches(t.user_pin, pin, pin_len)) return CKR_PIN_INCORRECT;
    sign.needs_context_login = false;
    return CKR_OK;
  }
  CK_USER_TYPE current = t.user.load(std::memory_order_relaxed);
  if (current == user) return CKR_USER_ALREADY_LOGGED_IN;
  if (current != kNobody) return CKR_USER_ANOTHER_ALREADY_LOGGED_IN;
  if (user == CKU_SO && t.ro_sessions != 0) return CKR_SESSION_READ_ONLY_EXISTS;
  if (!pin_matches(user == CKU_SO ? t.so_pin : t.user_pin, pin, pin_len)) return CKR_PIN_INCORRECT;
  t.user.store(user, std::memory_order_relaxed);
  return CKR_OK;
}

CK_RV Module::logout(Session& s) {
  Token& t = *s.token;
  std::lock_guard lock(t.mu);
  if (t.user.load(std::memory_order_relaxed) == kNobody) return CKR_USER_NOT_LOGGED_IN;
  t.user.store(kNobody, std::memory_order_relaxed);
  return CKR_OK;
}

// ---- slot events ----

void Module::trigger_event(CK_SLOT_ID slot) {
  {
    std::lock_guard lock(event_mu_);
    if (pending_.size() <= slot) pending_.resize(slot + 1, false);
    pending_[slot] = true;
  }
  event_cv_.notify_all();
}

CK_RV Module::wait_for_event(bool block, CK_SLOT_ID& slot) {
  std::unique_lock lock(event_mu_);
  auto take = [&] {
    auto it = std::find(pending_.begin(), pending_.end(), true);
    if (it == pending_.end()) return false;
    *it = false;
    slot = static_cast<CK_SLOT_ID>(it - pending_.begin());
    return true;
  };
  // Checked under event_mu: a C_Finalize that has not bumped the generation
  // yet will, and wake us.
  if (!initialized()) return CKR_CRYPTOKI_NOT_INITIALIZED;
  if (take()) return CKR_OK;
  if (!block) return CKR_NO_EVENT;
  if (settings.wait_blocking_unsupported.load(std::memory_order_relaxed))
    return CKR_FUNCTION_NOT_SUPPORTED;

  unsigned long generation = finalize_generation_;
  // A blocked waiter does not count as "inside" for finalize_during_call, but
  // still does for library_violations (see CallScope).
  active.fetch_sub(1, std::memory_order_relaxed);
  waiting.fetch_add(1, std::memory_order_relaxed);
  event_cv_.wait(lock, [&] {
    return finalize_generation_ != generation ||
           std::find(pending_.begin(), pending_.end(), true) != pending_.end();
  });
  waiting.fetch_sub(1, std::memory_order_relaxed);
  active.fetch_add(1, std::memory_order_relaxed);
  if (finalize_generation_ != generation) return CKR_CRYPTOKI_NOT_INITIALIZED;
  take();
  return CKR_OK;
}

}  // namespace p11mux::mock
