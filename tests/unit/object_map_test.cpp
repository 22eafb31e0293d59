// Unit tests for proxy/group/object_map: a group's virtual object handles,
// the identity of a token object across members, and its resolution per
// member, over a fake of the members' C_GetAttributeValue and C_FindObjects*.
#include "group/object_map.hpp"

#include <doctest/doctest.h>
#include <spdlog/sinks/ostream_sink.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <future>
#include <mutex>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace p11mux {
namespace {

std::vector<CK_BYTE> bytes(std::string_view s) { return {s.begin(), s.end()}; }

struct FakeObject {
  CK_OBJECT_HANDLE handle;
  CK_OBJECT_CLASS cls;
  bool token = true;
  std::optional<std::vector<CK_BYTE>> id;  // nullopt: the object has no CKA_ID
  std::optional<std::vector<CK_BYTE>> label;
  bool id_sensitive = false;  // CKA_ID answers CKR_ATTRIBUTE_SENSITIVE
};

// Members holding objects; answers as the spec says a module does (v2.40
// C_GetAttributeValue: every attribute processed; a buffer too small and an
// absent or sensitive attribute both get CK_UNAVAILABLE_INFORMATION).
class FakeMembers final : public MemberObjects {
 public:
  explicit FakeMembers(std::size_t count) : members_(count) {}

  CK_OBJECT_HANDLE add(MemberIndex member, FakeObject object) {
    std::lock_guard lock(mutex_);
    object.handle = next_++;
    members_.at(member).push_back(object);
    return object.handle;
  }
  // Numbers every object of a member anew (a restart).
  void renumber(MemberIndex member) {
    std::lock_guard lock(mutex_);
    for (FakeObject& o : members_.at(member)) o.handle = next_++;
  }
  CK_OBJECT_HANDLE handle_of(MemberIndex member, std::size_t i) {
    std::lock_guard lock(mutex_);
    return members_.at(member).at(i).handle;
  }

  CK_RV get_attribute_value(MemberIndex member, CK_OBJECT_HANDLE object, CK_ATTRIBUTE* templ,
                            CK_ULONG count) override {
    ++reads;
    if (during_call) during_call();
    std::lock_guard lock(mutex_);
    const FakeObject* o = find(member, object);
    if (o == nullptr) return CKR_OBJECT_HANDLE_INVALID;
    CK_RV rv = CKR_OK;
    for (CK_ULONG i = 0; i < count; ++i) {
      CK_ATTRIBUTE& a = templ[i];
      std::vector<CK_BYTE> value;
      bool present = true;
      bool sensitive = false;
      switch (a.type) {
        case CKA_CLASS:
          value.resize(sizeof o->cls);
          std::memcpy(value.data(), &o->cls, sizeof o->cls);
          break;
        case CKA_TOKEN:
          value = {static_cast<CK_BYTE>(o->token ? CK_TRUE : CK_FALSE)};
          break;
        case CKA_ID:
          present = o->id.has_value();
          sensitive = o->id_sensitive;
          if (present) value = *o->id;
          break;
        case CKA_LABEL:
          present = o->label.has_value();
          if (present) value = *o->label;
          break;
        default:
          present = false;
      }
      if (sensitive) {
        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        rv = CKR_ATTRIBUTE_SENSITIVE;
      } else if (!present) {
        a.ulValueLen = CK_UNAVAILABLE_INFORMATION;
        rv = CKR_ATTRIBUTE_TYPE_INVALID;
      } else if (a.pValue == nullptr) {
        a.ulValueLen = value.size();
      } else if (a.ulValueLen >= value.size()) {
        if (!value.empty()) std::memcpy(a.pValue, value.data(), value.size());
        a.ulValueLen = value.size();
      } else {
        a.ulValueLen = length_when_small ? value.size() : CK_UNAVAILABLE_INFORMATION;
        rv = CKR_BUFFER_TOO_SMALL;
      }
    }
    return rv;
  }

  CK_RV find_objects(MemberIndex member, const CK_ATTRIBUTE* templ, CK_ULONG count,
                     std::size_t limit, std::vector<CK_OBJECT_HANDLE>& found) override {
    ++finds;
    if (during_call) during_call();
    if (find_error != CKR_OK) return find_error;
    std::lock_guard lock(mutex_);
    for (const FakeObject& o : members_.at(member)) {
      if (found.size() >= limit) break;
      if (matches(o, templ, count)) found.push_back(o.handle);
    }
    return CKR_OK;
  }

