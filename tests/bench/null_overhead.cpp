// p11mux's own cost per call, in nanoseconds: the null backend
// (libp11mux-null.so, every call returns at once) called directly and through
// libp11mux.so in each session mode, all in one process and on one thread.
// Each round runs COUNT calls of every op in every configuration, timed with
// the thread's CPU clock (the time this thread ran: other processes on a
// shared machine do not count); configurations are interleaved within a
// round so drifting load hits all alike. The figure is the median over the
// rounds, and "added" the median of the per-round differences to direct.
// Prints figures, asserts nothing.
//   null-overhead LIBP11MUX NULL_BACKEND [--rounds N] [--count N] [--csv FILE]
#include <p11mux/pkcs11.h>
#include <p11mux/rv_names.hpp>

#include <dlfcn.h>
#include <stdlib.h>
#include <time.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <string>
#include <vector>

namespace {

[[noreturn]] void die(const std::string& what) {
  std::fprintf(stderr, "null-overhead: %s\n", what.c_str());
  std::exit(2);
}

void check(const char* call, CK_RV rv) {
  if (rv != CKR_OK) die(std::string(call) + ": " + std::string(p11mux::rv_name(rv)));
}

CK_FUNCTION_LIST* load(const char* path) {
  void* lib = dlopen(path, RTLD_NOW | RTLD_LOCAL);
  if (lib == nullptr) die(dlerror());
  auto get = reinterpret_cast<CK_C_GetFunctionList>(dlsym(lib, "C_GetFunctionList"));
  CK_FUNCTION_LIST* list = nullptr;
  if (get == nullptr || get(&list) != CKR_OK) die(std::string(path) + ": C_GetFunctionList");
  return list;
}

double thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e9 + static_cast<double>(ts.tv_nsec);
}

// One op: `calls` PKCS#11 calls per iteration.
struct Op {
  const char* name;
  int calls;
  CK_RV (*run)(CK_FUNCTION_LIST* p, CK_SESSION_HANDLE h);
};

const Op kOps[] = {
    {"C_GetSessionInfo", 1,
     [](CK_FUNCTION_LIST* p, CK_SESSION_HANDLE h) {
       CK_SESSION_INFO info;
       return p->C_GetSessionInfo(h, &info);
     }},
    {"C_GenerateRandom(16)", 1,
     [](CK_FUNCTION_LIST* p, CK_SESSION_HANDLE h) {
       CK_BYTE buf[16];
       return p->C_GenerateRandom(h, buf, sizeof buf);
     }},
    {"C_DigestInit+C_Digest", 2,
     [](CK_FUNCTION_LIST* p, CK_SESSION_HANDLE h) {
       CK_MECHANISM m{CKM_SHA256, nullptr, 0};
       CK_BYTE data[32] = {}, digest[64];
       CK_ULONG len = sizeof digest;
       CK_RV rv = p->C_DigestInit(h, &m);
       return rv != CKR_OK ? rv : p->C_Digest(h, data, sizeof data, digest, &len);
     }},
    {"C_GetSlotInfo", 1,
     [](CK_FUNCTION_LIST* p, CK_SESSION_HANDLE) {
       CK_SLOT_INFO info;
       return p->C_GetSlotInfo(0, &info);
     }},
    {"C_OpenSession+C_CloseSession", 2,
     [](CK_FUNCTION_LIST* p, CK_SESSION_HANDLE) {
       CK_SESSION_HANDLE s = CK_INVALID_HANDLE;
       CK_RV rv = p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &s);
       return rv != CKR_OK ? rv : p->C_CloseSession(s);
     }},
};
constexpr std::size_t kOpCount = std::size(kOps);
const char* const kConfigs[] = {"direct", "serialize", "multiplex"};
constexpr std::size_t kConfigCount = std::size(kConfigs);

