#include "entry/interfaces.hpp"

#include "config/config.hpp"
#include "entry/entry_points.hpp"

#include <cstring>
#include <new>
#include <thread>
#include <utility>

namespace p11mux {
namespace {

// The configuration as C_Initialize will read it, and the backend it names,
// loaded but not initialized. Anything that fails leaves 2.40 only.
std::shared_ptr<const ProbedBackend> probe(const CK_FUNCTION_LIST* self) noexcept {
  std::shared_ptr<ProbedBackend> result;
  try {
    result = std::make_shared<ProbedBackend>();
  } catch (const std::bad_alloc&) {
    return nullptr;
  }
  try {
    Config config = load_config(process_environment());
    result->vendor = config.backend.vendor_interfaces;
    if (!config.module.empty()) {
      result->backend = std::make_unique<BackendProbe>(config.module, self);
    }
  } catch (...) {
    // Nothing to log to yet: C_Initialize reports the same problem properly.
    result->backend.reset();
  }
  return result;
}

}  // namespace

std::vector<const CK_INTERFACE*> offered_interfaces(const BackendInterfaces* backend,
                                                    VendorInterfaces vendor) {
  std::vector<const CK_INTERFACE*> offered;
  const bool pass = backend != nullptr && vendor == VendorInterfaces::pass;
  offered.reserve(2 + (pass ? backend->vendor.size() : 0));
  if (backend != nullptr && backend->v3 != nullptr) {
    offered.push_back(entry_points::interface_3_0());
  }
  offered.push_back(entry_points::interface_2_40());
  if (pass) offered.insert(offered.end(), backend->vendor.begin(), backend->vendor.end());
  return offered;
}

const CK_INTERFACE* select_interface(const std::vector<const CK_INTERFACE*>& offered,
                                     const CK_UTF8CHAR* name, const CK_VERSION* version,
                                     CK_FLAGS flags) noexcept {
  for (const CK_INTERFACE* i : offered) {
    // "The cryptoki library can return a default interface of its choice":
    // only a standard one, whose function list the application can read.
    if (name == nullptr ? !is_standard_interface(*i)
                        : std::strcmp(reinterpret_cast<const char*>(name),
                                      reinterpret_cast<const char*>(i->pInterfaceName)) != 0) {
      continue;
    }
    if (version != nullptr) {
      const CK_VERSION v = interface_version(*i);
      if (v.major != version->major || v.minor != version->minor) continue;
    }
    // "Must match all of the supplied flag values (but may include additional flags)".
    if ((i->flags & flags) != flags) continue;
    return i;
  }
  return nullptr;
}

class InterfaceProbe::SpinGuard {
 public:
  explicit SpinGuard(std::atomic<bool>& busy) noexcept : busy_(busy) {
    while (busy_.exchange(true, std::memory_order_acquire)) std::this_thread::yield();
  }
  ~SpinGuard() { busy_.store(false, std::memory_order_release); }
  SpinGuard(const SpinGuard&) = delete;
  SpinGuard& operator=(const SpinGuard&) = delete;

 private:
  std::atomic<bool>& busy_;
};

std::shared_ptr<const ProbedBackend> InterfaceProbe::get(const CK_FUNCTION_LIST* self) noexcept {
  const std::uint64_t wanted = generation_.load(std::memory_order_acquire);
  {
    SpinGuard guard(busy_);
    if (current_ && current_generation_ >= wanted) return current_;
  }
  std::shared_ptr<const ProbedBackend> fresh = probe(self);
  if (!fresh) return nullptr;
  std::shared_ptr<const ProbedBackend> result;
  {
    SpinGuard guard(busy_);
    // Another thread may have published one at least as new meanwhile:
    // everyone then shares that one.
    if (!current_ || current_generation_ < wanted) {
      std::swap(current_, fresh);
      current_generation_ = wanted;
    }
    result = current_;
  }
  return result;  // the replaced or unused result is freed here, outside the lock
}

}  // namespace p11mux
