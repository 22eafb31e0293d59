// [policy] protect = all under random templates: whatever an input asks, no
// call reaches the backend with what the rules forbid (docs/policy.md). The
// backend is the recorder (tests/backends/recorder_control.h), which answers
// CKR_OK to everything, leaves C_GetAttributeValue's buffers as they were
// given (so every key p11mux reads is all CK_FALSE: not sensitive, not
// extractable, no usage), and records each call's arguments; the templates
// are the fuzzer's own memory, still alive when the record is checked.
//
// What reaching the recorder must never show (checked here with its own code,
// not p11mux's), a template's attribute counted as true when any occurrence
// has a non-zero byte:
//   - a creating or changing template with CKA_WRAP and CKA_DECRYPT both
//     true, or CKA_UNWRAP and CKA_ENCRYPT;
//   - a C_SetAttributeValue or C_CopyObject template turning
//     CKA_EXTRACTABLE true (every key here has it false);
//   - CKM_RSA_PKCS in C_DecryptInit or C_UnwrapKey;
//   - a C_WrapKey of a key p11mux read as sensitive (none is: allowed).
// A violation aborts, which libFuzzer keeps as a crash.
//
// Built two ways: with P11MUX_FUZZ (clang, libFuzzer) as p11mux-fuzz-protect;
// and in every build as protect-fuzz-replay, whose main() runs a fixed number
// of inputs from a seeded generator: a ctest of the plain stage, in seconds.
// `--unprotected` runs it without the policy and succeeds only if the check
// above finds a violation: the proof that the check can fail.
#include <p11mux/pkcs11.h>

#include "recorder_control.h"

#include <dlfcn.h>

#include <array>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string_view>
#include <vector>

namespace {

struct State {
  CK_FUNCTION_LIST* p11 = nullptr;
  RecorderLastCallFn last_call = nullptr;
  CK_SESSION_HANDLE session = CK_INVALID_HANDLE;
  bool expect_violation = false;  // --unprotected
  unsigned long violations = 0;
  unsigned long calls = 0, reached = 0;  // made through p11mux; reached the recorder
};
State state;

[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "protect-fuzz: %s\n", what);
  std::abort();
}

void setup(bool protect) {
  ::setenv("P11MUX_CONFIG", "", 1);
  ::setenv("P11MUX_LOG_LEVEL", "off", 1);
  ::setenv("P11MUX_MODULE", P11MUX_FUZZ_RECORDER_PATH, 1);
  if (protect) ::setenv("P11MUX_POLICY_PROTECT", "all", 1);
  void* recorder = ::dlopen(P11MUX_FUZZ_RECORDER_PATH, RTLD_NOW | RTLD_LOCAL);
  void* lib = ::dlopen(P11MUX_FUZZ_LIBRARY_PATH, RTLD_NOW | RTLD_LOCAL);
  if (recorder == nullptr || lib == nullptr) die(::dlerror());
  state.last_call = reinterpret_cast<RecorderLastCallFn>(::dlsym(recorder, "recorder_last_call"));
  auto get_list = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
  if (state.last_call == nullptr || get_list == nullptr || get_list(&state.p11) != CKR_OK)
    die("cannot load p11mux or the recorder");
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  if (state.p11->C_Initialize(&args) != CKR_OK) die("C_Initialize");
  if (state.p11->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr,
                               &state.session) != CKR_OK) {
    die("C_OpenSession");
  }
}

// The input, read a byte at a time (zeros once it is used up).
struct Reader {
  const std::uint8_t* data;
  std::size_t size;
  std::uint8_t byte() {
    if (size == 0) return 0;
    --size;
    return *data++;
  }
  bool empty() const { return size == 0; }
};

constexpr std::array<CK_ATTRIBUTE_TYPE, 10> kTypes{
    CKA_WRAP,        CKA_UNWRAP,  CKA_ENCRYPT, CKA_DECRYPT, CKA_SENSITIVE,
    CKA_EXTRACTABLE, CKA_TRUSTED, CKA_LABEL,   CKA_TOKEN,   CKA_WRAP_WITH_TRUSTED};

constexpr std::array<CK_MECHANISM_TYPE, 4> kMechanisms{CKM_RSA_PKCS, CKM_RSA_PKCS_OAEP,
                                                       CKM_AES_KEY_WRAP, CKM_SHA256_HMAC};