  std::atomic<int> reads{0};
  std::atomic<int> finds{0};
  CK_RV find_error = CKR_OK;
  bool length_when_small = false;  // as some modules: the length needed, not unavailable
  std::function<void()> during_call;

 private:
  const FakeObject* find(MemberIndex member, CK_OBJECT_HANDLE handle) const {
    for (const FakeObject& o : members_.at(member)) {
      if (o.handle == handle) return &o;
    }
    return nullptr;
  }
  static bool equal(const std::optional<std::vector<CK_BYTE>>& have, const CK_ATTRIBUTE& a) {
    if (!have || have->size() != a.ulValueLen) return false;
    return a.ulValueLen == 0 || std::memcmp(have->data(), a.pValue, a.ulValueLen) == 0;
  }
  static bool matches(const FakeObject& o, const CK_ATTRIBUTE* templ, CK_ULONG count) {
    for (CK_ULONG i = 0; i < count; ++i) {
      const CK_ATTRIBUTE& a = templ[i];
      switch (a.type) {
        case CKA_CLASS:
          if (*static_cast<const CK_OBJECT_CLASS*>(a.pValue) != o.cls) return false;
          break;
        case CKA_TOKEN:
          if ((*static_cast<const CK_BBOOL*>(a.pValue) == CK_TRUE) != o.token) return false;
          break;
        case CKA_ID:
          if (!equal(o.id, a)) return false;
          break;
        case CKA_LABEL:
          if (!equal(o.label, a)) return false;
          break;
        default:
          return false;
      }
    }
    return true;
  }

  std::mutex mutex_;
  std::vector<std::vector<FakeObject>> members_;
  CK_OBJECT_HANDLE next_ = 100;
};

const LockSource kLocks{};

FakeObject key(std::string_view id, std::string_view label = "key",
               CK_OBJECT_CLASS cls = CKO_PRIVATE_KEY) {
  return {0, cls, true, bytes(id), bytes(label)};
}

// Three members holding the same private key (CKA_ID "\x15\x01"), each under its own handle.
struct ThreeMembers {
  FakeMembers fake{3};
  ObjectMap map{3, ObjectKey::id_or_label, kLocks};
  CK_OBJECT_HANDLE on[3] = {fake.add(0, key("\x15\x01")), fake.add(1, key("\x15\x01")),
                            fake.add(2, key("\x15\x01"))};

