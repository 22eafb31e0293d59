// Unit tests for proxy/group/object_journal and template_copy: the changes to
// a group's token objects a down member missed, kept in order, bounded, and
// the deep copies of their templates, zeroed when they go (docs/groups.md,
// "Objects", "A member that missed changes").
#include "group/object_journal.hpp"
#include "group/template_copy.hpp"

#include <doctest/doctest.h>

#include <cstring>
#include <memory>
#include <string>
#include <vector>

namespace p11mux {
namespace {

MissedChangePtr change(MissedChange::Kind kind, std::string label) {
  auto c = std::make_shared<MissedChange>();
  c->kind = kind;
  c->object.cls = CKO_DATA;
  c->object.by_label = true;
  c->object.label.assign(label.begin(), label.end());
  return c;
}

std::string label_of(const MissedChangePtr& c) {
  return {c->object.label.begin(), c->object.label.end()};
}

std::vector<std::string> labels(const ObjectJournal::Batch& batch) {
  std::vector<std::string> out;
  for (const MissedChangePtr& c : batch.changes) out.push_back(label_of(c));
  return out;
}

constexpr ObjectJournal::MemberNow kUp{MemberState::up, 0};
constexpr ObjectJournal::MemberNow kDown{MemberState::down, 1};

// Offers `c` to `member` as a call does (kDown: it is down).
ObjectJournal::Kept keep(ObjectJournal& j, std::size_t member, MissedChangePtr c,
                         ObjectJournal::MemberNow now = kDown) {
  MissedChangePtr built;
  return j.keep_unless_reachable(member, now, built, [&] { return c; });
}

}  // namespace

TEST_CASE("template copy: deep, nested arrays one level, zeroed by wipe") {
  CK_OBJECT_CLASS cls = CKO_SECRET_KEY;
  std::string value = "0123456789abcdef0123456789abcdef";  // a secret key's CKA_VALUE
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE inner[] = {{CKA_ENCRYPT, &yes, sizeof yes}};
  CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                          {CKA_VALUE, value.data(), value.size()},
                          {CKA_LABEL, nullptr, 0},
                          {CKA_WRAP_TEMPLATE, inner, sizeof inner}};
  TemplateCopy copy;
  REQUIRE(copy.copy(templ, 4) == TemplateCopy::Result::ok);
  REQUIRE(copy.size() == 4);
  CK_ATTRIBUTE* a = copy.data();
  CHECK(a[0].pValue != &cls);
  CHECK(*static_cast<CK_OBJECT_CLASS*>(a[0].pValue) == CKO_SECRET_KEY);
  CHECK(a[1].pValue != value.data());
  CHECK(std::memcmp(a[1].pValue, value.data(), value.size()) == 0);
  CHECK(a[2].pValue == nullptr);
  CHECK(a[2].ulValueLen == 0);
  // The nested template and its values are the copy's own.
  auto* nested = static_cast<CK_ATTRIBUTE*>(a[3].pValue);
  CHECK(nested != inner);
  CHECK(a[3].ulValueLen == sizeof inner);
  CHECK(nested[0].type == CKA_ENCRYPT);
  CHECK(nested[0].pValue != &yes);
  CHECK(*static_cast<CK_BBOOL*>(nested[0].pValue) == CK_TRUE);
  // The application's template may go: the copy does not point into it.
  value.assign(value.size(), 'x');
  CHECK(static_cast<const char*>(a[1].pValue)[0] == '0');
  // wipe (the destructor's) zeroes the very bytes the values were in.
  const auto* secret = static_cast<const unsigned char*>(a[1].pValue);
  copy.wipe();
  bool zero = true;
  for (std::size_t i = 0; i < 32; ++i)
    zero = zero && secret[i] == 0;  // NOLINT: still ours, cleared
  CHECK(zero);
  CHECK(copy.size() == 0);
}

TEST_CASE("template copy: refused templates leave nothing") {
  TemplateCopy copy;
  CK_ATTRIBUTE null_value{CKA_LABEL, nullptr, 4};
  CHECK(copy.copy(&null_value, 1) == TemplateCopy::Result::bad_template);
  CHECK(copy.copy(nullptr, 1) == TemplateCopy::Result::bad_template);
  std::vector<CK_BYTE> big(TemplateCopy::kMaxBytes + 1);
  CK_ATTRIBUTE large{CKA_VALUE, big.data(), static_cast<CK_ULONG>(big.size())};
  CHECK(copy.copy(&large, 1) == TemplateCopy::Result::too_large);
  CK_ATTRIBUTE innermost[] = {{CKA_LABEL, nullptr, 0}};
  CK_ATTRIBUTE inner[] = {{CKA_WRAP_TEMPLATE, innermost, sizeof innermost}};
  CK_ATTRIBUTE outer{CKA_UNWRAP_TEMPLATE, inner, sizeof inner};
  CHECK(copy.copy(&outer, 1) == TemplateCopy::Result::nested_too_deep);
  CHECK(copy.size() == 0);
  CHECK(copy.copy(nullptr, 0) == TemplateCopy::Result::ok);
}