// A random template: up to 8 attributes, any of the types above, values of
// 0 to 3 bytes (or no value at all), the bytes from the input. The values
// live in `bytes`, sized once so the pointers stay.
struct RandomTemplate {
  std::vector<std::uint8_t> bytes;
  std::vector<CK_ATTRIBUTE> attributes;
  explicit RandomTemplate(Reader& in) {
    const std::size_t n = in.byte() % 9;
    bytes.resize(n * 3);
    for (std::size_t i = 0; i < n; ++i) {
      const std::uint8_t shape = in.byte();
      const CK_ULONG len = shape % 4;
      for (CK_ULONG b = 0; b < len; ++b) bytes[i * 3 + b] = in.byte() % 3 == 0 ? 0 : in.byte();
      const bool null_value = (shape & 0x80) != 0;
      attributes.push_back({kTypes[(shape >> 2) % kTypes.size()],
                            null_value || len == 0 ? nullptr : &bytes[i * 3], len});
    }
  }
  CK_ATTRIBUTE* data() { return attributes.empty() ? nullptr : attributes.data(); }
  CK_ULONG count() const { return static_cast<CK_ULONG>(attributes.size()); }
};

// The checks, written apart from p11mux's own.
bool may_be_true(const CK_ATTRIBUTE* t, CK_ULONG n, CK_ATTRIBUTE_TYPE type) {
  for (CK_ULONG i = 0; t != nullptr && i < n; ++i) {
    if (t[i].type != type || t[i].pValue == nullptr) continue;
    const auto* b = static_cast<const std::uint8_t*>(t[i].pValue);
    for (CK_ULONG k = 0; k < t[i].ulValueLen; ++k)
      if (b[k] != 0) return true;
  }
  return false;
}

bool conflicting(const CK_ATTRIBUTE* t, CK_ULONG n) {
  return (may_be_true(t, n, CKA_WRAP) && may_be_true(t, n, CKA_DECRYPT)) ||
         (may_be_true(t, n, CKA_UNWRAP) && may_be_true(t, n, CKA_ENCRYPT));
}

void violation(const char* function, const char* what) {
  ++state.violations;
  if (state.expect_violation) return;
  std::fprintf(stderr, "protect-fuzz: %s reached the backend with %s\n", function, what);
  std::abort();
}

// Whether the call reached the recorder (its count went up), and its arguments.
bool reached(const char* function, unsigned long before, RecorderCall& call) {
  state.last_call(function, &call);
  ++state.calls;
  if (call.count > before) ++state.reached;
  return call.count > before;
}

unsigned long count_of(const char* function) {
  RecorderCall call{};
  state.last_call(function, &call);
  return call.count;
}

const CK_ATTRIBUTE* as_template(unsigned long arg) {
  return reinterpret_cast<const CK_ATTRIBUTE*>(arg);  // recorded by address
}

