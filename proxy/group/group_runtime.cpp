#include "group/group_runtime.hpp"

#include "policy/filters.hpp"

#include <p11mux/ckr_error.hpp>
#include <p11mux/rv_names.hpp>

#include <algorithm>
#include <map>
#include <new>

namespace p11mux {
namespace {

// What one backend holds at C_Initialize: each slot with a token, and its token.
struct Token {
  CK_SLOT_ID slot;
  CK_TOKEN_INFO info;
};

std::string describe(const GroupMember& m) {
  return m.backend + (m.by == GroupMember::By::label ? "/label:" : "/serial:") + m.token;
}

std::string field(const CK_UTF8CHAR* text, std::size_t size) {
  return std::string(unpadded(std::string_view(reinterpret_cast<const char*>(text), size)));
}

std::vector<Token> tokens_of(const NamedBackend& backend, const BackendPort& port) {
  std::vector<CK_SLOT_ID> slots;
  CK_ULONG n = 0;
  CK_RV list_rv = port.call<fn::C_GetSlotList>(CK_BBOOL{CK_TRUE}, nullptr, &n);
  for (int attempt = 0; list_rv == CKR_OK && attempt < 4; ++attempt) {
    slots.resize(n);
    list_rv = port.call<fn::C_GetSlotList>(CK_BBOOL{CK_TRUE}, slots.data(), &n);
    if (list_rv == CKR_OK) slots.resize(std::min<std::size_t>(n, slots.size()));
    if (list_rv != CKR_BUFFER_TOO_SMALL) break;
    list_rv = CKR_OK;
  }
  if (list_rv != CKR_OK) {
    throw CkrError(CKR_GENERAL_ERROR, "[backend." + backend.name + "] '" + backend.module +
                                          "': C_GetSlotList returned " +
                                          std::string(rv_name(list_rv)));
  }
  std::vector<Token> tokens;
  for (CK_SLOT_ID slot : slots) {
    Token t{slot, {}};
    // A slot whose token will not describe itself cannot be matched: left out.
    if (port.call<fn::C_GetTokenInfo>(slot, &t.info) == CKR_OK) tokens.push_back(t);
  }
  return tokens;
}

// One member's mechanisms with their infos; one whose info it will not give is left out.
MechanismList mechanisms_of(const GroupRuntime::Member& m, std::string_view group) {
  std::vector<CK_MECHANISM_TYPE> types;
  CK_ULONG n = 0;
  CK_RV rv = m.port->call<fn::C_GetMechanismList>(m.slot, nullptr, &n);
  for (int attempt = 0; rv == CKR_OK && attempt < 4; ++attempt) {
    types.resize(n);
    rv = m.port->call<fn::C_GetMechanismList>(m.slot, types.data(), &n);
    if (rv == CKR_OK) types.resize(std::min<std::size_t>(n, types.size()));
    if (rv != CKR_BUFFER_TOO_SMALL) break;
    rv = CKR_OK;
  }
  if (rv != CKR_OK) {
    throw CkrError(CKR_GENERAL_ERROR, "[group." + std::string(group) + "] member " +
                                          describe(m.config) + ": C_GetMechanismList returned " +
                                          std::string(rv_name(rv)));
  }
  MechanismList out;
  out.reserve(types.size());
  for (CK_MECHANISM_TYPE type : types) {
    CK_MECHANISM_INFO info{};
    if (m.port->call<fn::C_GetMechanismInfo>(m.slot, type, &info) == CKR_OK)
      out.push_back({type, info});
  }
  return out;
}

}  // namespace

GroupRuntime::GroupRuntime(const Config& config, std::span<const BackendPort* const> ports,
                           spdlog::logger& log)
    : log_(log) {
  // Each backend's tokens, asked once however many members it serves.
  std::map<std::string, std::vector<Token>, std::less<>> tokens;
  for (std::size_t i = 0; i < config.backends.size(); ++i) {
    tokens.emplace(config.backends[i].name, tokens_of(config.backends[i], *ports[i]));
  }
  auto port_of = [&](std::string_view name) -> const BackendPort* {
    for (std::size_t i = 0; i < config.backends.size(); ++i)
      if (config.backends[i].name == name) return ports[i];
    return nullptr;
  };
  groups_.reserve(config.groups.size());
  for (const Group& g : config.groups) {
    // config.cpp refuses these; checked again so that no group slot is empty.
    if (g.members.empty()) throw ConfigError("[group." + g.name + "] has no members");
    GroupSlot& slot = groups_.emplace_back();
    slot.name = g.name;
    std::vector<std::uint32_t> capacity;  // each member's sessions, for `primary`
    for (const GroupMember& m : g.members) {
      const BackendPort* port = port_of(m.backend);
      const auto held = tokens.find(m.backend);
      if (port == nullptr || held == tokens.end()) {
        throw ConfigError("[group." + g.name + "] member " + describe(m) + ": no [backend." +
                          m.backend + "] is configured");
      }
      std::vector<const Token*> found;
      std::string seen;
      for (const Token& t : held->second) {
        if (member_token_matches(m, t.info)) found.push_back(&t);
        seen += (seen.empty() ? "" : ", ") + std::string("label:'") +
                field(t.info.label, sizeof t.info.label) + "' serial:'" +
                field(t.info.serialNumber, sizeof t.info.serialNumber) + "'";
      }
      if (found.size() != 1) {
        throw CkrError(
            CKR_GENERAL_ERROR,
            "[group." + g.name + "] member " + describe(m) + ": " +
                (found.empty()
                     ? "no token of [backend." + m.backend + "] matches (its tokens: " +
                           (seen.empty() ? std::string("none") : seen) + ")"
                     : std::to_string(found.size()) + " tokens match; name the member by serial:"));
      }
      slot.members.push_back(Member{port, found.front()->slot, m});
      capacity.push_back(session_capacity(found.front()->info.ulMaxSessionCount));
      const MemberHealthRules rules = member_health_rules(g);
      slot.health.push_back(std::make_unique<MemberHealth>(rules));
      slot.shortest_period = std::min(rules.recovery_interval, rules.hang_timeout);
    }
    slot.downs_told = std::make_unique<std::atomic<std::uint64_t>[]>(slot.members.size());
    slot.login_refused = std::make_unique<std::atomic<bool>[]>(slot.members.size());
    slot.placement = std::make_unique<SessionPlacement>(g.balance, capacity);
    std::vector<MemberHealth*> healths;
    for (auto& h : slot.health) healths.push_back(h.get());
    slot.balancer = std::make_unique<Balancer>(
        g.balance, healths, capacity,
        std::span<const std::atomic<bool>>(slot.login_refused.get(), slot.members.size()));
    std::vector<MechanismList> lists;
    lists.reserve(slot.members.size());
    for (const Member& m : slot.members) lists.push_back(mechanisms_of(m, g.name));
    slot.mechanisms = intersect_mechanisms(lists);
    log_.info("group '{}' is slot {}: {} member(s), {} mechanism(s) in common", g.name,
              group_slot_id(groups_.size() - 1), slot.members.size(), slot.mechanisms.size());
  }
  // The members shown: a token hidden by any group it is in stays hidden
  // (a session straight on a member would change it behind its group).
  auto hidden = [&](const Member& m) {
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      if (!config.groups[i].hide_members) continue;
      for (const Member& other : groups_[i].members)
        if (other.port == m.port && other.slot == m.slot) return true;
    }
    return false;
  };
  for (const GroupSlot& g : groups_) {
    for (const Member& m : g.members) {
      const bool already = std::any_of(shown_.begin(), shown_.end(), [&](const Shown& s) {
        return s.port == m.port && s.slot == m.slot;
      });
      if (!already && !hidden(m)) {
        shown_.push_back({m.port, m.slot});
        log_.info("member {} of group '{}' is shown as slot {}", describe(m.config), g.name,
                  groups_.size() + shown_.size() - 1);
      }
    }
  }
}