  CK_OBJECT_HANDLE issue(MemberIndex m, CK_OBJECT_HANDLE object) {
    const ObjectMap::Issued issued = map.issue_found(fake, m, object);
    REQUIRE(issued.rv == CKR_OK);
    return issued.handle;
  }
};

TEST_CASE("object identity: the rules of object_key") {
  const auto id = std::optional(bytes("\x15\x01"));
  const auto label = std::optional(bytes("signing"));
  const std::optional<std::vector<CK_BYTE>> empty = std::vector<CK_BYTE>{};
  const std::optional<std::vector<CK_BYTE>> absent;

  SUBCASE("id-or-label: the ID, else the label") {
    auto i = identity_under(ObjectKey::id_or_label, CKO_PRIVATE_KEY, id, label);
    REQUIRE(i);
    CHECK(i->by_id);
    CHECK_FALSE(i->by_label);
    CHECK(i->id == *id);
    i = identity_under(ObjectKey::id_or_label, CKO_PRIVATE_KEY, empty, label);
    REQUIRE(i);
    CHECK(i->by_label);
    CHECK_FALSE(i->by_id);
    // A data object has no CKA_ID: its label is its identity.
    CHECK(identity_under(ObjectKey::id_or_label, CKO_DATA, absent, label));
    CHECK_FALSE(identity_under(ObjectKey::id_or_label, CKO_PRIVATE_KEY, empty, empty));
    // An ID of "signing" and a label of "signing" are not the same identity.
    CHECK(identity_under(ObjectKey::id_or_label, CKO_DATA, label, empty) !=
          identity_under(ObjectKey::id_or_label, CKO_DATA, empty, label));
  }
  SUBCASE("id: the ID alone, not empty") {
    auto i = identity_under(ObjectKey::id, CKO_PRIVATE_KEY, id, label);
    REQUIRE(i);
    CHECK(i->label.empty());
    CHECK_FALSE(identity_under(ObjectKey::id, CKO_PRIVATE_KEY, empty, label));
  }
  SUBCASE("label: the label alone, not empty") {
    auto i = identity_under(ObjectKey::label, CKO_PRIVATE_KEY, id, label);
    REQUIRE(i);
    CHECK(i->id.empty());
    CHECK(i->label == *label);
    CHECK_FALSE(identity_under(ObjectKey::label, CKO_PRIVATE_KEY, id, empty));
  }
  SUBCASE("id+label: both, one at least not empty") {
    auto both = identity_under(ObjectKey::id_and_label, CKO_PRIVATE_KEY, id, label);
    auto id_only = identity_under(ObjectKey::id_and_label, CKO_PRIVATE_KEY, id, empty);
    REQUIRE(both);
    REQUIRE(id_only);
    CHECK(both != id_only);
    CHECK_FALSE(identity_under(ObjectKey::id_and_label, CKO_PRIVATE_KEY, empty, empty));
    CHECK_FALSE(identity_under(ObjectKey::id_and_label, CKO_PRIVATE_KEY, id, absent));
  }
  SUBCASE("the class is part of it") {
    CHECK(identity_under(ObjectKey::id, CKO_PRIVATE_KEY, id, label) !=
          identity_under(ObjectKey::id, CKO_PUBLIC_KEY, id, label));
  }
}

TEST_CASE("read_object: one call, the length query only for a long attribute") {
  FakeMembers fake(1);
  const std::string long_label(300, 'L');
  const CK_OBJECT_HANDLE h = fake.add(0, key("\x15\x01", long_label));
  const CK_OBJECT_HANDLE short_one = fake.add(0, key("\x15\x02", "short"));

  ObjectRead read = read_object(fake, 0, short_one, ObjectKey::id_and_label);
  CHECK(fake.reads == 1);
  REQUIRE(read.identity);
  CHECK(read.token);
  CHECK(read.identity->label == bytes("short"));

  fake.reads = 0;
  read = read_object(fake, 0, h, ObjectKey::id_and_label);
  CHECK(fake.reads == 3);  // too small, the length, the value
  REQUIRE(read.identity);
  CHECK(read.identity->label == bytes(long_label));
  CHECK(read.identity->id == bytes("\x15\x01"));

  SUBCASE("a module that writes the length needed on CKR_BUFFER_TOO_SMALL") {
    fake.length_when_small = true;
    fake.reads = 0;
    read = read_object(fake, 0, h, ObjectKey::label);
    CHECK(fake.reads == 3);
    REQUIRE(read.identity);
    CHECK(read.identity->label == bytes(long_label));
  }
  SUBCASE("a sensitive ID: id-or-label takes the label, id cannot match") {
    FakeObject o = key("\x15\x03", "label-of-3");
    o.id_sensitive = true;
    const CK_OBJECT_HANDLE s = fake.add(0, o);
    read = read_object(fake, 0, s, ObjectKey::id_or_label);
    REQUIRE(read.rv == CKR_OK);
    REQUIRE(read.identity);
    CHECK(read.identity->by_label);
    CHECK_FALSE(read_object(fake, 0, s, ObjectKey::id).identity);
  }
  SUBCASE("an object gone: the member's error") {
    CHECK(read_object(fake, 0, 9999, ObjectKey::id).rv == CKR_OBJECT_HANDLE_INVALID);
  }
}

TEST_CASE_FIXTURE(ThreeMembers, "the same object found again, on any member, has one handle") {
  const CK_OBJECT_HANDLE v = issue(0, on[0]);
  CHECK(v != CK_INVALID_HANDLE);
  CHECK(issue(0, on[0]) == v);
  CHECK(issue(2, on[2]) == v);
  CHECK(issue(1, on[1]) == v);
  CHECK(map.size() == 1);
  // The public key of the same pair is another object.
  const CK_OBJECT_HANDLE pub = fake.add(0, key("\x15\x01", "key", CKO_PUBLIC_KEY));
  CHECK(issue(0, pub) != v);
}

TEST_CASE_FIXTURE(ThreeMembers, "resolving on another member searches once, then is cached") {
  const CK_OBJECT_HANDLE v = issue(0, on[0]);
  fake.finds = 0;
  ObjectMap::Resolved r = map.resolve(fake, v, 0);
  CHECK(r.status == ObjectMap::Status::found);
  CHECK(r.object == on[0]);
  CHECK(fake.finds == 0);  // seen there

  r = map.resolve(fake, v, 2);
  CHECK(r.status == ObjectMap::Status::found);
  CHECK(r.object == on[2]);
  CHECK(fake.finds == 1);
  r = map.resolve(fake, v, 2);
  CHECK(r.object == on[2]);
  CHECK(fake.finds == 1);
  CHECK(ObjectMap::to_ckr(r) == CKR_OK);
}

TEST_CASE("resolving: missing on a member, ambiguous on another, a failing one") {
  FakeMembers fake(3);
  std::ostringstream logged;
  spdlog::logger log("object-map-test", std::make_shared<spdlog::sinks::ostream_sink_mt>(logged));
  ObjectMap map(3, ObjectKey::id, kLocks, &log);
  const CK_OBJECT_HANDLE h0 = fake.add(0, key("\x15\x01"));
  fake.add(2, key("\x15\x01", "one"));
  fake.add(2, key("\x15\x01", "two"));
  const CK_OBJECT_HANDLE v = map.issue_found(fake, 0, h0).handle;

  ObjectMap::Resolved r = map.resolve(fake, v, 1);
  CHECK(r.status == ObjectMap::Status::missing);
  CHECK(r.object == CK_INVALID_HANDLE);
  CHECK(ObjectMap::to_ckr(r) == CKR_OBJECT_HANDLE_INVALID);

  r = map.resolve(fake, v, 2);
  CHECK(r.status == ObjectMap::Status::ambiguous);
  CHECK(r.object == CK_INVALID_HANDLE);
  CHECK(r.matches == 2);
  CHECK(ObjectMap::to_ckr(r) == CKR_GENERAL_ERROR);
  const int finds = fake.finds;
  CHECK(map.resolve(fake, v, 2).status == ObjectMap::Status::ambiguous);  // cached
  CHECK(map.resolve(fake, v, 1).status == ObjectMap::Status::missing);
  CHECK(fake.finds == finds);
  // Told once, naming the member and the count.
  const std::string told = logged.str();
  CHECK(told.find("member 2 holds 2 objects of class 0x3 with its CKA_ID") != std::string::npos);
  CHECK(told.find("object_key = id") != std::string::npos);
  CHECK(told.find('\n') == told.rfind('\n'));

  SUBCASE("found there later: a find result replaces the cached miss") {
    const CK_OBJECT_HANDLE h1 = fake.add(1, key("\x15\x01"));
    CHECK(map.issue_found(fake, 1, h1).handle == v);
    r = map.resolve(fake, v, 1);
    CHECK(r.status == ObjectMap::Status::found);
    CHECK(r.object == h1);
  }
  SUBCASE("a failed search: the member's error, not cached") {
    map.member_restarted(1);
    fake.find_error = CKR_DEVICE_ERROR;
    r = map.resolve(fake, v, 1);
    CHECK(r.status == ObjectMap::Status::failed);
    CHECK(r.rv == CKR_DEVICE_ERROR);
    CHECK(ObjectMap::to_ckr(r) == CKR_DEVICE_ERROR);
    fake.find_error = CKR_OK;
    CHECK(map.resolve(fake, v, 1).status == ObjectMap::Status::missing);
  }
}

TEST_CASE("id-or-label: a label standing in for an empty ID is checked object by object") {
  FakeMembers fake(2);
  ObjectMap map(2, ObjectKey::id_or_label, kLocks);
  const CK_OBJECT_HANDLE h0 = fake.add(0, {0, CKO_DATA, true, std::nullopt, bytes("config")});
  // On member 1: a key labelled alike but with an ID of its own (another
  // object), then the copy.
  fake.add(1, {0, CKO_DATA, true, bytes("\x01"), bytes("config")});
  const CK_OBJECT_HANDLE h1 = fake.add(1, {0, CKO_DATA, true, std::nullopt, bytes("config")});
  const CK_OBJECT_HANDLE v = map.issue_found(fake, 0, h0).handle;
  const ObjectMap::Resolved r = map.resolve(fake, v, 1);
  CHECK(r.status == ObjectMap::Status::found);
  CHECK(r.object == h1);
}

TEST_CASE("object_key label and id+label tell objects apart as configured") {
  FakeMembers fake(2);
  const CK_OBJECT_HANDLE a0 = fake.add(0, key("\x15\x01", "a"));
  const CK_OBJECT_HANDLE b0 = fake.add(0, key("\x15\x01", "b"));
  fake.add(1, key("\x15\x09", "a"));
  const CK_OBJECT_HANDLE b1 = fake.add(1, key("\x15\x01", "b"));

  ObjectMap by_label(2, ObjectKey::label, kLocks);
  const CK_OBJECT_HANDLE va = by_label.issue_found(fake, 0, a0).handle;
  CHECK(by_label.issue_found(fake, 0, b0).handle != va);
  CHECK(by_label.resolve(fake, va, 1).status == ObjectMap::Status::found);  // ID differs

  ObjectMap by_both(2, ObjectKey::id_and_label, kLocks);
  const CK_OBJECT_HANDLE wa = by_both.issue_found(fake, 0, a0).handle;
  const CK_OBJECT_HANDLE wb = by_both.issue_found(fake, 0, b0).handle;
  CHECK(wa != wb);
  CHECK(by_both.resolve(fake, wa, 1).status == ObjectMap::Status::missing);
  CHECK(by_both.resolve(fake, wb, 1).object == b1);

  ObjectMap by_id(2, ObjectKey::id, kLocks);
  // Same ID on member 0 twice: one identity, and the member is ambiguous.
  const CK_OBJECT_HANDLE x = by_id.issue_found(fake, 0, a0).handle;
  CHECK(by_id.issue_found(fake, 0, b0).handle == x);
  CHECK(by_id.resolve(fake, x, 0).status == ObjectMap::Status::ambiguous);
}

TEST_CASE_FIXTURE(ThreeMembers, "a restarted member's cached handles are searched again") {
  const CK_OBJECT_HANDLE v = issue(0, on[0]);
  CHECK(map.resolve(fake, v, 1).object == on[1]);
  fake.renumber(1);
  map.member_restarted(1);
  const ObjectMap::Resolved r = map.resolve(fake, v, 1);
  CHECK(r.status == ObjectMap::Status::found);
  CHECK(r.object == fake.handle_of(1, 0));
  CHECK(r.object != on[1]);
  // The others keep theirs.
  const int finds = fake.finds;
  CHECK(map.resolve(fake, v, 0).object == on[0]);
  CHECK(fake.finds == finds);
}

TEST_CASE_FIXTURE(ThreeMembers, "a destroyed object's handle is never valid again") {
  const CK_OBJECT_HANDLE v = issue(0, on[0]);
  map.destroy(v);
  CHECK(map.resolve(fake, v, 0).status == ObjectMap::Status::unknown);
  CHECK(ObjectMap::to_ckr(map.resolve(fake, v, 1)) == CKR_OBJECT_HANDLE_INVALID);
  CHECK(map.size() == 0);
  // Seen again (made again with the same identity): a new handle.
  const CK_OBJECT_HANDLE again = issue(0, on[0]);
  CHECK(again != v);
  CHECK(map.resolve(fake, again, 1).object == on[1]);
}

TEST_CASE("virtual handles are never 0 and never reused") {
  FakeMembers fake(1);
  ObjectMap map(1, ObjectKey::id, kLocks);
  std::set<CK_OBJECT_HANDLE> seen;
  for (int round = 0; round < 3; ++round) {
    std::vector<CK_OBJECT_HANDLE> issued;
    for (int i = 0; i < 200; ++i) {
      // The backend reuses its handle values (one session object after another).
      const CK_OBJECT_HANDLE v =
          map.issue_session_object(0, 7, static_cast<CK_OBJECT_HANDLE>(1000 + i)).handle;
      CHECK(v != CK_INVALID_HANDLE);
      CHECK(seen.insert(v).second);
      issued.push_back(v);
    }
    for (CK_OBJECT_HANDLE v : issued) map.destroy(v);
  }
  CHECK(map.size() == 0);
}

TEST_CASE("session objects are pinned to their member") {
  FakeMembers fake(2);
  ObjectMap map(2, ObjectKey::id_or_label, kLocks);
  const CK_OBJECT_HANDLE made = fake.add(0, {0, CKO_SECRET_KEY, false, bytes("\x15\x01"), {}});
  const CK_OBJECT_HANDLE v = map.issue_session_object(0, 42, made).handle;
  fake.add(1, {0, CKO_SECRET_KEY, true, bytes("\x15\x01"), {}});  // same ID elsewhere: not it

  CHECK(map.pinned_member(v) == MemberIndex{0});
  ObjectMap::Resolved r = map.resolve(fake, v, 0);
  CHECK(r.status == ObjectMap::Status::found);
  CHECK(r.object == made);
  CHECK(map.resolve(fake, v, 1).status == ObjectMap::Status::elsewhere);
  CHECK(fake.finds == 0);
  // A search that returns it: the same handle (CKA_TOKEN false: no identity lookup).
  CHECK(map.issue_found(fake, 0, made).handle == v);

  SUBCASE("its backend session closes") {
    map.forget_session(0, 41);  // another session
    CHECK(map.resolve(fake, v, 0).status == ObjectMap::Status::found);
    map.forget_session(0, 42);
    CHECK(map.resolve(fake, v, 0).status == ObjectMap::Status::unknown);
  }
  SUBCASE("its member restarts") {
    map.member_restarted(1);
    CHECK(map.resolve(fake, v, 0).status == ObjectMap::Status::found);
    map.member_restarted(0);
    CHECK(map.resolve(fake, v, 0).status == ObjectMap::Status::unknown);
    CHECK(map.size() == 0);
  }
}

TEST_CASE("a token object that cannot be matched is pinned where it was seen") {
  FakeMembers fake(2);
  ObjectMap map(2, ObjectKey::id, kLocks);
  const CK_OBJECT_HANDLE h = fake.add(0, key("", "no-id"));
  fake.add(1, key("", "no-id"));
  const CK_OBJECT_HANDLE v = map.issue_found(fake, 0, h).handle;
  CHECK(map.issue_found(fake, 0, h).handle == v);
  CHECK(map.pinned_member(v) == MemberIndex{0});
  CHECK(map.resolve(fake, v, 0).object == h);
  CHECK(map.resolve(fake, v, 1).status == ObjectMap::Status::elsewhere);
}

TEST_CASE_FIXTURE(ThreeMembers, "record: a created object's copies are known without a search") {
  const CK_OBJECT_HANDLE v = issue(0, on[0]);
  CHECK(map.record(v, 1, on[1]));
  CHECK(map.record(v, 2, on[2]));
  CHECK(map.resolve(fake, v, 1).object == on[1]);
  CHECK(map.resolve(fake, v, 2).object == on[2]);
  CHECK(fake.finds == 0);
  CHECK_FALSE(map.record(v + 1, 1, on[1]));
}

TEST_CASE_FIXTURE(ThreeMembers, "every change of the map bumps its version; a lookup does not") {
  // A session keeps its last resolution while the version stays
  // (proxy/group/resolved_handle.hpp): every change must bump it.
  std::uint64_t seen = map.version();
  auto bumped = [&] {
    const std::uint64_t now = map.version();
    const bool moved = now != seen;
    seen = now;
    return moved;
  };
  const CK_OBJECT_HANDLE v = issue(0, on[0]);
  CHECK(bumped());
  CHECK(map.resolve(fake, v, 1).object == on[1]);  // a search, cached
  CHECK(map.resolve(fake, v, 1).object == on[1]);
  CHECK_FALSE(bumped());
  CHECK(map.record(v, 2, on[2]));
  CHECK(bumped());
  ObjectIdentity renamed;
  renamed.cls = CKO_PRIVATE_KEY;
  renamed.by_id = true;
  renamed.id = bytes("\x15\x02");
  CHECK(map.rekey(v, renamed));
  CHECK(bumped());
  const CK_OBJECT_HANDLE pinned =
      map.issue_session_object(0, 42, fake.add(0, key("\x15\x03"))).handle;
  CHECK(bumped());
  map.forget_session(0, 41);  // holds nothing: nothing changes
  CHECK_FALSE(bumped());
  map.forget_session(0, 42);
  CHECK(bumped());
  CHECK(map.resolve(fake, pinned, 0).status == ObjectMap::Status::unknown);
  map.member_restarted(1);
  CHECK(bumped());
  map.destroy(v);
  CHECK(bumped());
}

TEST_CASE_FIXTURE(ThreeMembers, "no lock is held while a member is called") {
  const CK_OBJECT_HANDLE v = issue(0, on[0]);
  // During the member's call, another thread takes every shard's lock
  // (size()); it would wait for a lock held across the call. Its future is
  // kept outside the call, so a held lock fails the check, not the test's
  // progress: the thread finishes once the call has returned.
  std::vector<std::future<void>> others;
  std::atomic<int> got_every_shard{0};
  fake.during_call = [&] {
    others.push_back(std::async(std::launch::async, [&] { (void)map.size(); }));
    if (others.back().wait_for(std::chrono::seconds(2)) == std::future_status::ready) {
      ++got_every_shard;
    }
  };
  CHECK(map.resolve(fake, v, 1).status == ObjectMap::Status::found);
  CHECK(got_every_shard == 1);
  CHECK(map.issue_found(fake, 2, on[2]).handle == v);
  CHECK(got_every_shard == 2);
  fake.during_call = nullptr;
  for (auto& other : others) other.wait();
}

TEST_CASE("many threads issuing and resolving agree on every handle") {
  constexpr std::size_t kMembers = 3;
  constexpr int kObjects = 40;
  constexpr int kThreads = 8;
  FakeMembers fake(kMembers);
  ObjectMap map(kMembers, ObjectKey::id_or_label, kLocks);
  std::vector<std::vector<CK_OBJECT_HANDLE>> on(kMembers);
  for (int i = 0; i < kObjects; ++i) {
    const std::string id = "id-" + std::to_string(i);
    for (std::size_t m = 0; m < kMembers; ++m) on[m].push_back(fake.add(m, key(id)));
  }
  std::vector<std::vector<CK_OBJECT_HANDLE>> got(kThreads, std::vector<CK_OBJECT_HANDLE>(kObjects));
  std::atomic<int> wrong{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kObjects; ++i) {
        const MemberIndex seen_on = static_cast<MemberIndex>((t + i) % kMembers);
        const CK_OBJECT_HANDLE v = map.issue_found(fake, seen_on, on[seen_on][i]).handle;
        got[t][i] = v;
        for (MemberIndex m = 0; m < kMembers; ++m) {
          const ObjectMap::Resolved r = map.resolve(fake, v, m);
          if (r.status != ObjectMap::Status::found || r.object != on[m][i]) ++wrong;
        }
        if (t == 0 && i % 10 == 0) map.member_restarted((i / 10) % kMembers);
      }
    });
  }
  for (std::thread& th : threads) th.join();
  CHECK(wrong == 0);
  std::set<CK_OBJECT_HANDLE> distinct;
  for (int i = 0; i < kObjects; ++i) {
    for (int t = 1; t < kThreads; ++t) CHECK(got[t][i] == got[0][i]);
    distinct.insert(got[0][i]);
  }
  CHECK(distinct.size() == kObjects);
  CHECK(map.size() == kObjects);
}

}  // namespace
}  // namespace p11mux