void one_call(Reader& in) {
  CK_FUNCTION_LIST* p = state.p11;
  const CK_SESSION_HANDLE s = state.session;
  const std::uint8_t which = in.byte();
  CK_MECHANISM mechanism{kMechanisms[in.byte() % kMechanisms.size()], nullptr, 0};
  const CK_OBJECT_HANDLE object = 1 + in.byte() % 4;
  RandomTemplate a(in), b(in);
  CK_OBJECT_HANDLE out = 0, out2 = 0;
  CK_BYTE blob[32] = {};
  CK_ULONG len = sizeof blob;
  RecorderCall call{};
  switch (which % 9) {
    case 0: {
      const unsigned long before = count_of("C_CreateObject");
      p->C_CreateObject(s, a.data(), a.count(), &out);
      if (reached("C_CreateObject", before, call) &&
          conflicting(as_template(call.args[1]), call.args[2]))
        violation("C_CreateObject", "a conflicting template");
      break;
    }
    case 1: {
      const unsigned long before = count_of("C_GenerateKey");
      p->C_GenerateKey(s, &mechanism, a.data(), a.count(), &out);
      if (reached("C_GenerateKey", before, call) &&
          conflicting(as_template(call.args[2]), call.args[3]))
        violation("C_GenerateKey", "a conflicting template");
      break;
    }
    case 2: {
      const unsigned long before = count_of("C_GenerateKeyPair");
      p->C_GenerateKeyPair(s, &mechanism, a.data(), a.count(), b.data(), b.count(), &out, &out2);
      if (reached("C_GenerateKeyPair", before, call) &&
          (conflicting(as_template(call.args[2]), call.args[3]) ||
           conflicting(as_template(call.args[4]), call.args[5]))) {
        violation("C_GenerateKeyPair", "a conflicting template");
      }
      break;
    }
    case 3: {
      const unsigned long before = count_of("C_UnwrapKey");
      p->C_UnwrapKey(s, &mechanism, object, blob, sizeof blob, a.data(), a.count(), &out);
      if (reached("C_UnwrapKey", before, call)) {
        if (conflicting(as_template(call.args[5]), call.args[6]))
          violation("C_UnwrapKey", "a conflicting template");
        if (reinterpret_cast<const CK_MECHANISM*>(call.args[1])->mechanism == CKM_RSA_PKCS)
          violation("C_UnwrapKey", "CKM_RSA_PKCS");
      }
      break;
    }
    case 4: {
      const unsigned long before = count_of("C_DeriveKey");
      p->C_DeriveKey(s, &mechanism, object, a.data(), a.count(), &out);
      if (reached("C_DeriveKey", before, call) &&
          conflicting(as_template(call.args[3]), call.args[4]))
        violation("C_DeriveKey", "a conflicting template");
      break;
    }
    case 5:
    case 6: {
      const bool copy = which % 9 == 5;
      const char* name = copy ? "C_CopyObject" : "C_SetAttributeValue";
      const unsigned long before = count_of(name);
      if (copy) {
        p->C_CopyObject(s, object, a.data(), a.count(), &out);
      } else {
        p->C_SetAttributeValue(s, object, a.data(), a.count());
      }
      if (reached(name, before, call)) {
        const CK_ATTRIBUTE* t = as_template(call.args[2]);
        if (conflicting(t, call.args[3])) violation(name, "a conflicting template");
        if (may_be_true(t, call.args[3], CKA_EXTRACTABLE))
          violation(name, "CKA_EXTRACTABLE false -> true");
      }
      break;
    }
    case 7: {
      const unsigned long before = count_of("C_DecryptInit");
      p->C_DecryptInit(s, &mechanism, object);
      if (reached("C_DecryptInit", before, call) &&
          reinterpret_cast<const CK_MECHANISM*>(call.args[1])->mechanism == CKM_RSA_PKCS) {
        violation("C_DecryptInit", "CKM_RSA_PKCS");
      }
      break;
    }
    default: {
      // Nothing the recorder's keys say is sensitive: every wrap is allowed.
      const unsigned long before = count_of("C_WrapKey");
      p->C_WrapKey(s, &mechanism, object, object + 1, blob, &len);
      if (!reached("C_WrapKey", before, call) && !state.expect_violation)
        violation("C_WrapKey", "nothing (a wrap of a key that is not sensitive was refused)");
      break;
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  setup(true);
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  Reader in{data, size};
  for (int calls = 0; calls < 32 && !in.empty(); ++calls) one_call(in);
  return 0;
}

#ifndef P11MUX_FUZZ_LIBFUZZER
// The replay driver: `runs` inputs of up to 256 bytes from a fixed seed.
int main(int argc, char** argv) {
  const bool unprotected = argc > 1 && std::string_view(argv[1]) == "--unprotected";
  state.expect_violation = unprotected;
  setup(!unprotected);
  std::mt19937_64 random(20261202);
  std::vector<std::uint8_t> input;
  constexpr int kRuns = 50000;
  for (int run = 0; run < kRuns; ++run) {
    input.resize(random() % 257);
    for (auto& byte : input) byte = static_cast<std::uint8_t>(random());
    LLVMFuzzerTestOneInput(input.data(), input.size());
  }
  state.p11->C_Finalize(nullptr);
  if (unprotected) {
    std::printf("protect-fuzz: %lu calls, %lu violations without the policy (expected some)\n",
                state.calls, state.violations);
    return state.violations > 0 ? 0 : 1;
  }
  std::printf("protect-fuzz: %d inputs, %lu calls, %lu reached the backend, none forbidden\n",
              kRuns, state.calls, state.reached);
  return 0;
}
#endif