TEST_CASE("object journal: a reachable member in step takes changes; the others keep them") {
  const LockSource locks;
  ObjectJournal j(3, locks);
  MissedChangePtr built;
  int builds = 0;
  auto build = [&] {
    ++builds;
    return change(MissedChange::Kind::create, "a");
  };
  CHECK(j.keep_unless_reachable(0, kUp, built, build) == ObjectJournal::Kept::take);
  CHECK(builds == 0);  // nothing built for a member that takes it
  CHECK(j.keep_unless_reachable(1, kDown, built, build) == ObjectJournal::Kept::kept);
  CHECK(j.keep_unless_reachable(2, kDown, built, build) == ObjectJournal::Kept::kept);
  CHECK(builds == 1);  // one change, shared
  CHECK(built.use_count() == 3);
  CHECK(j.behind(1));
  CHECK_FALSE(j.behind(0));
  // Behind, a member keeps getting changes kept even when reachable again:
  // in the group's order, never one made directly before those it missed.
  CHECK(keep(j, 1, change(MissedChange::Kind::set, "b"), kUp) == ObjectJournal::Kept::kept);
  CHECK(j.pending(1) == 2);
  // A member that took it and answered as absent.
  MissedChangePtr destroy = change(MissedChange::Kind::destroy, "c");
  CHECK(j.missed(0, destroy, [] { return MissedChangePtr(); }) == ObjectJournal::Kept::kept);
  CHECK(j.behind(0));
}

TEST_CASE("object journal: taken in order; changes kept meanwhile come next; in step when empty") {
  const LockSource locks;
  ObjectJournal j(2, locks);
  for (const char* l : {"1", "2", "3"}) keep(j, 1, change(MissedChange::Kind::set, l));
  ObjectJournal::Batch first = j.take(1, 1);
  CHECK(first.lost == JournalLost::none);
  CHECK(labels(first) == std::vector<std::string>{"1", "2", "3"});
  // While it is brought back, it is still behind: a change goes to the journal.
  CHECK(j.behind(1));
  CHECK(keep(j, 1, change(MissedChange::Kind::set, "4"), kUp) == ObjectJournal::Kept::kept);
  // Absent again after "1": "2", "3" back in front of "4".
  first.changes.erase(first.changes.begin());
  j.put_back(1, std::move(first.changes));
  CHECK(labels(j.take(1, 1)) == std::vector<std::string>{"2", "3", "4"});
  // Nothing left: in step, and changes are taken directly again.
  CHECK(j.take(1, 1).changes.empty());
  CHECK_FALSE(j.behind(1));
  CHECK(keep(j, 1, change(MissedChange::Kind::set, "5"), kUp) == ObjectJournal::Kept::take);
}

TEST_CASE("object journal: a joining member takes changes only once brought up to date") {
  const LockSource locks;
  ObjectJournal j(1, locks);
  // Joining (its login not done yet), having missed nothing: kept, not made
  // there (a change would meet a member not logged in yet).
  const ObjectJournal::MemberNow joining{MemberState::joining, 1};
  CHECK(keep(j, 0, change(MissedChange::Kind::create, "a"), joining) == ObjectJournal::Kept::kept);
  CHECK(labels(j.take(0, 1)) == std::vector<std::string>{"a"});
  CHECK(j.take(0, 1).changes.empty());  // brought up to date
  // Joining still (about to be admitted), in step: it takes changes.
  CHECK(keep(j, 0, change(MissedChange::Kind::set, "b"), joining) == ObjectJournal::Kept::take);
  // Down again, then joining again: its catch-up of that return is not done.
  const ObjectJournal::MemberNow again{MemberState::joining, 2};
  CHECK(keep(j, 0, change(MissedChange::Kind::set, "c"), again) == ObjectJournal::Kept::kept);
  CHECK(keep(j, 0, change(MissedChange::Kind::set, "d"), {MemberState::probing, 2}) ==
        ObjectJournal::Kept::kept);
}

TEST_CASE("object journal: bounded; past the limit the member is lost and its changes freed") {
  const LockSource locks;
  ObjectJournal j(2, locks, /*limit=*/3);
  std::weak_ptr<MissedChange> first;
  for (int i = 0; i < 3; ++i) {
    MissedChangePtr c = change(MissedChange::Kind::create, std::to_string(i));
    if (i == 0) first = c;
    CHECK(keep(j, 0, c) == ObjectJournal::Kept::kept);
  }
  CHECK_FALSE(first.expired());
  CHECK(keep(j, 0, change(MissedChange::Kind::create, "3")) == ObjectJournal::Kept::lost_now);
  CHECK(first.expired());  // dropped: a template's secret zeroed with it
  CHECK(keep(j, 0, change(MissedChange::Kind::create, "4")) == ObjectJournal::Kept::lost);
  CHECK(keep(j, 0, change(MissedChange::Kind::create, "5"), kUp) == ObjectJournal::Kept::lost);
  const ObjectJournal::Batch batch = j.take(0, 1);
  CHECK(batch.lost == JournalLost::overflow);
  CHECK(batch.changes.empty());
  // A change that cannot be kept loses the member too.
  MissedChangePtr none;
  CHECK(j.keep_unless_reachable(1, kDown, none, [] { return MissedChangePtr(); }) ==
        ObjectJournal::Kept::lost_now);
  CHECK(j.lost(1) == JournalLost::not_kept);
}

TEST_CASE("object journal: a change undone is withdrawn; a failed replay loses the member") {
  const LockSource locks;
  ObjectJournal j(1, locks);
  MissedChangePtr kept = change(MissedChange::Kind::create, "undone");
  keep(j, 0, change(MissedChange::Kind::set, "earlier"));
  keep(j, 0, kept);
  j.withdraw(0, kept);
  CHECK(kept.use_count() == 1);
  CHECK(labels(j.take(0, 1)) == std::vector<std::string>{"earlier"});
  keep(j, 0, change(MissedChange::Kind::set, "later"));
  j.lose(0, JournalLost::replay_failed);
  CHECK(j.pending(0) == 0);
  CHECK(j.take(0, 1).lost == JournalLost::replay_failed);
  CHECK(std::string(to_string(JournalLost::replay_failed)) == "replay_failed");
}

}  // namespace p11mux
