// PKCS#11 v3.0 through p11mux: the interfaces offered before and after
// C_Initialize (over the mock with and without 3.0, and over the recording
// backend, which also offers a vendor interface and claims fork safety), the
// 3.0 and 2.40 lists, every v3.0 session function forwarded with its arguments
// unchanged and its session mapped, and v3.0 calls on a 2.x backend.
#include "harness.hpp"

#include "functions/function_traits.hpp"
#include "recorder_control.h"

#include <sys/wait.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

namespace p11mux::test {
namespace {

constexpr const char* kVendorEnv = "P11MUX_BACKEND_VENDOR_INTERFACES";

// p11mux's exported v3.0 entry points, and the recorder's (same instance as p11mux's).
struct V3Symbols {
  V3Symbols() {
    void* p11mux = ::dlopen(P11MUX_TEST_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(p11mux != nullptr, ::dlerror());
    get_list = reinterpret_cast<CK_C_GetInterfaceList>(::dlsym(p11mux, "C_GetInterfaceList"));
    get_interface = reinterpret_cast<CK_C_GetInterface>(::dlsym(p11mux, "C_GetInterface"));
    void* recorder = ::dlopen(P11MUX_TEST_RECORDER_PATH, RTLD_NOW | RTLD_LOCAL);
    REQUIRE_MESSAGE(recorder != nullptr, ::dlerror());
    last_call = reinterpret_cast<RecorderLastCallFn>(::dlsym(recorder, "recorder_last_call"));
    reset_recorder = reinterpret_cast<RecorderResetFn>(::dlsym(recorder, "recorder_reset"));
    recorder_get_interface =
        reinterpret_cast<CK_C_GetInterface>(::dlsym(recorder, "C_GetInterface"));
    REQUIRE(static_cast<bool>(get_list));
    REQUIRE(static_cast<bool>(get_interface));
    REQUIRE(static_cast<bool>(last_call));
    REQUIRE(static_cast<bool>(reset_recorder));
    REQUIRE(static_cast<bool>(recorder_get_interface));
  }
  CK_C_GetInterfaceList get_list = nullptr;
  CK_C_GetInterface get_interface = nullptr;
  RecorderLastCallFn last_call = nullptr;
  RecorderResetFn reset_recorder = nullptr;
  CK_C_GetInterface recorder_get_interface = nullptr;
};

V3Symbols& v3() {
  static V3Symbols instance;
  return instance;
}

CK_UTF8CHAR* utf8(const char* text) {
  return reinterpret_cast<CK_UTF8CHAR*>(const_cast<char*>(text));
}

MockConfig mock_with_v3(bool v3_on = true) {
  MockConfig c{};
  c.provide_v3 = v3_on ? 1 : 0;
  return c;
}

// The vendor_interfaces setting for one test (NULL: unset). Pinned: it
// survives the environment resets of before_initialize() and Proxy.
class VendorSetting {
 public:
  explicit VendorSetting(const char* value) {
    if (value != nullptr) {
      pinned_environment()[kVendorEnv] = value;
      ::setenv(kVendorEnv, value, 1);
    } else {
      pinned_environment().erase(kVendorEnv);
      ::unsetenv(kVendorEnv);
    }
  }
  ~VendorSetting() {
    pinned_environment().erase(kVendorEnv);
    ::unsetenv(kVendorEnv);
  }
  VendorSetting(const VendorSetting&) = delete;
  VendorSetting& operator=(const VendorSetting&) = delete;
};

// p11mux not initialized, its cached probe stale (every C_Initialize and
// C_Finalize makes it so), the mock reset and configured, and P11MUX_MODULE
// naming `module`: the next interface query probes that module afresh.
void before_initialize(const MockConfig& config, const char* module = P11MUX_TEST_MOCK_PATH) {
  reset_environment();
  REQUIRE(libs().p11->C_Initialize(nullptr) == CKR_OK);
  REQUIRE(libs().p11->C_Finalize(nullptr) == CKR_OK);
  CHECK(libs().mock->reset() == 0);
  REQUIRE(libs().mock->configure(&config) == 0);
  v3().reset_recorder();
  ::setenv("P11MUX_MODULE", module, 1);
}

std::string describe(const CK_INTERFACE& i) {
  const auto* v = static_cast<const CK_VERSION*>(i.pFunctionList);
  return std::string(reinterpret_cast<const char*>(i.pInterfaceName)) + " " +
         std::to_string(v->major) + "." + std::to_string(v->minor) +
         " flags=" + std::to_string(i.flags);
}

std::vector<CK_INTERFACE> interface_list() {
  CK_ULONG count = 0;
  REQUIRE(v3().get_list(nullptr, &count) == CKR_OK);
  std::vector<CK_INTERFACE> list(count);
  REQUIRE(v3().get_list(list.data(), &count) == CKR_OK);
  REQUIRE(count == list.size());
  return list;
}

std::vector<std::string> described_interfaces() {
  std::vector<std::string> out;
  for (const CK_INTERFACE& i : interface_list()) out.push_back(describe(i));
  return out;
}

const std::vector<std::string> kBoth = {"PKCS 11 3.0 flags=0", "PKCS 11 2.40 flags=0"};
const std::vector<std::string> kOnly240 = {"PKCS 11 2.40 flags=0"};

CK_FUNCTION_LIST_3_0* list_3_0() {
  CK_VERSION v30{3, 0};
  CK_INTERFACE* iface = nullptr;
  REQUIRE(v3().get_interface(utf8("PKCS 11"), &v30, &iface, 0) == CKR_OK);
  return static_cast<CK_FUNCTION_LIST_3_0*>(iface->pFunctionList);
}

// Calls visit(fn::X{}) for every v3.0 function forwarded on a session.
template <class Visit>
void for_each_v3_session_function(Visit&& visit) {
#define P11MUX_VISIT(name, since, kind, letters) \
  if constexpr (fn::name::dispatch == Dispatch::session) visit(fn::name{});
  P11MUX_FUNCTIONS_V3(P11MUX_VISIT)
#undef P11MUX_VISIT
}

// Pointer arguments point into this zeroed memory, at distinct addresses, so
// whatever reads them reads zeros.
alignas(64) unsigned char arena[4096];

template <class T>
T sample(char letter, std::size_t index, CK_SESSION_HANDLE session) {
  if constexpr (std::is_pointer_v<T>) {
    return reinterpret_cast<T>(arena + 64 * (index + 1));
  } else {
    return letter == 'h' ? static_cast<T>(session) : static_cast<T>(0x100 + index);
  }
}

// Arguments for F that pass p11mux's checks and are all distinct.
template <class F>
auto sample_arguments(CK_SESSION_HANDLE session) {
  using Args = typename FunctionArgs<typename F::Pointer>::type;
  Args args{};
  [&]<std::size_t... I>(std::index_sequence<I...>) {
    ((std::get<I>(args) = sample<std::tuple_element_t<I, Args>>(F::args[I], I, session)), ...);
  }
  (std::make_index_sequence<std::tuple_size_v<Args>>{});
  return args;
}

template <class T>
unsigned long as_ulong(T value) {
  if constexpr (std::is_pointer_v<T>) {
    return static_cast<unsigned long>(reinterpret_cast<std::uintptr_t>(value));
  } else {
    return static_cast<unsigned long>(value);
  }
}

template <class F, class Args>
CK_RV call_through(CK_FUNCTION_LIST_3_0* list, const Args& args) {
  return std::apply(list->*F::member, args);
}

std::string function_name(auto f) { return std::string(decltype(f)::name); }

// The backend session behind a virtual one, as the mock last saw it.
unsigned long mock_backend_session(CK_FUNCTION_LIST* p11, CK_SESSION_HANDLE h) {
  CK_SESSION_INFO info{};
  REQUIRE(p11->C_GetSessionInfo(h, &info) == CKR_OK);
  return mock_stats().last_session;
}

TEST_CASE(
    "before C_Initialize: a 3.0 backend gets 3.0 (the default) and 2.40, probed uninitialized") {
  before_initialize(mock_with_v3());
  std::vector<CK_INTERFACE> list = interface_list();
  CHECK(described_interfaces() == kBoth);
  REQUIRE(list.size() == 2);
  // The 2.40 interface is exactly what C_GetFunctionList gives: a CK_FUNCTION_LIST.
  CHECK(list[1].pFunctionList == libs().p11);
  auto* l3 = static_cast<CK_FUNCTION_LIST_3_0*>(list[0].pFunctionList);
  auto* l2 = static_cast<CK_FUNCTION_LIST*>(list[1].pFunctionList);
  CHECK(l3->version.major == 3);
  CHECK(l3->version.minor == 0);
  // All 92 entries are set, and the 3.0 list shares the 2.40 list's entry
  // points, except C_GetInfo, which reports the list's own version.
  auto* first = reinterpret_cast<void**>(&l3->C_Initialize);
  for (unsigned long i = 0; i < MOCK_FUNCTION_COUNT; ++i) CHECK(first[i] != nullptr);
#define P11MUX_SAME_ENTRY(name, since, dispatch, args)                                            \
  if (std::string_view(#name) != "C_GetInfo") {                                                   \
    CHECK_MESSAGE(reinterpret_cast<void*>(l3->name) == reinterpret_cast<void*>(l2->name), #name); \
  }
  P11MUX_FUNCTIONS_V2(P11MUX_SAME_ENTRY)
#undef P11MUX_SAME_ENTRY
  CHECK(reinterpret_cast<void*>(l3->C_GetInfo) != reinterpret_cast<void*>(l2->C_GetInfo));

  // The probe asked the backend without initializing it.
  MockStats s = mock_stats();
  CHECK(s.initialize_calls == 0);
  CHECK(s.calls_after_finalize == 0);
  CHECK(libs().mock->calls("C_GetInterface") >= 1);

  CK_INTERFACE* def = nullptr;
  REQUIRE(v3().get_interface(nullptr, nullptr, &def, 0) == CKR_OK);
  CHECK(describe(*def) == "PKCS 11 3.0 flags=0");
  CHECK(def->pFunctionList == l3);
}

TEST_CASE("before C_Initialize: a 2.x backend gets 2.40 only, a CK_FUNCTION_LIST") {
  before_initialize(mock_with_v3(false));
  CHECK(described_interfaces() == kOnly240);
  CHECK(interface_list()[0].pFunctionList == libs().p11);
  CK_INTERFACE* def = nullptr;
  REQUIRE(v3().get_interface(nullptr, nullptr, &def, 0) == CKR_OK);
  CHECK(def->pFunctionList == libs().p11);
  CK_VERSION v30{3, 0};
  CK_INTERFACE* none = nullptr;
  CHECK(v3().get_interface(utf8("PKCS 11"), &v30, &none, 0) == CKR_ARGUMENTS_BAD);
  CHECK(none == nullptr);
  CHECK(mock_stats().initialize_calls == 0);
}

TEST_CASE("C_GetInterface: default, name, version and flags as the spec says") {
  before_initialize(mock_with_v3());
  const std::vector<CK_INTERFACE> list = interface_list();
  REQUIRE(list.size() == 2);
  CK_INTERFACE* got = nullptr;
  CHECK(v3().get_interface(nullptr, nullptr, nullptr, 0) == CKR_ARGUMENTS_BAD);

  SUBCASE("NULL name and version: the default, the highest version") {
    REQUIRE(v3().get_interface(nullptr, nullptr, &got, 0) == CKR_OK);
    CHECK(got->pFunctionList == list[0].pFunctionList);
    CK_INTERFACE* again = nullptr;
    REQUIRE(v3().get_interface(nullptr, nullptr, &again, 0) == CKR_OK);
    CHECK(again == got);  // a stable object in p11mux
  }
  SUBCASE("name without version: the highest of that name") {
    REQUIRE(v3().get_interface(utf8("PKCS 11"), nullptr, &got, 0) == CKR_OK);
    CHECK(got->pFunctionList == list[0].pFunctionList);
  }
  SUBCASE("name and version: exactly that list") {
    CK_VERSION v30{3, 0};
    CK_VERSION v240{2, 40};
    REQUIRE(v3().get_interface(utf8("PKCS 11"), &v30, &got, 0) == CKR_OK);
    CHECK(describe(*got) == "PKCS 11 3.0 flags=0");
    REQUIRE(v3().get_interface(utf8("PKCS 11"), &v240, &got, 0) == CKR_OK);
    CHECK(got->pFunctionList == libs().p11);
    REQUIRE(v3().get_interface(nullptr, &v240, &got, 0) == CKR_OK);
    CHECK(got->pFunctionList == libs().p11);
  }
  SUBCASE("unknown name or version: CKR_ARGUMENTS_BAD") {
    CK_VERSION unknown[] = {{3, 1}, {2, 20}, {1, 0}, {4, 0}};
    for (CK_VERSION& v : unknown) {
      CAPTURE(int(v.major));
      CAPTURE(int(v.minor));
      CHECK(v3().get_interface(utf8("PKCS 11"), &v, &got, 0) == CKR_ARGUMENTS_BAD);
    }
    for (const char* name : {"PKCS 12", "PKCS 11 ", "pkcs 11", "", "Vendor Mock"}) {
      CAPTURE(name);
      CHECK(v3().get_interface(utf8(name), nullptr, &got, 0) == CKR_ARGUMENTS_BAD);
    }
    CHECK(got == nullptr);
  }
  SUBCASE("CKF_INTERFACE_FORK_SAFE requested: never claimed, so no match") {
    CK_VERSION v30{3, 0};
    CHECK(v3().get_interface(nullptr, nullptr, &got, CKF_INTERFACE_FORK_SAFE) == CKR_ARGUMENTS_BAD);
    CHECK(v3().get_interface(utf8("PKCS 11"), &v30, &got, CKF_INTERFACE_FORK_SAFE) ==
          CKR_ARGUMENTS_BAD);
    CHECK(got == nullptr);
  }
}

TEST_CASE("C_GetInterfaceList: count query, CKR_BUFFER_TOO_SMALL, exact and larger buffers") {
  before_initialize(mock_with_v3());
  CHECK(v3().get_list(nullptr, nullptr) == CKR_ARGUMENTS_BAD);
  CK_INTERFACE buffer[4];
  CHECK(v3().get_list(buffer, nullptr) == CKR_ARGUMENTS_BAD);

  CK_ULONG count = 99;  // ignored on entry when the list is NULL
  REQUIRE(v3().get_list(nullptr, &count) == CKR_OK);
  CHECK(count == 2);

  std::memset(buffer, 0xA5, sizeof buffer);
  count = 1;
  CHECK(v3().get_list(buffer, &count) == CKR_BUFFER_TOO_SMALL);
  CHECK(count == 2);
  CHECK(buffer[0].flags == ~CK_FLAGS{0} / 0xFF * 0xA5);  // untouched

  count = 4;
  REQUIRE(v3().get_list(buffer, &count) == CKR_OK);
  CHECK(count == 2);
  CHECK(describe(buffer[0]) == kBoth[0]);
  CHECK(describe(buffer[1]) == kBoth[1]);
}

TEST_CASE("C_GetInfo: 3.0 through the 3.0 list, 2.40 through the 2.40 list") {
  before_initialize(mock_with_v3());
  CK_FUNCTION_LIST_3_0* l3 = list_3_0();
  Proxy proxy(mock_with_v3());
  CK_INFO info{};
  REQUIRE(l3->C_GetInfo(&info) == CKR_OK);
  CHECK(info.cryptokiVersion.major == 3);
  CHECK(info.cryptokiVersion.minor == 0);
  REQUIRE(proxy.p11->C_GetInfo(&info) == CKR_OK);
  CHECK(info.cryptokiVersion.major == 2);
  CHECK(info.cryptokiVersion.minor == 40);
  CHECK(std::string_view(reinterpret_cast<const char*>(info.manufacturerID), 6) == "p11mux");
  CHECK(l3->C_GetInfo(nullptr) == CKR_ARGUMENTS_BAD);
}

TEST_CASE("C_LoginUser and C_SessionCancel reach the mock on the mapped backend session") {
  Proxy proxy(mock_with_v3());
  CK_FUNCTION_LIST_3_0* l3 = list_3_0();  // initialized: the running backend answers
  CK_SESSION_HANDLE h = proxy.open();
  const unsigned long backend = mock_backend_session(proxy.p11, h);
  CHECK(backend != h);

  REQUIRE(l3->C_LoginUser(h, CKU_USER, utf8(MOCK_USER_PIN), 4, utf8("bob"), 3) == CKR_OK);
  CHECK(mock_stats().last_session == backend);
  CHECK(libs().mock->calls("C_LoginUser") == 1);
  CHECK(libs().mock->token_user(0) == CKU_USER);
  REQUIRE(l3->C_Logout(h) == CKR_OK);
  CHECK(l3->C_LoginUser(h, CKU_USER, utf8("9999"), 4, utf8("bob"), 3) == CKR_PIN_INCORRECT);
  CHECK(l3->C_LoginUser(h, CKU_USER, nullptr, 4, nullptr, 0) != CKR_OK);
  CHECK(l3->C_LoginUser(h + 1, CKU_USER, utf8(MOCK_USER_PIN), 4, nullptr, 0) ==
        CKR_SESSION_HANDLE_INVALID);

  CK_MECHANISM sha = sha256();
  REQUIRE(l3->C_DigestInit(h, &sha) == CKR_OK);
  CHECK(l3->C_DigestInit(h, &sha) == CKR_OPERATION_ACTIVE);
  REQUIRE(l3->C_SessionCancel(h, CKF_DIGEST) == CKR_OK);
  CHECK(mock_stats().last_session == backend);
  CHECK(libs().mock->calls("C_SessionCancel") >= 1);
  CHECK(l3->C_DigestInit(h, &sha) == CKR_OK);
  // v3.0 backend: Init with a NULL mechanism cancels the operation.
  CHECK(l3->C_DigestInit(h, nullptr) == CKR_OK);
  CHECK(l3->C_DigestInit(h, &sha) == CKR_OK);
}

TEST_CASE("every v3.0 session function reaches the mock on the mapped backend session") {
  Proxy proxy(mock_with_v3());
  CK_FUNCTION_LIST_3_0* l3 = list_3_0();
  CK_SESSION_HANDLE h = proxy.open();
  const unsigned long backend = mock_backend_session(proxy.p11, h);
  int visited = 0;
  for_each_v3_session_function([&](auto f) {
    using F = decltype(f);
    const std::string name = function_name(f);
    CAPTURE(name);
    const unsigned long before = libs().mock->calls(name.c_str());
    const CK_RV rv = call_through<F>(l3, sample_arguments<F>(h));
    CHECK(libs().mock->calls(name.c_str()) == before + 1);
    CHECK(mock_stats().last_session == backend);
    // The mock models C_LoginUser and C_SessionCancel only.
    if (name != "C_LoginUser" && name != "C_SessionCancel") {
      CHECK(rv == CKR_FUNCTION_NOT_SUPPORTED);
    }
    ++visited;
  });
  CHECK(visited == 22);
}

TEST_CASE("the recording backend receives every v3.0 argument unchanged, the session mapped") {
  Proxy proxy({}, nullptr, {{"P11MUX_MODULE", P11MUX_TEST_RECORDER_PATH}});
  CK_FUNCTION_LIST_3_0* l3 = list_3_0();
  CK_SESSION_HANDLE h = proxy.open();
  CK_SESSION_INFO info{};
  REQUIRE(proxy.p11->C_GetSessionInfo(h, &info) == CKR_OK);
  RecorderCall rec{};
  REQUIRE(v3().last_call("C_GetSessionInfo", &rec) == 0);
  const unsigned long backend = rec.args[0];
  CHECK(backend >= RECORDER_SESSION_BASE);
  CHECK(backend != h);

  for_each_v3_session_function([&](auto f) {
    using F = decltype(f);
    const std::string name = function_name(f);
    CAPTURE(name);
    RecorderCall before{};
    REQUIRE(v3().last_call(name.c_str(), &before) == 0);
    const auto args = sample_arguments<F>(h);
    CHECK(call_through<F>(l3, args) == CKR_OK);
    RecorderCall after{};
    REQUIRE(v3().last_call(name.c_str(), &after) == 0);
    CHECK(after.count == before.count + 1);
    // The session handle mapped, everything else exactly as passed.
    const auto expected = std::apply(
        [&](auto, auto... rest) {
          return std::array{backend, as_ulong(rest)...};
        },
        args);
    for (std::size_t i = 0; i < expected.size(); ++i) {
      CAPTURE(i);
      CHECK(after.args[i] == expected[i]);
    }
  });

  // The recorder claims CKF_INTERFACE_FORK_SAFE; p11mux's own lists do not.
  CHECK(described_interfaces() == kBoth);
  CK_INTERFACE* got = nullptr;
  CHECK(v3().get_interface(nullptr, nullptr, &got, CKF_INTERFACE_FORK_SAFE) == CKR_ARGUMENTS_BAD);
}

TEST_CASE("vendor interfaces: hidden by default; with pass, the backend's own, unchanged") {
  CK_VERSION v10{1, 0};
  CK_INTERFACE* own = nullptr;
  REQUIRE(v3().recorder_get_interface(utf8(RECORDER_VENDOR_INTERFACE), &v10, &own, 0) == CKR_OK);
  CK_INTERFACE* got = nullptr;

  SUBCASE("hide (the default)") {
    VendorSetting vendor(nullptr);
    before_initialize({}, P11MUX_TEST_RECORDER_PATH);
    CHECK(described_interfaces() == kBoth);
    CHECK(v3().get_interface(utf8(RECORDER_VENDOR_INTERFACE), nullptr, &got, 0) ==
          CKR_ARGUMENTS_BAD);
    VendorSetting explicit_hide("hide");
    Proxy proxy({}, nullptr, {{"P11MUX_MODULE", P11MUX_TEST_RECORDER_PATH}});
    CHECK(described_interfaces() == kBoth);
  }
  SUBCASE("pass, before C_Initialize and while initialized") {
    VendorSetting vendor("pass");
    before_initialize({}, P11MUX_TEST_RECORDER_PATH);
    for (int initialized = 0; initialized < 2; ++initialized) {
      CAPTURE(initialized);
      std::optional<Proxy> proxy;
      if (initialized == 1) {
        proxy.emplace(MockConfig{}, nullptr,
                      Proxy::Environment{{"P11MUX_MODULE", P11MUX_TEST_RECORDER_PATH}});
      }
      std::vector<CK_INTERFACE> list = interface_list();
      REQUIRE(list.size() == 3);
      CHECK(describe(list[0]) == kBoth[0]);
      CHECK(describe(list[1]) == kBoth[1]);
      // Listed as the backend lists it, flags included (its claim, not p11mux's).
      CHECK(list[2].pInterfaceName == own->pInterfaceName);
      CHECK(list[2].pFunctionList == own->pFunctionList);
      CHECK(list[2].flags == CKF_INTERFACE_FORK_SAFE);
      // Returned as the very object the backend returns.
      REQUIRE(v3().get_interface(utf8(RECORDER_VENDOR_INTERFACE), &v10, &got, 0) == CKR_OK);
      CHECK(got == own);
      REQUIRE(v3().get_interface(utf8(RECORDER_VENDOR_INTERFACE), nullptr, &got,
                                 CKF_INTERFACE_FORK_SAFE) == CKR_OK);
      CHECK(got == own);
      CK_VERSION v20{2, 0};
      CHECK(v3().get_interface(utf8(RECORDER_VENDOR_INTERFACE), &v20, &got, 0) ==
            CKR_ARGUMENTS_BAD);
      // A NULL name never selects a vendor interface, even when only it would match.
      CHECK(v3().get_interface(nullptr, nullptr, &got, CKF_INTERFACE_FORK_SAFE) ==
            CKR_ARGUMENTS_BAD);
      // Its calls go straight to the backend.
      auto* vendor_functions = static_cast<RecorderVendorFunctions*>(got->pFunctionList);
      CHECK(vendor_functions->echo(41) == 42);
      RecorderCall rec{};
      REQUIRE(v3().last_call("echo", &rec) == 0);
      CHECK(rec.args[0] == 41);
    }
  }
}

TEST_CASE(
    "the probe is redone after each C_Initialize and C_Finalize; initialized, the backend in use "
    "answers") {
  before_initialize(mock_with_v3());
  CHECK(described_interfaces() == kBoth);
  // Cached until the next C_Initialize or C_Finalize.
  MockConfig v2 = mock_with_v3(false);
  REQUIRE(libs().mock->configure(&v2) == 0);
  CHECK(described_interfaces() == kBoth);
  {
    Proxy proxy(v2);
    CHECK(described_interfaces() == kOnly240);
    // Fixed when the backend was loaded, like the function list p11mux uses.
    MockConfig with_v3 = mock_with_v3();
    REQUIRE(libs().mock->configure(&with_v3) == 0);
    CHECK(described_interfaces() == kOnly240);
  }
  CHECK(described_interfaces() == kBoth);
}

TEST_CASE("v3.0 calls through the 3.0 list on a 2.x backend: CKR_FUNCTION_NOT_SUPPORTED") {
  // The 3.0 list is handed out while the probe sees 3.0; the backend then
  // turns out to be 2.x when p11mux initializes it.
  before_initialize(mock_with_v3());
  CK_FUNCTION_LIST_3_0* l3 = list_3_0();
  Proxy proxy(mock_with_v3(false));
  CHECK(described_interfaces() == kOnly240);
  CK_SESSION_HANDLE h = proxy.open();
  const unsigned long calls = mock_stats().calls_total;
  for_each_v3_session_function([&](auto f) {
    using F = decltype(f);
    CAPTURE(function_name(f));
    CHECK(call_through<F>(l3, sample_arguments<F>(h)) == CKR_FUNCTION_NOT_SUPPORTED);
  });
  // C_xxxInit(NULL mechanism) means "cancel" only on a 3.0 backend.
  CHECK(l3->C_DigestInit(h, nullptr) == CKR_ARGUMENTS_BAD);
  CHECK(mock_stats().calls_total == calls);
  // The 2.40 functions work through the 3.0 list as well.
  CK_BYTE buf[8];
  CHECK(l3->C_GenerateRandom(h, buf, sizeof buf) == CKR_OK);
  CK_INFO info{};
  REQUIRE(l3->C_GetInfo(&info) == CKR_OK);
  CHECK(info.cryptokiVersion.major == 3);  // the list's version
}

TEST_CASE("broken configuration, missing backend, p11mux as its own backend: 2.40 only") {
  before_initialize(mock_with_v3());
  SUBCASE("missing backend; C_Initialize reports it") {
    ::setenv("P11MUX_MODULE", "/nonexistent/libnothing.so", 1);
    CHECK(described_interfaces() == kOnly240);
    std::string err =
        capture_stderr([] { CHECK(libs().p11->C_Initialize(nullptr) == CKR_GENERAL_ERROR); });
    CHECK(err.find("/nonexistent/libnothing.so") != std::string::npos);
  }
  SUBCASE("bad configuration value") {
    ::setenv("P11MUX_LOG_LEVEL", "loud", 1);
    CHECK(described_interfaces() == kOnly240);
  }
  SUBCASE("no backend configured") {
    ::unsetenv("P11MUX_MODULE");
    CHECK(described_interfaces() == kOnly240);
  }
  SUBCASE("p11mux itself: no recursion into its own probe") {
    ::setenv("P11MUX_MODULE", P11MUX_TEST_LIBRARY_PATH, 1);
    CHECK(described_interfaces() == kOnly240);
  }
  CHECK(mock_stats().initialize_calls == 0);
}

TEST_CASE("threads query interfaces while another initializes and finalizes") {
  before_initialize(mock_with_v3());
  std::atomic<bool> stop{false};
  std::atomic<int> wrong{0};
  std::vector<std::thread> askers;
  for (int t = 0; t < 6; ++t) {
    askers.emplace_back([&] {
      for (int i = 0; i < 300 && !stop.load(); ++i) {
        CK_INTERFACE list[4];
        CK_ULONG count = 4;
        CK_INTERFACE* def = nullptr;
        if (v3().get_list(list, &count) != CKR_OK || count != 2 ||
            v3().get_interface(nullptr, nullptr, &def, 0) != CKR_OK ||
            def->pFunctionList != list[0].pFunctionList) {
          wrong.fetch_add(1);
        }
      }
    });
  }
  CK_C_INITIALIZE_ARGS os{};
  os.flags = CKF_OS_LOCKING_OK;
  for (int cycle = 0; cycle < 20; ++cycle) {
    REQUIRE(libs().p11->C_Initialize(&os) == CKR_OK);
    REQUIRE(libs().p11->C_Finalize(nullptr) == CKR_OK);
  }
  stop.store(true);
  for (auto& t : askers) t.join();
  CHECK(wrong.load() == 0);
}

TEST_CASE("after fork() the child is offered interfaces without C_Initialize") {
  before_initialize(mock_with_v3());
  CHECK(described_interfaces() == kBoth);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    CK_INTERFACE list[4];
    CK_ULONG count = 4;
    CK_INTERFACE* def = nullptr;
    bool ok = v3().get_list(list, &count) == CKR_OK && count == 2 &&
              v3().get_interface(nullptr, nullptr, &def, 0) == CKR_OK;
    ::_exit(ok ? 0 : 1);
  }
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status));
  CHECK(WEXITSTATUS(status) == 0);
}

}  // namespace
}  // namespace p11mux::test
