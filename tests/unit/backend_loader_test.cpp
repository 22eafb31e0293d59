// The backend loader over a fake module (fake_module.hpp), nothing dlopen'ed:
// the best locking the backend accepts (docs/pkcs11-facts.md, "Initializing
// the backend"), init_reserved, a backend someone else initialized, a
// forked child's inherited one, and modules whose function lists are broken.
#include "backend.hpp"
#include "fake_module.hpp"
#include "proxy_mutexes.hpp"

#include <p11mux/ckr_error.hpp>

#include <doctest/doctest.h>

#include <memory>
#include <string>

namespace p11mux {
namespace {

BackendOptions fake_options() {
  BackendOptions options;
  options.path = "fake-module.so";
  options.module = &fake::lookup;
  return options;
}

// The CKR code a failed load throws, and its message.
struct Failure {
  CK_RV rv = CKR_OK;
  std::string what;
};
Failure load_failure(const BackendOptions& options) {
  try {
    Backend backend(options);
  } catch (const CkrError& e) {
    return {e.rv(), e.what()};
  }
  return {};
}

bool os_locking(const CK_C_INITIALIZE_ARGS& a) {
  return a.flags == CKF_OS_LOCKING_OK && a.CreateMutex == nullptr && a.DestroyMutex == nullptr &&
         a.LockMutex == nullptr && a.UnlockMutex == nullptr;
}
// p11mux's own callbacks, never the application's (docs/pkcs11-facts.md).
bool own_callbacks(const CK_C_INITIALIZE_ARGS& a) {
  return a.flags == 0 && a.CreateMutex == &proxy_mutexes::create &&
         a.DestroyMutex == &proxy_mutexes::destroy && a.LockMutex == &proxy_mutexes::lock &&
         a.UnlockMutex == &proxy_mutexes::unlock;
}

TEST_CASE("a backend that accepts OS locking gets it, and is finalized once") {
  fake::reset();
  {
    Backend backend(fake_options());
    CHECK(backend.locking() == BackendLocking::os);
    CHECK(backend.thread_safe());
    CHECK_FALSE(backend.shared());
    CHECK(backend.initialized_by_us());
    CHECK_FALSE(backend.has_v3());
    CHECK(backend.path() == "fake-module.so");
    REQUIRE(fake::module.initialize_args.size() == 1);
    REQUIRE(fake::module.initialize_args[0].has_value());
    CHECK(os_locking(*fake::module.initialize_args[0]));
    CHECK(fake::module.initialize_args[0]->pReserved == nullptr);
    CHECK(backend.finalize() == CKR_OK);
    CHECK_FALSE(backend.initialized_by_us());
  }
  CHECK(fake::module.finalizes == 1);
}

TEST_CASE("CKR_CANT_LOCK to OS locking: p11mux's own mutex callbacks next") {
  fake::reset();
  fake::module.initialize_answers = {CKR_CANT_LOCK};
  Backend backend(fake_options());
  CHECK(backend.locking() == BackendLocking::callbacks);
  CHECK(backend.thread_safe());
  REQUIRE(fake::module.initialize_args.size() == 2);
  REQUIRE(fake::module.initialize_args[1].has_value());
  const CK_C_INITIALIZE_ARGS args = *fake::module.initialize_args[1];
  CHECK(own_callbacks(args));
  // They work, as the backend would use them.
  void* mutex = nullptr;
  REQUIRE(args.CreateMutex(&mutex) == CKR_OK);
  CHECK(args.LockMutex(mutex) == CKR_OK);
  CHECK(args.UnlockMutex(mutex) == CKR_OK);
  CHECK(args.DestroyMutex(mutex) == CKR_OK);
}

TEST_CASE("a backend that takes no locking at all: NULL arguments, and p11mux serializes") {
  fake::reset();
  // CKR_ARGUMENTS_BAD: an old module that refuses the structure itself.
  fake::module.initialize_answers = {CKR_CANT_LOCK, CKR_ARGUMENTS_BAD};
  Backend backend(fake_options());
  CHECK(backend.locking() == BackendLocking::none);
  CHECK_FALSE(backend.thread_safe());
  REQUIRE(fake::module.initialize_args.size() == 3);
  CHECK(os_locking(*fake::module.initialize_args[0]));
  CHECK(own_callbacks(*fake::module.initialize_args[1]));
  CHECK_FALSE(fake::module.initialize_args[2].has_value());
}

TEST_CASE("init_reserved reaches every attempt; without locking the arguments are still passed") {
  fake::reset();
  fake::module.initialize_answers = {CKR_CANT_LOCK, CKR_CANT_LOCK};
  BackendOptions options = fake_options();
  options.init_reserved = "configdir='sql:/tmp/nss' flags=readOnly";
  Backend backend(options);
  CHECK(backend.locking() == BackendLocking::none);
  CHECK_FALSE(backend.thread_safe());
  REQUIRE(fake::module.initialize_args.size() == 3);
  for (const std::string& reserved : fake::module.initialize_reserved) {
    CHECK(reserved == *options.init_reserved);
  }
  REQUIRE(fake::module.initialize_args[2].has_value());
  const CK_C_INITIALIZE_ARGS none = *fake::module.initialize_args[2];
  CHECK(none.flags == 0);
  CHECK((none.CreateMutex == nullptr));
  CHECK((none.LockMutex == nullptr));
}

TEST_CASE("a configured locking kind is the only one tried") {
  fake::reset();
  BackendOptions options = fake_options();
  options.locking = BackendLocking::callbacks;
  {
    Backend backend(options);
    CHECK(backend.locking() == BackendLocking::callbacks);
    REQUIRE(fake::module.initialize_args.size() == 1);
    CHECK(own_callbacks(*fake::module.initialize_args[0]));
  }
  fake::reset();
  fake::module.initialize_answers = {CKR_CANT_LOCK};
  options.locking = BackendLocking::os;
  Failure f = load_failure(options);
  CHECK(fake::module.initialize_args.size() == 1);
  // The backend's refusal of a locking kind is not the application's
  // CKR_CANT_LOCK: it would misdescribe the application's own arguments.
  CHECK(f.rv == CKR_GENERAL_ERROR);
  CHECK(f.what.find("CKR_CANT_LOCK") != std::string::npos);
  CHECK(f.what.find("fake-module.so") != std::string::npos);
}

TEST_CASE("a refusal other than the locking kind's stops at once, with the backend's code") {
  fake::reset();
  fake::module.initialize_answers = {CKR_DEVICE_ERROR};
  Failure f = load_failure(fake_options());
  CHECK(f.rv == CKR_DEVICE_ERROR);
  CHECK(fake::module.initialize_args.size() == 1);
  CHECK(fake::module.finalizes == 0);  // never initialized: nothing to finalize

  fake::reset();
  fake::module.initialize_answers = {CKR_CANT_LOCK, CKR_CANT_LOCK, CKR_CANT_LOCK};
  f = load_failure(fake_options());
  CHECK(f.rv == CKR_GENERAL_ERROR);
  CHECK(fake::module.initialize_args.size() == 3);
}

TEST_CASE("CKR_CRYPTOKI_ALREADY_INITIALIZED: usable, never finalized, assumed not thread-safe") {
  fake::reset();
  fake::module.initialize_answers = {CKR_CRYPTOKI_ALREADY_INITIALIZED};
  {
    Backend backend(fake_options());
    CHECK(backend.shared());
    CHECK_FALSE(backend.initialized_by_us());
    CHECK_FALSE(backend.thread_safe());  // its locking is someone else's choice
    CHECK(backend.locking() == BackendLocking::none);
    CHECK(backend.finalize() == CKR_OK);
  }
  CHECK(fake::module.finalizes == 0);

  // Configured as OS locking: the configuration vouches for it.
  fake::reset();
  fake::module.initialize_answers = {CKR_CRYPTOKI_ALREADY_INITIALIZED};
  BackendOptions options = fake_options();
  options.locking = BackendLocking::os;
  {
    Backend backend(options);
    CHECK(backend.shared());
    CHECK(backend.thread_safe());
  }
  CHECK(fake::module.finalizes == 0);
}

TEST_CASE("a forked child's inherited backend keeps the parent's locking and is finalized") {
  fake::reset();
  fake::module.initialize_answers = {CKR_CRYPTOKI_ALREADY_INITIALIZED};
  BackendOptions options = fake_options();
  options.inherited = BackendLocking::callbacks;
  {
    Backend backend(options);
    CHECK(backend.inherited());
    CHECK_FALSE(backend.shared());
    CHECK(backend.locking() == BackendLocking::callbacks);
    CHECK(backend.thread_safe());
  }
  CHECK(fake::module.finalizes == 1);
}

TEST_CASE("abandon: never finalized, after fork() or with threads stuck inside") {
  fake::reset();
  {
    Backend backend(fake_options());
    backend.abandon();
  }
  CHECK(fake::module.finalizes == 0);
}

TEST_CASE("a module whose C_GetFunctionList fails, returns NULL or is missing is refused") {
  fake::reset();
  fake::module.get_function_list_rv = CKR_HOST_MEMORY;
  Failure f = load_failure(fake_options());
  CHECK(f.rv == CKR_HOST_MEMORY);
  CHECK(f.what.find("C_GetFunctionList failed: CKR_HOST_MEMORY") != std::string::npos);
  CHECK(fake::module.initialize_args.empty());

  fake::reset();
  fake::module.function_list = nullptr;
  f = load_failure(fake_options());
  CHECK(f.rv == CKR_GENERAL_ERROR);
  // Not "failed: CKR_OK": it answered CKR_OK with nothing in it.
  CHECK(f.what.find("C_GetFunctionList returned CKR_OK and no list") != std::string::npos);
  CHECK(fake::module.initialize_args.empty());

  fake::reset();
  fake::module.has_get_function_list = false;
  f = load_failure(fake_options());
  CHECK(f.rv == CKR_GENERAL_ERROR);
  CHECK(f.what.find("not a PKCS#11 module") != std::string::npos);

  fake::reset();
  fake::list_2_40.C_Initialize = nullptr;
  f = load_failure(fake_options());
  CHECK(f.rv == CKR_GENERAL_ERROR);
  CHECK(f.what.find("no C_Initialize") != std::string::npos);
}

TEST_CASE("p11mux named as its own backend is refused before anything is called") {
  fake::reset();
  BackendOptions options = fake_options();
  options.self = &fake::list_2_40;  // the module's C_GetFunctionList returns "p11mux's" list
  Failure f = load_failure(options);
  CHECK(f.rv == CKR_GENERAL_ERROR);
  CHECK(f.what.find("p11mux itself") != std::string::npos);
  CHECK(fake::module.initialize_args.empty());
}

TEST_CASE("a 3.0 module is used through its 3.0 interface") {
  fake::reset_v3();
  fake::list_3_0.C_SessionCancel = [](CK_SESSION_HANDLE, CK_FLAGS) -> CK_RV { return CKR_OK; };
  Backend backend(fake_options());
  CHECK(backend.has_v3());
  CHECK(backend.version().major == 3);
  CHECK((backend.functions().C_SessionCancel == fake::list_3_0.C_SessionCancel));
}

// A 2.x-sized list followed by memory that is not the module's to give.
struct ShortList {
  CK_FUNCTION_LIST list;
  void* beyond[32];
};

TEST_CASE("spec bender: a C_GetFunctionList list that claims 3.x is read as 2.x-sized") {
  fake::reset();
  static ShortList short_list{};
  short_list.list = fake::list_2_40;
  short_list.list.version = {3, 0};
  for (void*& p : short_list.beyond) p = &short_list;  // not NULL: reading them would show
  fake::module.function_list = &short_list.list;
  Backend backend(fake_options());
  CHECK_FALSE(backend.has_v3());
  CHECK(backend.version().major == 2);
  CHECK((backend.functions().C_GetInterfaceList == nullptr));
  CHECK((backend.functions().C_SessionCancel == nullptr));
  CHECK((backend.functions().C_MessageVerifyFinal == nullptr));
  CHECK((backend.functions().C_Initialize == &fake::initialize));
}

}  // namespace
}  // namespace p11mux
