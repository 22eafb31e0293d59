// Faults aimed at one slot (faulty_control.h): a failure code, a removed
// token, a hang. Restarts of a slot are the session table's (faulty_module.cpp).
#include "faulty_state.hpp"

namespace p11mux::faulty {

void SlotFaults::update_active_locked() {
  unsigned long n = 0;
  for (const auto& [id, s] : slots_) n += s.faulty() ? 1 : 0;
  active_.store(n, std::memory_order_relaxed);
}

std::optional<CK_RV> SlotFaults::enter(CK_SLOT_ID slot, SlotCall call, bool replace) {
  std::unique_lock lock(mu_);
  auto it = slots_.find(slot);
  if (it == slots_.end()) return std::nullopt;
  Slot& s = it->second;
  if (s.hanging && std::chrono::steady_clock::now() < s.hang_until) {
    const std::uint64_t releases = s.releases;
    ++s.stats.hung_now;
    ++s.stats.hung_total;
    // Until released, or until the deadline in force (a later hang_slot may move it).
    while (s.releases == releases && std::chrono::steady_clock::now() < s.hang_until) {
      if (s.hang_until == std::chrono::steady_clock::time_point::max()) {
        released_.wait(lock);
      } else {
        released_.wait_until(lock, s.hang_until);
      }
    }
    --s.stats.hung_now;
  }
  if (s.removed) {
    switch (call) {
      case SlotCall::session:
        ++s.stats.faults;
        return CKR_DEVICE_REMOVED;
      case SlotCall::token:
        ++s.stats.faults;
        return CKR_TOKEN_NOT_PRESENT;
      case SlotCall::slot_info:
        break;  // the slot is there; its info says the token is not
    }
  }
  if (replace && s.fail != CKR_OK) {
    ++s.stats.faults;
    return s.fail;
  }
  return std::nullopt;
}

std::optional<CK_RV> SlotFaults::failing(CK_SLOT_ID slot) {
  std::lock_guard lock(mu_);
  auto it = slots_.find(slot);
  if (it == slots_.end() || it->second.fail == CKR_OK) return std::nullopt;
  ++it->second.stats.faults;
  return it->second.fail;
}

bool SlotFaults::removed(CK_SLOT_ID slot) const {
  std::lock_guard lock(mu_);
  auto it = slots_.find(slot);
  return it != slots_.end() && it->second.removed;
}

void SlotFaults::fail(CK_SLOT_ID slot, CK_RV rv) {
  std::lock_guard lock(mu_);
  slot_locked(slot).fail = rv;
  update_active_locked();
}

void SlotFaults::set_removed(CK_SLOT_ID slot, bool removed) {
  std::lock_guard lock(mu_);
  slot_locked(slot).removed = removed;
  update_active_locked();
}

void SlotFaults::hang(CK_SLOT_ID slot, unsigned long ms) {
  std::lock_guard lock(mu_);
  Slot& s = slot_locked(slot);
  s.hanging = true;
  s.hang_until = ms == FAULTY_HANG_UNTIL_RELEASED
                     ? std::chrono::steady_clock::time_point::max()
                     : std::chrono::steady_clock::now() + std::chrono::milliseconds(ms);
  update_active_locked();
  released_.notify_all();  // timed waiters pick up the new deadline
}

unsigned long SlotFaults::release_locked(Slot& s) {
  s.hanging = false;
  ++s.releases;
  return s.stats.hung_now;
}

unsigned long SlotFaults::release(CK_SLOT_ID slot) {
  unsigned long waiting = 0;
  {
    std::lock_guard lock(mu_);
    waiting = release_locked(slot_locked(slot));
    update_active_locked();
  }
  released_.notify_all();
  return waiting;
}

void SlotFaults::clear(CK_SLOT_ID slot) {
  {
    std::lock_guard lock(mu_);
    Slot& s = slot_locked(slot);
    release_locked(s);
    s.fail = CKR_OK;
    s.removed = false;
    update_active_locked();
  }
  released_.notify_all();
}

void SlotFaults::count_restart(CK_SLOT_ID slot, unsigned long dropped) {
  std::lock_guard lock(mu_);
  Slot& s = slot_locked(slot);
  ++s.stats.restarts;
  s.stats.sessions_dropped += dropped;
}

FaultySlotStats SlotFaults::stats(CK_SLOT_ID slot) const {
  std::lock_guard lock(mu_);
  auto it = slots_.find(slot);
  return it == slots_.end() ? FaultySlotStats{} : it->second.stats;
}

void SlotFaults::reset() {
  {
    std::lock_guard lock(mu_);
    for (auto& [id, s] : slots_) {
      release_locked(s);
      s.fail = CKR_OK;
      s.removed = false;
      const unsigned long waiting = s.stats.hung_now;  // they decrement it as they leave
      s.stats = FaultySlotStats{};
      s.stats.hung_now = waiting;
    }
    update_active_locked();
  }
  released_.notify_all();
}

}  // namespace p11mux::faulty
