// libp11mux-null.so: all 92 functions return CKR_OK, called directly and
// through p11mux, with well-formed arguments built from each function's
// argument letters in <p11mux/functions.h>; and its outputs are the ones
// null_backend.h promises.
#include "backends_test_support.hpp"

#include "null_backend.h"

#include <p11mux/functions.h>

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// One descriptor per function, from the table.
namespace p11mux::backends_test::fn {
#define NULL_TEST_DESCRIBE(name_, since_, dispatch_, args_)      \
  struct name_ {                                                 \
    static constexpr std::string_view name = #name_;             \
    static constexpr std::string_view args = args_;              \
    static constexpr auto member = &CK_FUNCTION_LIST_3_0::name_; \
    using Pointer = CK_##name_;                                  \
  };
P11MUX_FUNCTIONS(NULL_TEST_DESCRIBE)
#undef NULL_TEST_DESCRIBE
}  // namespace p11mux::backends_test::fn

namespace p11mux::backends_test {
namespace {

// Every buffer a call needs, zeroed, alive until the run ends.
class Storage {
 public:
  void* block(std::size_t bytes) {
    blocks_.push_back(std::make_unique<std::max_align_t[]>(bytes / sizeof(std::max_align_t) + 1));
    return blocks_.back().get();
  }

 private:
  std::vector<std::unique_ptr<std::max_align_t[]>> blocks_;
};

template <class P>
constexpr std::size_t size_of() {
  if constexpr (std::is_void_v<P>) {
    return 1;
  } else {
    return sizeof(P);
  }
}

struct Run {
  explicit Run(CK_FUNCTION_LIST_3_0* l) : list(l) {}
  CK_FUNCTION_LIST_3_0* list;
  Storage storage;
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  std::map<std::string, CK_RV> results;  // by function name
  CK_MECHANISM sha256{CKM_SHA256, nullptr, 0};
  CK_BBOOL no = CK_FALSE;
  CK_ATTRIBUTE session_object{CKA_TOKEN, &no, sizeof no};
  CK_UTF8CHAR pin[5] = "1234";
};

// The value of a 'v' argument that is not a length: what a correct caller
// passes where 0 would not do.
template <class D, std::size_t I>
CK_ULONG value() {
  if constexpr (D::name == "C_OpenSession" && I == 1) {
    return CKF_SERIAL_SESSION | CKF_RW_SESSION;
  } else if constexpr ((D::name == "C_Login" || D::name == "C_LoginUser") && I == 1) {
    return CKU_USER;
  } else if constexpr (D::name == "C_GetSlotList" && I == 0) {
    return CK_TRUE;
  } else if constexpr (D::name == "C_GetMechanismInfo" && I == 1) {
    return CKM_SHA256;
  } else if constexpr (D::name == "C_WaitForSlotEvent" && I == 0) {
    return CKF_DONT_BLOCK;
  } else {
    return 0;
  }
}

template <class D, std::size_t I>
constexpr bool is_length() {  // the length that goes with the argument before it
  return I > 0 && std::string_view("btko").find(D::args[I - 1]) != std::string_view::npos;
}

template <class D, std::size_t I, class Tuple>
void fill(Tuple& t, Run& run) {
  if constexpr (!is_length<D, I>()) {
    using T = std::tuple_element_t<I, Tuple>;
    constexpr char letter = D::args[I];
    auto& arg = std::get<I>(t);
    if constexpr (letter == 'h') {
      arg = run.session;
    } else if constexpr (letter == 'v') {
      arg = static_cast<T>(value<D, I>());
    } else if constexpr (letter == 'm') {
      arg = &run.sha256;
    } else if constexpr (letter == 't') {
      arg = &run.session_object;
      std::get<I + 1>(t) = 1;
    } else if constexpr (letter == 'k') {
      arg = run.pin;
      std::get<I + 1>(t) = 4;
    } else if constexpr (letter == 'b' || letter == 'o') {
      constexpr CK_ULONG n = letter == 'b' ? 16 : 64;
      arg = static_cast<T>(run.storage.block(n * size_of<std::remove_pointer_t<T>>()));
      if constexpr (letter == 'b') {
        std::get<I + 1>(t) = n;
      } else {
        auto* length = static_cast<CK_ULONG*>(run.storage.block(sizeof(CK_ULONG)));
        *length = n;
        std::get<I + 1>(t) = length;
      }
    } else if constexpr (letter == 'p') {
      // 32: C_InitToken's label is 32 characters.
      arg = static_cast<T>(
          run.storage.block(std::max<std::size_t>(size_of<std::remove_pointer_t<T>>(), 32)));
    } else if constexpr (letter == 'n' && D::name == "C_Initialize") {
      arg = os_locking();
    } else {
      arg = nullptr;  // every other 'n' may be NULL
    }
  }
}

template <class D, class Pointer = typename D::Pointer>
struct Caller;
template <class D, class... A>
struct Caller<D, CK_RV (*)(A...)> {
  static void call(Run& run) {
    std::tuple<A...> args{};
    [&]<std::size_t... I>(std::index_sequence<I...>) { (fill<D, I>(args, run), ...); }
    (std::index_sequence_for<A...>{});
    CK_RV rv = std::apply(run.list->*D::member, args);
    run.results[std::string(D::name)] = rv;
    if constexpr (D::name == "C_OpenSession") {
      if (rv == CKR_OK) run.session = *std::get<4>(args);
    }
  }
};

// Sessions first, then every function in table order; closing a session,
// C_InitToken (which needs none open), closing all and C_Finalize last.
void call_all(CK_FUNCTION_LIST_3_0* list, std::map<std::string, CK_RV>& results) {
  Run run(list);
  constexpr std::string_view kFirst[] = {"C_Initialize", "C_OpenSession"};
  constexpr std::string_view kLast[] = {"C_CloseSession", "C_InitToken", "C_CloseAllSessions",
                                        "C_Finalize"};
  auto in = [](auto& names, std::string_view name) {
    for (auto n : names)
      if (n == name) return true;
    return false;
  };
  struct Entry {
    std::string_view name;
    void (*call)(Run&);
  };
  constexpr Entry kAll[] = {
#define NULL_TEST_ENTRY(name, since, dispatch, args) {#name, &Caller<fn::name>::call},
      P11MUX_FUNCTIONS(NULL_TEST_ENTRY)
#undef NULL_TEST_ENTRY
  };
  static_assert(std::size(kAll) == 92);
  for (auto name : kFirst)
    for (const Entry& e : kAll)
      if (e.name == name) e.call(run);
  for (const Entry& e : kAll)
    if (!in(kFirst, e.name) && !in(kLast, e.name)) e.call(run);
  for (auto name : kLast)
    for (const Entry& e : kAll)
      if (e.name == name) e.call(run);
  results = std::move(run.results);
}

void check_all_ok(const std::map<std::string, CK_RV>& results) {
  CHECK(results.size() == 92);
  for (const auto& [name, rv] : results) {
    CAPTURE(name);
    CHECK(rv == CKR_OK);
  }
}

void* null_library() {
  static void* lib = open_library(NULL_PATH);
  return lib;
}

TEST_CASE("the null backend answers all 92 functions with CKR_OK") {
  CK_FUNCTION_LIST_3_0* list = function_list_3_0(null_library());
  REQUIRE(list != nullptr);
  std::map<std::string, CK_RV> results;
  call_all(list, results);
  check_all_ok(results);
}

TEST_CASE("through p11mux, all 92 functions over the null backend return CKR_OK") {
  use_backend(NULL_PATH);
  CK_FUNCTION_LIST_3_0* list = function_list_3_0(p11mux_library());
  REQUIRE(list != nullptr);
  std::map<std::string, CK_RV> results;
  call_all(list, results);
  check_all_ok(results);
}

TEST_CASE("the null backend's outputs") {
  CK_FUNCTION_LIST* p11 = function_list(null_library());
  REQUIRE(p11->C_Initialize(os_locking()) == CKR_OK);
  CK_SLOT_ID slots[4];
  CK_ULONG count = 4;
  REQUIRE(p11->C_GetSlotList(CK_TRUE, slots, &count) == CKR_OK);
  CHECK(count == 1);
  CHECK(slots[0] == 0);
  CK_TOKEN_INFO token;
  REQUIRE(p11->C_GetTokenInfo(0, &token) == CKR_OK);
  CHECK(std::string_view(reinterpret_cast<const char*>(token.label),
                         std::strlen(NULL_TOKEN_LABEL)) == NULL_TOKEN_LABEL);
  CHECK((token.flags & CKF_TOKEN_INITIALIZED) != 0);

  CK_SESSION_HANDLE a = CK_INVALID_HANDLE, b = CK_INVALID_HANDLE;
  REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &a) == CKR_OK);
  REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &b) == CKR_OK);
  CHECK(a != CK_INVALID_HANDLE);
  CHECK(a != b);

  CK_BYTE data[3] = {1, 2, 3};
  CK_ULONG length = 0;
  REQUIRE(p11->C_Sign(a, data, sizeof data, nullptr, &length) == CKR_OK);
  CHECK(length == NULL_OUTPUT_LEN);
  CK_BYTE small[8];
  length = sizeof small;
  CHECK(p11->C_Sign(a, data, sizeof data, small, &length) == CKR_BUFFER_TOO_SMALL);
  CHECK(length == NULL_OUTPUT_LEN);
  CK_BYTE signature[64];
  std::memset(signature, 0xAA, sizeof signature);
  length = sizeof signature;
  REQUIRE(p11->C_Sign(a, data, sizeof data, signature, &length) == CKR_OK);
  CHECK(length == NULL_OUTPUT_LEN);
  CHECK(signature[0] == 0);

  CK_OBJECT_HANDLE found[4];
  CK_ULONG n = 99;
  REQUIRE(p11->C_FindObjects(a, found, 4, &n) == CKR_OK);
  CHECK(n == 0);
  CK_OBJECT_HANDLE key = CK_INVALID_HANDLE;
  CK_MECHANISM gen{CKM_AES_KEY_GEN, nullptr, 0};
  REQUIRE(p11->C_GenerateKey(a, &gen, nullptr, 0, &key) == CKR_OK);
  CHECK(key >= NULL_OBJECT_HANDLE_BASE);
  CK_BYTE first[16], second[16];
  REQUIRE(p11->C_GenerateRandom(a, first, sizeof first) == CKR_OK);
  REQUIRE(p11->C_GenerateRandom(a, second, sizeof second) == CKR_OK);
  CHECK(std::memcmp(first, second, sizeof first) != 0);
  CK_SLOT_ID event = 99;
  CHECK(p11->C_WaitForSlotEvent(0, &event, nullptr) == CKR_OK);
  CHECK(event == 0);
  CHECK(p11->C_Finalize(nullptr) == CKR_OK);
}

}  // namespace
}  // namespace p11mux::backends_test