namespace p11mux {
namespace {

ObjectIdentity key_identity(std::string_view id) {
  return *identity_under(ObjectKey::id_or_label, CKO_PRIVATE_KEY, bytes(id), bytes("key"));
}

}  // namespace

TEST_CASE_FIXTURE(ThreeMembers, "rekey: the handle follows its object's new identity") {
  const CK_OBJECT_HANDLE h = issue(0, on[0]);
  CHECK_FALSE(map.rekey(h + 16 * 1000, key_identity("x")));  // unknown
  // Identities whose shards differ from the handle's: the alias is followed.
  for (int i = 0; i < 32; ++i) {
    const std::string id = "renamed-" + std::to_string(i);
    REQUIRE(map.rekey(h, key_identity(id)));
    CHECK(map.identity_of(h) == key_identity(id));
    const CK_OBJECT_HANDLE there = fake.add(1, key(id));
    CHECK(issue(1, there) == h);
    CHECK(map.find(fake, 1, key_identity(id)).status == ObjectMap::Status::found);
  }
  // The old identity names nothing: an object with it is another handle.
  CHECK(issue(2, on[2]) != h);
  // Destroyed: its last identity names nothing either.
  const std::string last = "renamed-31";
  map.destroy(h);
  CHECK(map.identity_of(h) == std::nullopt);
  const CK_OBJECT_HANDLE again = issue(2, fake.add(2, key(last)));
  CHECK(again != h);
  CHECK(issue(2, fake.add(2, key("renamed-30"))) != h);
}

}  // namespace p11mux
