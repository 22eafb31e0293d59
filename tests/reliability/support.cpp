#include "support.hpp"

#include <p11mux/rv_names.hpp>

#include <dlfcn.h>
#include <unistd.h>

#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <latch>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <thread>

#if defined(__SANITIZE_THREAD__)
#define P11MUX_RELIABILITY_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define P11MUX_RELIABILITY_TSAN 1
#endif
#endif

namespace p11mux::reliability {

unsigned scale_percent() {
  static const unsigned percent = [] {
    if (const char* env = std::getenv("P11MUX_TEST_SCALE"); env != nullptr && *env != '\0') {
      return static_cast<unsigned>(std::strtoul(env, nullptr, 10));
    }
#ifdef P11MUX_RELIABILITY_TSAN
    return 20u;
#else
    return 100u;
#endif
  }();
  return percent;
}

long scaled(long n, long floor) {
  long v = n * static_cast<long>(scale_percent()) / 100;
  return v < floor ? floor : v;
}

// ---- libraries ----

namespace {

void* open_library(const char* path) {
  void* lib = ::dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) throw std::runtime_error(std::string("dlopen: ") + ::dlerror());
  return lib;
}

}  // namespace

const char* mock_path() { return P11MUX_TEST_MOCK_PATH; }
const char* faulty_path() { return P11MUX_TEST_FAULTY_PATH; }
const char* softhsm2_path() {
  const char* env = std::getenv("P11MUX_TEST_SOFTHSM2_MODULE");
  return env != nullptr && *env != '\0' ? env : "/usr/lib/softhsm/libsofthsm2.so";
}

CK_FUNCTION_LIST& p11mux() {
  static CK_FUNCTION_LIST* list = [] {
    void* lib = open_library(P11MUX_TEST_LIBRARY_PATH);
    auto get = reinterpret_cast<CK_C_GetFunctionList>(::dlsym(lib, "C_GetFunctionList"));
    CK_FUNCTION_LIST* l = nullptr;
    if (get == nullptr || get(&l) != CKR_OK || l == nullptr)
      throw std::runtime_error("libp11mux.so: C_GetFunctionList failed");
    return l;
  }();
  return *list;
}

const char* race_detector_path() { return P11MUX_TEST_RACE_DETECTOR_PATH; }
const char* slow_path() { return P11MUX_TEST_SLOW_PATH; }
const char* spec_bender_path() { return P11MUX_TEST_SPEC_BENDER_PATH; }

namespace {

const MockControl* mock_control(const char* path) {
  return reinterpret_cast<MockGetControlFn>(::dlsym(open_library(path), "mock_get_control"))();
}

const FaultyControl* faulty_control(const char* path) {
  return reinterpret_cast<FaultyGetControlFn>(::dlsym(open_library(path), "faulty_get_control"))();
}

}  // namespace

const MockControl& mock() {
  static const MockControl* control = mock_control(mock_path());
  return *control;
}

const MockControl& race_detector() {
  static const MockControl* control = mock_control(race_detector_path());
  return *control;
}

const MockControl& spec_bender() {
  static const MockControl* control = mock_control(spec_bender_path());
  return *control;
}

const FaultyControl& faulty() {
  static const FaultyControl* control = faulty_control(faulty_path());
  return *control;
}

const FaultyControl& slow() {
  static const FaultyControl* control = faulty_control(slow_path());
  return *control;
}

void use_backend(const char* path) {
  for (const char* name : {"P11MUX_CONFIG", "P11MUX_BACKEND_LOCKING",
                           "P11MUX_BACKEND_INIT_RESERVED", "P11MUX_LOG_FILE"}) {
    ::unsetenv(name);
  }
  ::setenv("P11MUX_MODULE", path, 1);
  ::setenv("P11MUX_LOG_LEVEL", "error", 1);
}

std::string session_mode() {
  const char* env = std::getenv("P11MUX_SESSION_MODE");
  return env != nullptr && *env != '\0' ? env : "serialize";
}

CK_C_INITIALIZE_ARGS* os_locking() {
  static CK_C_INITIALIZE_ARGS args{nullptr, nullptr, nullptr, nullptr, CKF_OS_LOCKING_OK, nullptr};
  return &args;
}

MockStats mock_stats(const MockControl& control) {
  MockStats s{};
  control.stats(&s);
  return s;
}

FaultyStats faulty_stats(const FaultyControl& control) {
  FaultyStats s{};
  control.stats(&s);
  return s;
}

bool valid_ckr(CK_RV rv) {
  std::string_view name = rv_name(rv);
  return name != "CKR_(unknown)" && name != "CKR_VENDOR_DEFINED";
}

std::string rv_string(CK_RV rv) {
  if (valid_ckr(rv)) return std::string(rv_name(rv));
  char buf[32];
  std::snprintf(buf, sizeof buf, "CKR_0x%lx", rv);
  return buf;
}

// ---- seeded choices ----

