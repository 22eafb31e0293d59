#include "group/pin_store.hpp"

#include <sys/mman.h>
#include <sys/resource.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <new>
#include <string_view>
#include <system_error>

namespace p11mux {

// A user type's login. All of it, lengths and flags included, is on the
// locked page: a child whose copy of the page reads zero sees nothing kept.
struct PinStore::Slot {
  std::uint32_t kept;         // 1: a login is kept
  std::uint32_t has_pin;      // 0: kept without a PIN (protected authentication path)
  std::uint32_t by_username;  // 1: C_LoginUser's
  std::uint32_t pin_len;
  std::uint32_t username_len;
  CK_UTF8CHAR pin[kMaxKeptPin];
  CK_UTF8CHAR username[kMaxKeptUsername];
};

struct PinStore::Page {
  Slot user;
  Slot so;
};

namespace {

void zero(void* p, std::size_t n) noexcept { ::explicit_bzero(p, n); }

}  // namespace

const char* to_string(PinKeep keep) noexcept {
  switch (keep) {
    case PinKeep::kept:
      return "kept";
    case PinKeep::context_specific:
      return "CKU_CONTEXT_SPECIFIC authorizes one operation and is never kept";
    case PinKeep::unknown_user_type:
      return "not CKU_USER or CKU_SO: not kept";
    case PinKeep::too_long:
      return "longer than p11mux keeps (256 bytes): not kept";
    case PinKeep::no_locked_memory:
      return "no locked memory for it: not kept";
    case PinKeep::forked_child:
      return "a fork()ed child keeps no PIN of its parent's: not kept";
  }
  return "?";
}

PinStore::PinStore(AfterDestruction after) noexcept : after_(after) { map_page(); }

PinStore::PinStore(const LockSource& locks, AfterDestruction after) : mutex_(locks), after_(after) {
  map_page();
}

// Runs once, in the constructor, before any other thread can see the store.
void PinStore::map_page() noexcept {
  static_assert(sizeof(Page) <= 4096, "the store fits the smallest page");
  owner_pid_ = ::getpid();
  const long size = ::sysconf(_SC_PAGESIZE);
  page_size_ = size > 0 ? static_cast<std::size_t>(size) : 4096;
  if (page_size_ < sizeof(Page)) page_size_ = sizeof(Page);  // never on Linux; cheap to say
  void* p = ::mmap(nullptr, page_size_, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) {
    memory_ = Memory::no_page;
    memory_errno_ = errno;
    return;
  }
  auto give_up = [&](Memory why) {
    memory_ = why;
    memory_errno_ = errno;
    ::munmap(p, page_size_);
  };
  // Before anything is written to it: out of core dumps, and out of a child.
  if (::madvise(p, page_size_, MADV_DONTDUMP) != 0) return give_up(Memory::not_excluded_from_dumps);
#ifdef MADV_WIPEONFORK
  wipe_on_fork_ = ::madvise(p, page_size_, MADV_WIPEONFORK) == 0;
#endif
  // Linux before 4.14 answers EINVAL to MADV_WIPEONFORK; MADV_DONTFORK
  // (2.6.16) leaves the child no copy at all, and the store never touches
  // the page in a child (in_forked_child).
  if (!wipe_on_fork_ && ::madvise(p, page_size_, MADV_DONTFORK) != 0) {
    return give_up(Memory::no_page);
  }
  if (::mlock(p, page_size_) != 0) return give_up(Memory::not_locked);
  page_ = new (p) Page{};
  memory_ = Memory::locked;
}

PinStore::~PinStore() {
  // The last owner: no use() can be in progress. In a child, the page is a
  // zeroed copy or absent, and its address may since be another mapping's.
  if (page_ == nullptr || in_forked_child()) return;
  zero(page_, page_size_);
  ::munlock(page_, page_size_);
  if (after_ == AfterDestruction::unmap) ::munmap(page_, page_size_);
}

std::string PinStore::memory_problem() const {
  if (memory_ == Memory::locked) return {};
  std::string what;
  switch (memory_) {
    case Memory::no_page:
      what = "cannot map a page of its own";
      break;
    case Memory::not_locked: {
      what = "cannot lock its page in memory (mlock";
      rlimit limit{};
      if (::getrlimit(RLIMIT_MEMLOCK, &limit) == 0 && limit.rlim_cur != RLIM_INFINITY) {
        what += ", RLIMIT_MEMLOCK " + std::to_string(limit.rlim_cur) + " bytes";
      }
      what += ")";
      break;
    }
    case Memory::not_excluded_from_dumps:
      what = "cannot keep its page out of core dumps (MADV_DONTDUMP)";
      break;
    case Memory::locked:
      break;
  }
  return "the group's PIN is not kept: " + what + ": " +
         std::system_category().message(memory_errno_) +
         "; members that join or recover later stay out until the application logs in again";
}

bool PinStore::in_forked_child() const noexcept { return ::getpid() != owner_pid_; }

PinStore::Slot* PinStore::slot_of(CK_USER_TYPE user_type) const {
  if (page_ == nullptr) return nullptr;
  if (user_type == CKU_USER) return &page_->user;
  if (user_type == CKU_SO) return &page_->so;
  return nullptr;
}

PinKeep PinStore::check(CK_USER_TYPE user_type) const noexcept {
  if (user_type == CKU_CONTEXT_SPECIFIC) return PinKeep::context_specific;
  if (user_type != CKU_USER && user_type != CKU_SO) return PinKeep::unknown_user_type;
  if (in_forked_child()) return PinKeep::forked_child;
  if (memory_ != Memory::locked) return PinKeep::no_locked_memory;
  return PinKeep::kept;
}

PinKeep PinStore::keep(CK_USER_TYPE user_type, const CK_UTF8CHAR* pin, CK_ULONG pin_len) {
  return store(user_type, pin, pin_len, false, nullptr, 0);
}

PinKeep PinStore::keep_by_username(CK_USER_TYPE user_type, const CK_UTF8CHAR* pin, CK_ULONG pin_len,
                                   const CK_UTF8CHAR* username, CK_ULONG username_len) {
  return store(user_type, pin, pin_len, true, username, username_len);
}

PinKeep PinStore::store(CK_USER_TYPE user_type, const CK_UTF8CHAR* pin, CK_ULONG pin_len,
                        bool by_username, const CK_UTF8CHAR* username, CK_ULONG username_len) {
  if (PinKeep refused = check(user_type); refused != PinKeep::kept) return refused;
  if (pin == nullptr) pin_len = 0;  // a protected authentication path: the length means nothing
  if (username == nullptr) username_len = 0;
  MutexGuard guard(mutex_);
  Slot* slot = slot_of(user_type);
  // Replaced or refused alike, the earlier secret goes: the application has
  // just logged in with another.
  zero(slot, sizeof *slot);
  if (pin_len > kMaxKeptPin || username_len > kMaxKeptUsername) return PinKeep::too_long;
  if (pin != nullptr) std::memcpy(slot->pin, pin, pin_len);
  if (username != nullptr) std::memcpy(slot->username, username, username_len);
  slot->pin_len = static_cast<std::uint32_t>(pin_len);
  slot->username_len = static_cast<std::uint32_t>(username_len);
  slot->has_pin = pin != nullptr ? 1 : 0;
  slot->by_username = by_username ? 1 : 0;
  slot->kept = 1;
  return PinKeep::kept;
}

bool PinStore::kept(CK_USER_TYPE user_type) const {
  if (in_forked_child()) return false;
  MutexGuard guard(mutex_);
  const Slot* slot = slot_of(user_type);
  return slot != nullptr && slot->kept == 1;
}

std::optional<KeptLogin> PinStore::lend(CK_USER_TYPE user_type) const {
  Slot* slot = slot_of(user_type);
  if (slot == nullptr || slot->kept != 1) return std::nullopt;
  return KeptLogin{user_type,      slot->has_pin == 1 ? slot->pin : nullptr,
                   slot->pin_len,  slot->by_username == 1,
                   slot->username, slot->username_len};
}

void PinStore::clear(CK_USER_TYPE user_type) {
  if (in_forked_child()) return;
  MutexGuard guard(mutex_);
  if (Slot* slot = slot_of(user_type); slot != nullptr) zero(slot, sizeof *slot);
}

void PinStore::clear_all() {
  if (in_forked_child()) return;
  MutexGuard guard(mutex_);
  if (page_ != nullptr) zero(page_, page_size_);
}

std::span<const unsigned char> PinStore::page_for_test() const noexcept {
  if (page_ == nullptr) return {};
  return {reinterpret_cast<const unsigned char*>(page_), page_size_};
}

}  // namespace p11mux