const GroupRuntime::GroupSlot* GroupRuntime::group_at(CK_SLOT_ID slot) const noexcept {
  return slot < groups_.size() ? &groups_[slot] : nullptr;
}

const GroupRuntime::Shown* GroupRuntime::shown_at(CK_SLOT_ID slot) const noexcept {
  if (slot < groups_.size() || slot - groups_.size() >= shown_.size()) return nullptr;
  return &shown_[slot - groups_.size()];
}

bool GroupRuntime::known(CK_SLOT_ID slot) const noexcept {
  return slot < groups_.size() + shown_.size();
}

std::vector<MemberSlot> GroupRuntime::member_slots(const GroupSlot& group) const {
  std::vector<MemberSlot> out;
  out.reserve(group.members.size());
  for (std::size_t i = 0; i < group.members.size(); ++i) {
    const Member& m = group.members[i];
    // A hung member is not asked (the application's call would hang with
    // it): it counts as one that does not answer.
    if (group.health[i]->hung()) continue;
    MemberSlot s;
    // A member that does not answer does not count (docs/groups.md: slot and
    // token info from the members that are up).
    if (m.port->call<fn::C_GetSlotInfo>(m.slot, &s.slot) != CKR_OK) continue;
    CK_TOKEN_INFO token{};
    if ((s.slot.flags & CKF_TOKEN_PRESENT) != 0 &&
        m.port->call<fn::C_GetTokenInfo>(m.slot, &token) == CKR_OK &&
        member_token_matches(m.config, token)) {
      s.token = token;
    } else {
      s.slot.flags &= ~CKF_TOKEN_PRESENT;  // not the member's token: the member has none
    }
    out.push_back(s);
  }
  return out;
}

