#include "group/object_journal.hpp"

#include <iterator>
#include <new>
#include <utility>

namespace p11mux {

std::string_view MissedChange::function() const noexcept {
  switch (kind) {
    case Kind::create:
      return "C_CreateObject";
    case Kind::copy:
      return "C_CopyObject";
    case Kind::set:
      return "C_SetAttributeValue";
    case Kind::destroy:
      return "C_DestroyObject";
  }
  return "?";
}

const char* to_string(JournalLost lost) noexcept {
  switch (lost) {
    case JournalLost::none:
      return "none";
    case JournalLost::overflow:
      return "overflow";
    case JournalLost::not_kept:
      return "not_kept";
    case JournalLost::replay_failed:
      return "replay_failed";
  }
  return "?";
}

ObjectJournal::ObjectJournal(std::size_t members, const LockSource& locks, std::size_t limit)
    : limit_(limit), state_(locks, State{std::vector<Member>(members)}) {}

ObjectJournal::Kept ObjectJournal::keep(Member& m, std::size_t limit, MissedChangePtr& change,
                                        MissedChangePtr (*build)(void*), void* ctx) noexcept {
  const auto lose = [&](JournalLost why) {
    m.changes.clear();  // the last holder of a change zeroes its template
    m.behind = true;
    m.lost = why;
    return Kept::lost_now;
  };
  if (m.changes.size() >= limit) return lose(JournalLost::overflow);
  try {
    if (!change) change = build(ctx);
    if (!change) return lose(JournalLost::not_kept);
    m.changes.push_back(change);
  } catch (const std::bad_alloc&) {
    return lose(JournalLost::not_kept);
  }
  m.behind = true;
  return Kept::kept;
}

ObjectJournal::Batch ObjectJournal::take(std::size_t member, std::uint64_t downs) {
  Batch out;
  Locked s(state_);
  Member& m = s->members.at(member);
  out.lost = m.lost;
  if (m.lost != JournalLost::none) return out;
  if (m.changes.empty()) {
    m.behind = false;  // in step: changes are made on it directly again
    m.in_step_at = downs;
    return out;
  }
  out.changes.assign(std::make_move_iterator(m.changes.begin()),
                     std::make_move_iterator(m.changes.end()));
  m.changes.clear();
  return out;  // still behind: changes meanwhile are kept, after these
}

void ObjectJournal::put_back(std::size_t member, std::vector<MissedChangePtr> changes) {
  Locked s(state_);
  Member& m = s->members.at(member);
  if (m.lost != JournalLost::none) return;
  m.changes.insert(m.changes.begin(), std::make_move_iterator(changes.begin()),
                   std::make_move_iterator(changes.end()));
  m.behind = true;
}

void ObjectJournal::withdraw(std::size_t member, const MissedChangePtr& change) {
  if (!change) return;
  Locked s(state_);
  std::deque<MissedChangePtr>& changes = s->members.at(member).changes;
  // The latest first: it was kept by the call that withdraws it.
  for (auto it = changes.rbegin(); it != changes.rend(); ++it) {
    if (*it == change) {
      changes.erase(std::next(it).base());
      return;
    }
  }
}

void ObjectJournal::lose(std::size_t member, JournalLost why) {
  Locked s(state_);
  Member& m = s->members.at(member);
  m.changes.clear();
  m.behind = true;
  m.lost = why;
}

ObjectJournal::Dropped ObjectJournal::drop(std::size_t member) {
  Locked s(state_);
  Member& m = s->members.at(member);
  const Dropped out{m.changes.size(), m.lost};
  m.changes.clear();
  return out;
}

bool ObjectJournal::behind(std::size_t member) {
  Locked s(state_);
  return s->members.at(member).behind;
}

std::size_t ObjectJournal::pending(std::size_t member) {
  Locked s(state_);
  return s->members.at(member).changes.size();
}

JournalLost ObjectJournal::lost(std::size_t member) {
  Locked s(state_);
  return s->members.at(member).lost;
}

}  // namespace p11mux