std::uint64_t Rng::next() {
  std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::uint64_t base_seed() {
  const char* env = std::getenv("P11MUX_TEST_SEED");
  return env != nullptr && *env != '\0' ? std::strtoull(env, nullptr, 0) : 0x11C0FFEEull;
}

// ---- tallies ----

bool Tally::record(const char* call, CK_RV rv, RvSet allowed) {
  ++calls_;
  auto named = by_call_.find(std::string_view(call));
  if (named == by_call_.end())
    named = by_call_.emplace(call, std::map<CK_RV, unsigned long>{}).first;
  ++named->second[rv];
  bool ok = rv == CKR_OK;
  for (CK_RV a : allowed) ok = ok || rv == a;
  for (CK_RV a : everywhere_) ok = ok || rv == a;
  if (!valid_ckr(rv)) {
    ++invalid_count_;
    ok = false;
  }
  if (!ok) {
    ++unexpected_count_;
    if (unexpected_.size() < 10) unexpected_.push_back(std::string(call) + ": " + rv_string(rv));
  }
  return ok;
}

void Tally::merge(const Tally& other) {
  for (const auto& [call, rvs] : other.by_call_)
    for (const auto& [rv, n] : rvs) by_call_[call][rv] += n;
  for (const auto& u : other.unexpected_)
    if (unexpected_.size() < 10) unexpected_.push_back(u);
  unexpected_count_ += other.unexpected_count_;
  invalid_count_ += other.invalid_count_;
  calls_ += other.calls_;
}

unsigned long Tally::count(const char* call, CK_RV rv) const {
  auto it = by_call_.find(call);
  if (it == by_call_.end()) return 0;
  auto jt = it->second.find(rv);
  return jt == it->second.end() ? 0 : jt->second;
}

unsigned long Tally::count_rv(CK_RV rv) const {
  unsigned long n = 0;
  for (const auto& [call, rvs] : by_call_) {
    auto it = rvs.find(rv);
    if (it != rvs.end()) n += it->second;
  }
  return n;
}

std::string Tally::summary() const {
  std::ostringstream out;
  out << calls_ << " calls";
  for (const auto& [call, rvs] : by_call_) {
    unsigned long total = 0;
    for (const auto& [rv, n] : rvs) total += n;
    out << "\n  " << call << ": " << total;
    if (rvs.size() > 1 || rvs.begin()->first != CKR_OK) {
      out << " (";
      const char* sep = "";
      for (const auto& [rv, n] : rvs) {
        out << sep << rv_string(rv) << " " << n;
        sep = ", ";
      }
      out << ")";
    }
  }
  return out.str();
}

// ---- threads ----

void hung(const std::string& what) {
  std::fprintf(stderr, "LIVENESS GUARD: %s\n", what.c_str());
  std::fflush(stderr);
  std::_Exit(3);
}

void print_stacks(int pid) {
  std::string command = "command -v gdb >/dev/null && gdb -p " + std::to_string(pid) +
                        " -batch -nx -ex 'thread apply all bt' </dev/null 1>&2";
  std::fflush(nullptr);
  if (std::system(command.c_str()) != 0) {
    std::fprintf(stderr, "(no stacks of process %d: gdb missing or failed)\n", pid);
  }
}

void run_threads(std::size_t count, const std::function<void(std::size_t)>& body,
                 const char* what) {
  std::latch start(static_cast<std::ptrdiff_t>(count));
  std::mutex mu;
  std::condition_variable cv;
  std::size_t done = 0;  // guarded by mu
  std::vector<std::thread> threads;
  threads.reserve(count);
  for (std::size_t i = 0; i < count; ++i) {
    threads.emplace_back([&, i] {
      start.arrive_and_wait();
      body(i);
      std::lock_guard lock(mu);
      ++done;
      cv.notify_all();
    });
  }
  {
    std::unique_lock lock(mu);
    if (!cv.wait_for(lock, kLivenessGuard, [&] { return done == count; })) {
      hung(std::string(what) + ": " + std::to_string(count - done) + " of " +
           std::to_string(count) + " threads still running after " +
           std::to_string(kLivenessGuard.count()) + " s");
    }
  }
  for (auto& t : threads) t.join();
}

// ---- objects ----

KeyPair make_sign_key(CK_FUNCTION_LIST& p11, CK_SESSION_HANDLE rw_session, const char* label,
                      bool token_object) {
  static const CK_BYTE p256[] = {0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07};
  CK_BBOOL yes = CK_TRUE, no = CK_FALSE, token = token_object ? CK_TRUE : CK_FALSE;
  auto* text = const_cast<char*>(label);
  CK_ULONG label_len = std::strlen(label);
  CK_ATTRIBUTE pub[] = {{CKA_TOKEN, &token, sizeof token},
                        {CKA_PRIVATE, &no, sizeof no},
                        {CKA_VERIFY, &yes, sizeof yes},
                        {CKA_EC_PARAMS, const_cast<CK_BYTE*>(p256), sizeof p256},
                        {CKA_LABEL, text, label_len}};
  CK_ATTRIBUTE priv[] = {{CKA_TOKEN, &token, sizeof token},
                         {CKA_PRIVATE, &no, sizeof no},
                         {CKA_SENSITIVE, &yes, sizeof yes},
                         {CKA_SIGN, &yes, sizeof yes},
                         {CKA_LABEL, text, label_len}};
  CK_MECHANISM gen{CKM_EC_KEY_PAIR_GEN, nullptr, 0};
  KeyPair k;
  CK_RV rv = p11.C_GenerateKeyPair(rw_session, &gen, pub, std::size(pub), priv, std::size(priv),
                                   &k.public_key, &k.private_key);
  if (rv != CKR_OK) throw std::runtime_error("C_GenerateKeyPair: " + rv_string(rv));
  return k;
}

}  // namespace p11mux::reliability