// ns per call of every op in one configuration, one round.
std::vector<double> round_of(CK_FUNCTION_LIST* p, bool through_p11mux, const char* mode,
                             long count) {
  if (through_p11mux) setenv("P11MUX_SESSION_MODE", mode, 1);
  CK_C_INITIALIZE_ARGS args{};
  args.flags = CKF_OS_LOCKING_OK;
  check("C_Initialize", p->C_Initialize(&args));
  CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
  check("C_OpenSession", p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h));
  std::vector<double> ns;
  for (const Op& op : kOps) {
    double start = thread_cpu_ns();
    for (long i = 0; i < count; ++i) check(op.name, op.run(p, h));
    ns.push_back((thread_cpu_ns() - start) / static_cast<double>(count * op.calls));
  }
  check("C_CloseSession", p->C_CloseSession(h));
  check("C_Finalize", p->C_Finalize(nullptr));
  return ns;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  std::size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr,
                 "usage: null-overhead LIBP11MUX NULL_BACKEND [--rounds N] [--count N] "
                 "[--csv FILE]\n");
    return 2;
  }
  long rounds = 7, count = 200000;
  const char* csv = nullptr;
  for (int i = 3; i + 1 < argc; i += 2) {
    std::string opt = argv[i];
    if (opt == "--rounds")
      rounds = std::max(1L, std::atol(argv[i + 1]));
    else if (opt == "--count")
      count = std::max(1L, std::atol(argv[i + 1]));
    else if (opt == "--csv")
      csv = argv[i + 1];
    else
      die("unknown option " + opt);
  }
  setenv("P11MUX_MODULE", argv[2], 1);
  setenv("P11MUX_LOG_LEVEL", "warn", 1);
  unsetenv("P11MUX_CONFIG");
  CK_FUNCTION_LIST* lists[kConfigCount] = {load(argv[2]), load(argv[1]), load(argv[1])};

  // ns[config][op] over the rounds; one unmeasured round first.
  std::vector<std::vector<std::vector<double>>> ns(kConfigCount,
                                                   std::vector<std::vector<double>>(kOpCount));
  for (long r = -1; r < rounds; ++r) {
    for (std::size_t c = 0; c < kConfigCount; ++c) {
      std::vector<double> one = round_of(lists[c], c != 0, kConfigs[c], r < 0 ? count / 10 : count);
      if (r < 0) continue;
      for (std::size_t o = 0; o < kOpCount; ++o) ns[c][o].push_back(one[o]);
    }
  }

  std::printf(
      "null-overhead: CPU ns per call over the null backend, median of %ld rounds of %ld "
      "iterations, one thread\n",
      rounds, count);
  std::printf("  %-30s %10s %22s %22s\n", "op", "direct", "serialize (added)", "multiplex (added)");
  FILE* out = csv != nullptr ? std::fopen(csv, "w") : nullptr;
  if (csv != nullptr && out == nullptr) die(std::string("cannot write ") + csv);
  if (out != nullptr) std::fprintf(out, "op,config,rounds,median_ns_per_call,added_ns\n");
  for (std::size_t o = 0; o < kOpCount; ++o) {
    std::printf("  %-30s", kOps[o].name);
    for (std::size_t c = 0; c < kConfigCount; ++c) {
      double m = median(ns[c][o]);
      std::vector<double> diff;
      for (long r = 0; r < rounds; ++r) diff.push_back(ns[c][o][r] - ns[0][o][r]);
      double added = median(diff);
      if (c == 0) {
        std::printf(" %10.1f", m);
      } else {
        char cell[40];
        std::snprintf(cell, sizeof cell, "%.1f (%+.1f)", m, added);
        std::printf(" %22s", cell);
      }
      if (out != nullptr && c == 0)
        std::fprintf(out, "%s,%s,%ld,%.1f,\n", kOps[o].name, kConfigs[c], rounds, m);
      if (out != nullptr && c != 0) {
        std::fprintf(out, "%s,%s,%ld,%.1f,%.1f\n", kOps[o].name, kConfigs[c], rounds, m, added);
      }
    }
    std::printf("\n");
  }
  if (out != nullptr) std::fclose(out);
  return 0;
}