CK_RV GroupRuntime::get_slot_list(CK_BBOOL token_present, CK_SLOT_ID_PTR list,
                                  CK_ULONG_PTR count) const noexcept {
  try {
    std::vector<CK_SLOT_ID> ids;
    for (std::size_t i = 0; i < groups_.size(); ++i) {
      if (token_present) {
        const std::vector<MemberSlot> members = member_slots(groups_[i]);
        if ((group_slot_info(groups_[i].name, members).flags & CKF_TOKEN_PRESENT) == 0) continue;
      }
      ids.push_back(group_slot_id(i));
    }
    for (std::size_t i = 0; i < shown_.size(); ++i) {
      if (token_present) {
        CK_SLOT_INFO info{};
        if (shown_[i].port->call<fn::C_GetSlotInfo>(shown_[i].slot, &info) != CKR_OK ||
            (info.flags & CKF_TOKEN_PRESENT) == 0)
          continue;
      }
      ids.push_back(groups_.size() + i);
    }
    if (list != nullptr) {
      if (*count < ids.size()) {
        *count = ids.size();
        return CKR_BUFFER_TOO_SMALL;
      }
      std::copy(ids.begin(), ids.end(), list);
    }
    *count = ids.size();
    return CKR_OK;
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
}

CK_RV GroupRuntime::get_slot_info(CK_SLOT_ID slot, CK_SLOT_INFO_PTR info) const noexcept {
  if (const Shown* s = shown_at(slot)) return s->port->call<fn::C_GetSlotInfo>(s->slot, info);
  const GroupSlot* g = group_at(slot);
  if (g == nullptr) return CKR_SLOT_ID_INVALID;
  try {
    *info = group_slot_info(g->name, member_slots(*g));
    return CKR_OK;
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
}

CK_RV GroupRuntime::get_token_info(CK_SLOT_ID slot, CK_TOKEN_INFO_PTR info) const noexcept {
  if (const Shown* s = shown_at(slot)) return s->port->call<fn::C_GetTokenInfo>(s->slot, info);
  const GroupSlot* g = group_at(slot);
  if (g == nullptr) return CKR_SLOT_ID_INVALID;
  try {
    std::vector<CK_TOKEN_INFO> tokens;
    for (const MemberSlot& m : member_slots(*g))
      if (m.token) tokens.push_back(*m.token);
    const std::optional<CK_TOKEN_INFO> token = group_token_info(g->name, tokens);
    if (!token) return CKR_TOKEN_NOT_PRESENT;
    *info = *token;
    return CKR_OK;
  } catch (const std::bad_alloc&) {
    return CKR_HOST_MEMORY;
  }
}

CK_RV GroupRuntime::get_mechanism_list(CK_SLOT_ID slot, CK_MECHANISM_TYPE_PTR list,
                                       CK_ULONG_PTR count) const noexcept {
  if (const Shown* s = shown_at(slot))
    return s->port->call<fn::C_GetMechanismList>(s->slot, list, count);
  const GroupSlot* g = group_at(slot);
  if (g == nullptr) return CKR_SLOT_ID_INVALID;
  return answer_mechanism_list(g->mechanisms, list, count);
}

CK_RV GroupRuntime::get_mechanism_info(CK_SLOT_ID slot, CK_MECHANISM_TYPE type,
                                       CK_MECHANISM_INFO_PTR info) const noexcept {
  if (const Shown* s = shown_at(slot))
    return s->port->call<fn::C_GetMechanismInfo>(s->slot, type, info);
  const GroupSlot* g = group_at(slot);
  if (g == nullptr) return CKR_SLOT_ID_INVALID;
  return answer_mechanism_info(g->mechanisms, type, info);
}

bool GroupRuntime::token_present(const Member& m) noexcept {
  CK_SLOT_INFO info{};
  CK_TOKEN_INFO token{};
  return m.port->call<fn::C_GetSlotInfo>(m.slot, &info) == CKR_OK &&
         (info.flags & CKF_TOKEN_PRESENT) != 0 &&
         m.port->call<fn::C_GetTokenInfo>(m.slot, &token) == CKR_OK &&
         member_token_matches(m.config, token);
}

bool GroupRuntime::present_and_up(const GroupSlot& group, std::size_t member) const noexcept {
  MemberHealth& health = *group.health[member];
  // Counted first, the state read after (as the balancer does): a member
  // marked down before this look is not asked.
  health.begin();
  if (!health.up()) {
    health.cancel();
    return false;
  }
  const bool present = token_present(group.members[member]);
  // In flight only while it runs: not one of the member's calls in its
  // figures, and an absent token is no failure of it.
  health.cancel();
  // Found hung while it was asked: not placed there.
  return present && health.up();
}

std::size_t GroupRuntime::place_session(CK_SLOT_ID slot) const {
  const GroupSlot* g = group_at(slot);
  if (g == nullptr) return kNoMember;
  // A member that cannot be logged in is passed over (its token asked only
  // while no such member is noted): the first one present is taken only when
  // no other member can take the session.
  std::size_t unready = kNoMember;
  const std::size_t member = g->placement->place([&](std::size_t i) {
    const bool ready = login_ready(slot, i);
    if ((!ready && unready != kNoMember) || !present_and_up(*g, i)) return false;
    if (!ready) unready = i;
    return ready;
  });
  if (member != SessionPlacement::kNone) return member;
  if (unready != kNoMember) g->placement->add(unready);
  return unready;
}

std::size_t GroupRuntime::choose_member(CK_SLOT_ID slot) const noexcept {
  const GroupSlot* g = group_at(slot);
  if (g == nullptr) return kNoMember;
  // The pick counts a call on its member; the lane's own call counts it
  // again when it runs (member_calls.hpp, MemberCall), so this one is undone.
  const Balancer::Pick pick = g->balancer->pick();
  if (pick) {
    g->health[pick.member]->cancel();
    return pick.member;
  }
  // No member up can be logged in: one that cannot, whose open says so
  // (GroupLogin::opening), as place_session does.
  for (std::size_t i = 0; i < g->members.size(); ++i) {
    if (g->health[i]->up()) return i;
  }
  return kNoMember;
}

void GroupRuntime::count_session(CK_SLOT_ID slot, std::size_t member) const noexcept {
  if (const GroupSlot* g = group_at(slot)) g->placement->add(member);
}

void GroupRuntime::release_session(CK_SLOT_ID slot, std::size_t member) const noexcept {
  if (const GroupSlot* g = group_at(slot)) g->placement->release(member);
}

std::uint32_t GroupRuntime::member_sessions(CK_SLOT_ID slot, std::size_t member) const noexcept {
  const GroupSlot* g = group_at(slot);
  return g == nullptr || member >= g->members.size() ? 0 : g->placement->sessions(member);
}

bool GroupRuntime::probe(const GroupSlot& group, const Member& m) const noexcept {
  if (!token_present(m)) return false;
  CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
  const CK_RV rv = m.port->call<fn::C_OpenSession>(m.slot, CK_FLAGS{CKF_SERIAL_SESSION},
                                                   CK_VOID_PTR{nullptr}, CK_NOTIFY{nullptr}, &s);
  if (rv != CKR_OK) {
    log_.info("group '{}' member {}: probe's C_OpenSession returned {}", group.name,
              describe(m.config), rv_name(rv));
    return false;
  }
  (void)m.port->call<fn::C_CloseSession>(s);
  return true;
}

void GroupRuntime::watch(HealthClock::time_point now) const noexcept try {
  for (const GroupSlot& g : groups_) {
    for (std::size_t i = 0; i < g.members.size(); ++i) {
      MemberHealth& h = *g.health[i];
      // A call's answer takes a member down without a line (it may be one of
      // many failing at once): said here, once per time it went down.
      const MemberCounters c = h.counters();
      if (c.downs > g.downs_told[i].exchange(c.downs, std::memory_order_relaxed)) {
        log_.warn(
            "group '{}' member {} is down ({}); probed every {} s", g.name,
            describe(g.members[i].config), to_string(c.last_down),
            std::chrono::duration_cast<std::chrono::seconds>(h.rules().recovery_interval).count());
      }
      (void)h.check_hung(now);  // said next round, as any other down
    }
  }
} catch (...) {
  // A log line that could not be made: the next round tries again.
}

void GroupRuntime::recover(
    std::size_t group, std::size_t member, HealthClock::time_point now,
    const std::function<bool(std::size_t, std::size_t)>& join,
    const std::function<void(std::size_t, std::size_t)>& admitted) const noexcept try {
  const GroupSlot& g = groups_.at(group);
  MemberHealth& h = *g.health.at(member);
  // A hung member is probed once its hung calls have returned: a probe
  // would hang the same way (proxy/group/README.md, "A hung member").
  if (h.hung() && h.in_flight() != 0) return;
  if (!h.claim_probe(now)) return;
  const bool ok = probe(g, g.members[member]);
  h.probe_done(ok, HealthClock::now());
  if (!ok) return;
  // Joining: logged in before it takes calls (issue 15, "Login"). A login
  // that fails keeps it down, said next round as any other down.
  if (!join(group, member)) {
    (void)h.mark_down(DownReason::login_failed, HealthClock::now());
    return;
  }
  // What the map cached of it may be stale: dropped before it takes calls.
  admitted(group, member);
  if (h.admit()) {
    g.admissions->fetch_add(1, std::memory_order_acq_rel);
    // After the count: every session of the group looks at it before its
    // next call (member_calls.hpp, before_member_call).
    for (const auto& health : g.health) health->reopened();
    log_.warn("group '{}' member {} is up again", g.name, describe(g.members[member].config));
  }
} catch (...) {
  // A log line that could not be made: the next round tries again.
}

std::vector<MemberFigures> GroupRuntime::member_figures() const {
  std::vector<MemberFigures> out;
  for (const GroupSlot& g : groups_) {
    for (std::size_t i = 0; i < g.members.size(); ++i) {
      const MemberCounters c = g.health[i]->counters();
      out.push_back({g.name, describe(g.members[i].config), to_string(c.state),
                     to_string(c.last_down), c.in_flight, c.calls, c.errors, c.downs, c.hung,
                     c.failovers, c.replays, g.placement->sessions(i),
                     !g.login_refused[i].load(std::memory_order_acquire)});
    }
  }
  return out;
}

std::chrono::milliseconds GroupRuntime::maintenance_period() const noexcept {
  auto shortest = std::chrono::nanoseconds::max();
  for (const GroupSlot& g : groups_) shortest = std::min(shortest, g.shortest_period);
  return std::max(std::chrono::duration_cast<std::chrono::milliseconds>(shortest) / 8,
                  std::chrono::milliseconds(100));
}

CK_RV GroupRuntime::refuse(std::string_view function, CK_SLOT_ID slot,
                           std::string_view why) const noexcept {
  if (!known(slot)) return CKR_SLOT_ID_INVALID;
  log_.warn(
      "{} on slot {} refused (CKR_FUNCTION_NOT_SUPPORTED): not served on groups and their "
      "members yet; {} (docs/groups.md, \"Not built yet\")",
      function, slot, why);
  return CKR_FUNCTION_NOT_SUPPORTED;
}

CK_RV GroupRuntime::refuse_slot_events() const noexcept {
  log_.warn(
      "C_WaitForSlotEvent refused (CKR_FUNCTION_NOT_SUPPORTED): slot events of groups are not "
      "served yet; they come with sessions on groups (docs/groups.md, \"Not built yet\")");
  return CKR_FUNCTION_NOT_SUPPORTED;
}

}  // namespace p11mux
