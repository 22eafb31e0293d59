// p11mux over libp11mux-spec-bender.so, a backend that bends the spec the way
// real modules do (mock_control.h, MOCK_BEND_*). Whatever the backend does,
// p11mux keeps its promises: a virtual session's objects and operations are
// its own, the pool stays within its limit, a learned limit is not forever,
// and the tracer never reads past a caller's buffer. Each invariant runs in
// both session modes.
#include "harness.hpp"
#include "key_material.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <thread>

namespace p11mux::test {
namespace {

using namespace std::chrono_literals;

// Every bend but the transient CKR_SESSION_COUNT, for the invariants that are
// not about the limit (so that each open succeeds).
constexpr unsigned long kBendsButCount = MOCK_BEND_ALL & ~MOCK_BEND_TRANSIENT_COUNT;

MockConfig bends(unsigned long bits) {
  MockConfig c{};
  c.bend = bits;
  return c;
}

// The session mode of this run: each test case runs once per mode, with
// [pool] bind = open (a virtual session holds a backend session while open).
#define FOR_BOTH_SESSION_MODES(mode)           \
  const char* mode = "serialize";              \
  SUBCASE("serialize") {}                      \
  SUBCASE("multiplex") { mode = "multiplex"; } \
  std::string session_mode = mode;             \
  CAPTURE(session_mode)

// The same, and multiplex mode with [pool] bind = state: the benders' effects
// must stay with their virtual session while backend sessions come and go.
#define FOR_EACH_SESSION_MODE(mode)                                \
  const char* mode = "serialize";                                  \
  SUBCASE("serialize") {}                                          \
  SUBCASE("multiplex") { mode = "multiplex"; }                     \
  SUBCASE("multiplex, bind = state") { mode = "multiplex-state"; } \
  std::string session_mode = mode;                                 \
  CAPTURE(session_mode)

// libp11mux.so initialized over the spec bender in a session mode.
class BenderProxy {
 public:
  BenderProxy(const char* mode, MockConfig config, Proxy::Environment env = {}) : p11(libs().p11) {
    reset_environment();
    ::setenv("P11MUX_MODULE", P11MUX_TEST_SPEC_BENDER_PATH, 1);
    const bool state = std::string_view(mode) == "multiplex-state";
    ::setenv("P11MUX_SESSION_MODE", state ? "multiplex" : mode, 1);
    ::setenv("P11MUX_POOL_BIND", state ? "state" : "open", 1);
    for (auto [name, value] : env) ::setenv(name, value, 1);
    CHECK(bender().reset() == 0);
    REQUIRE(bender().configure(&config) == 0);
    CK_C_INITIALIZE_ARGS os{};
    os.flags = CKF_OS_LOCKING_OK;
    REQUIRE(p11->C_Initialize(&os) == CKR_OK);
  }
  ~BenderProxy() {
    p11->C_Finalize(nullptr);
    reset_environment();
  }
  BenderProxy(const BenderProxy&) = delete;
  BenderProxy& operator=(const BenderProxy&) = delete;

  CK_SESSION_HANDLE open() {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    REQUIRE(p11->C_OpenSession(0, CKF_SERIAL_SESSION | CKF_RW_SESSION, nullptr, nullptr, &h) ==
            CKR_OK);
    return h;
  }

  CK_FUNCTION_LIST* p11;
};

std::vector<unsigned char> bytes(std::string_view s) { return {s.begin(), s.end()}; }

using Digest = std::array<unsigned char, MOCK_DIGEST_LEN>;

Digest reference_digest(std::string_view data) {
  Digest d{};
  bender().reference_digest(reinterpret_cast<const unsigned char*>(data.data()), data.size(),
                            d.data());
  return d;
}

CK_RV digest(CK_FUNCTION_LIST* p11, CK_SESSION_HANDLE h, std::string_view data, Digest& out) {
  CK_MECHANISM sha = sha256();
  if (CK_RV rv = p11->C_DigestInit(h, &sha); rv != CKR_OK) return rv;
  auto in = bytes(data);
  CK_ULONG len = out.size();
  return p11->C_Digest(h, in.data(), in.size(), out.data(), &len);
}

// Every object the session can find (no template).
std::vector<CK_OBJECT_HANDLE> find_all(CK_FUNCTION_LIST* p11, CK_SESSION_HANDLE h) {
  std::vector<CK_OBJECT_HANDLE> found;
  REQUIRE(p11->C_FindObjectsInit(h, nullptr, 0) == CKR_OK);
  CK_OBJECT_HANDLE batch[16];
  CK_ULONG n = 0;
  do {
    REQUIRE(p11->C_FindObjects(h, batch, 16, &n) == CKR_OK);
    found.insert(found.end(), batch, batch + n);
  } while (n == 16);
  REQUIRE(p11->C_FindObjectsFinal(h) == CKR_OK);
  return found;
}

TEST_CASE("spec bender: a closed virtual session's objects are neither visible nor usable") {
  FOR_EACH_SESSION_MODE(mode);
  BenderProxy proxy(mode, bends(kBendsButCount));
  CK_FUNCTION_LIST* p = proxy.p11;

  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    CK_SESSION_HANDLE first = proxy.open();
    std::vector<CK_OBJECT_HANDLE> objects, keys;
    // C_CreateObject
    CK_OBJECT_CLASS data_class = CKO_DATA;
    CK_ATTRIBUTE data[] = {{CKA_CLASS, &data_class, sizeof data_class}};
    CK_OBJECT_HANDLE obj = 0;
    REQUIRE(p->C_CreateObject(first, data, 1, &obj) == CKR_OK);
    objects.push_back(obj);
    // C_GenerateKey
    CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
    CK_OBJECT_HANDLE base = 0;
    REQUIRE(p->C_GenerateKey(first, &gen, nullptr, 0, &base) == CKR_OK);
    keys.push_back(base);
    // C_DeriveKey through phKey
    CK_MECHANISM plain{CKM_SHA256_KEY_DERIVATION, nullptr, 0};
    CK_OBJECT_HANDLE derived = 0;
    REQUIRE(p->C_DeriveKey(first, &plain, base, nullptr, 0, &derived) == CKR_OK);
    keys.push_back(derived);
    // C_DeriveKey returning four keys in the mechanism parameter (NSS softoken)
    KeyMaterialDerive tls;
    REQUIRE(p->C_DeriveKey(first, &tls.mechanism, base, nullptr, 0, nullptr) == CKR_OK);
    for (CK_OBJECT_HANDLE k : tls.keys()) {
      REQUIRE(k != CK_INVALID_HANDLE);
      keys.push_back(k);
    }
    // C_UnwrapKey
    CK_MECHANISM wrap{CKM_AES_KEY_WRAP, nullptr, 0};
    unsigned char wrapped[32] = {7};
    CK_OBJECT_HANDLE unwrapped = 0;
    REQUIRE(p->C_UnwrapKey(first, &wrap, base, wrapped, sizeof wrapped, nullptr, 0, &unwrapped) ==
            CKR_OK);
    keys.push_back(unwrapped);
    objects.insert(objects.end(), keys.begin(), keys.end());
    // The MAC key works in its own session.
    CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};
    REQUIRE(p->C_SignInit(first, &mac, tls.out.hClientMacSecret) == CKR_OK);
    unsigned char sig[MOCK_DIGEST_LEN];
    CK_ULONG sig_len = sizeof sig;
    REQUIRE(p->C_Sign(first, wrapped, sizeof wrapped, sig, &sig_len) == CKR_OK);
    REQUIRE(p->C_CloseSession(first) == CKR_OK);

    CK_SESSION_HANDLE next = proxy.open();
    std::vector<CK_OBJECT_HANDLE> visible = find_all(p, next);
    CHECK(visible.empty());
    for (CK_OBJECT_HANDLE o : objects) {
      CAPTURE(o);
      CK_OBJECT_CLASS cls = 0;
      CK_ATTRIBUTE get{CKA_CLASS, &cls, sizeof cls};
      CHECK(p->C_GetAttributeValue(next, o, &get, 1) == CKR_OBJECT_HANDLE_INVALID);
    }
    for (CK_OBJECT_HANDLE k : keys) {
      CAPTURE(k);
      CHECK(p->C_SignInit(next, &mac, k) == CKR_KEY_HANDLE_INVALID);
    }
    REQUIRE(p->C_CloseSession(next) == CKR_OK);
    // Nothing of either session lives on in the backend.
    CHECK(bender_stats().session_objects == 0);
  }
}

TEST_CASE("spec bender: a key-and-MAC derive never destroys what its unused phKey held") {
  FOR_EACH_SESSION_MODE(mode);
  BenderProxy proxy(mode, bends(kBendsButCount));
  CK_FUNCTION_LIST* p = proxy.p11;
  CK_SESSION_HANDLE keeper = proxy.open();
  CK_OBJECT_CLASS data_class = CKO_DATA;
  CK_ATTRIBUTE data[] = {{CKA_CLASS, &data_class, sizeof data_class}};
  CK_OBJECT_HANDLE kept = 0;
  REQUIRE(p->C_CreateObject(keeper, data, 1, &kept) == CKR_OK);

  CK_SESSION_HANDLE other = proxy.open();
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_OBJECT_HANDLE base = 0;
  REQUIRE(p->C_GenerateKey(other, &gen, nullptr, 0, &base) == CKR_OK);
  // phKey is unnecessary here (docs/pkcs11-facts.md) and the backend does not
  // write it: it still holds the handle of the keeper's object.
  KeyMaterialDerive tls;
  CK_OBJECT_HANDLE leftover = kept;
  REQUIRE(p->C_DeriveKey(other, &tls.mechanism, base, nullptr, 0, &leftover) == CKR_OK);
  CHECK(leftover == kept);
  REQUIRE(p->C_CloseSession(other) == CKR_OK);

  CK_OBJECT_CLASS cls = 0;
  CK_ATTRIBUTE get{CKA_CLASS, &cls, sizeof cls};
  CHECK(p->C_GetAttributeValue(keeper, kept, &get, 1) == CKR_OK);
  for (CK_OBJECT_HANDLE k : tls.keys()) {
    CAPTURE(k);
    CHECK(p->C_GetAttributeValue(keeper, k, &get, 1) == CKR_OBJECT_HANDLE_INVALID);
  }
  REQUIRE(p->C_CloseSession(keeper) == CKR_OK);
  CHECK(bender_stats().session_objects == 0);
}

TEST_CASE("spec bender: no operation of a closed session is active in a new one") {
  FOR_EACH_SESSION_MODE(mode);
  BenderProxy proxy(mode, bends(kBendsButCount));
  CK_FUNCTION_LIST* p = proxy.p11;
  // A token key both sessions can use for sign/verify.
  CK_SESSION_HANDLE setup = proxy.open();
  CK_MECHANISM gen{CKM_GENERIC_SECRET_KEY_GEN, nullptr, 0};
  CK_BBOOL yes = CK_TRUE;
  CK_ATTRIBUTE on_token[] = {{CKA_TOKEN, &yes, sizeof yes}};
  CK_OBJECT_HANDLE key = 0;
  REQUIRE(p->C_GenerateKey(setup, &gen, on_token, 1, &key) == CKR_OK);
  REQUIRE(p->C_CloseSession(setup) == CKR_OK);
  CK_MECHANISM mac{CKM_SHA256_HMAC, nullptr, 0};

  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    // A digest that the spec ends with an error, and a verification too.
    CK_SESSION_HANDLE first = proxy.open();
    CK_MECHANISM sha = sha256();
    REQUIRE(p->C_DigestInit(first, &sha) == CKR_OK);
    auto theirs = bytes("the previous session's data");
    REQUIRE(p->C_DigestUpdate(first, theirs.data(), theirs.size()) == CKR_OK);
    CHECK(p->C_DigestKey(first, 0x0bad0bad) == CKR_KEY_HANDLE_INVALID);
    REQUIRE(p->C_VerifyInit(first, &mac, key) == CKR_OK);
    unsigned char wrong[MOCK_DIGEST_LEN] = {};
    CHECK(p->C_Verify(first, theirs.data(), theirs.size(), wrong, sizeof wrong) ==
          CKR_SIGNATURE_INVALID);
    REQUIRE(p->C_CloseSession(first) == CKR_OK);

    CK_SESSION_HANDLE next = proxy.open();
    REQUIRE(p->C_DigestInit(next, &sha) == CKR_OK);
    auto mine = bytes("mine");
    Digest d{};
    CK_ULONG len = d.size();
    REQUIRE(p->C_Digest(next, mine.data(), mine.size(), d.data(), &len) == CKR_OK);
    CHECK(d == reference_digest("mine"));
    REQUIRE(p->C_SignInit(next, &mac, key) == CKR_OK);
    unsigned char sig[MOCK_DIGEST_LEN];
    len = sizeof sig;
    REQUIRE(p->C_Sign(next, mine.data(), mine.size(), sig, &len) == CKR_OK);
    CHECK(p->C_VerifyInit(next, &mac, key) == CKR_OK);
    CHECK(p->C_Verify(next, mine.data(), mine.size(), sig, sizeof sig) == CKR_OK);
    REQUIRE(p->C_CloseSession(next) == CKR_OK);
  }
}

// Threads open, digest and close; the backend refuses now and then below
// P11MUX_POOL_MAX_SESSIONS (and has no limit of its own). The backend never
// has more sessions open than the pool's limit.
TEST_CASE("spec bender: the pool never goes above its limit with transient CKR_SESSION_COUNT") {
  FOR_BOTH_SESSION_MODES(mode);
  constexpr unsigned long kLimit = 3;
  MockConfig c = bends(MOCK_BEND_ALL);
  c.transient_count_every = 2;  // the pool opens few: refuse often
  BenderProxy proxy(mode, c, {{"P11MUX_POOL_WAIT_MS", "200"}, {"P11MUX_POOL_MAX_SESSIONS", "3"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  // Hold up to the limit at once first: on a busy machine the threads below
  // may run one after another on a single backend session, and the backend
  // would never be asked for the second one it refuses.
  std::vector<CK_SESSION_HANDLE> held;
  for (int attempt = 0; attempt < 20 && held.size() < kLimit; ++attempt) {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    CK_RV rv = p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
    if (rv == CKR_OK) held.push_back(h);
    CHECK((rv == CKR_OK || rv == CKR_SESSION_COUNT));
  }
  CHECK(held.size() > 1);
  for (CK_SESSION_HANDLE h : held) CHECK(p->C_CloseSession(h) == CKR_OK);
  std::atomic<int> wrong_digest{0}, other_error{0}, done{0};
  std::vector<std::thread> threads;
  for (int t = 0; t < 8; ++t)
    threads.emplace_back([&, t] {
      std::string data = "thread " + std::to_string(t);
      Digest expected = reference_digest(data);
      for (int i = 0; i < 40; ++i) {
        CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
        CK_RV rv = p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
        if (rv == CKR_SESSION_COUNT) continue;  // the application may try again
        if (rv != CKR_OK) {
          ++other_error;
          continue;
        }
        Digest d{};
        rv = digest(p, h, data, d);
        if (rv == CKR_SESSION_COUNT) {  // multiplex: the backend session comes with the call
        } else if (rv != CKR_OK) {
          ++other_error;
        } else if (d != expected) {
          ++wrong_digest;
        } else {
          ++done;
        }
        p->C_CloseSession(h);
      }
    });
  for (auto& t : threads) t.join();
  MockStats s = bender_stats();
  CHECK(s.sessions_open_peak <= kLimit);
  CHECK(s.bend_session_count > 0);
  CHECK(wrong_digest == 0);
  CHECK(other_error == 0);
  CHECK(done > 0);
}

// One transient CKR_SESSION_COUNT must not cap the application for good: it
// can hold more sessions again later.
TEST_CASE("spec bender: a learned limit rises again after a transient CKR_SESSION_COUNT") {
  FOR_BOTH_SESSION_MODES(mode);
  MockConfig c = bends(MOCK_BEND_ALL);
  c.transient_count_every = 3;  // the third open is refused; the backend has no limit
  BenderProxy proxy(mode, c, {{"P11MUX_POOL_WAIT_MS", "50"}});
  CK_FUNCTION_LIST* p = proxy.p11;
  constexpr std::size_t kWanted = 8;
  std::vector<CK_SESSION_HANDLE> held;
  unsigned long refused = 0;
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (held.size() < kWanted && std::chrono::steady_clock::now() < deadline) {
    CK_SESSION_HANDLE h = CK_INVALID_HANDLE;
    CK_RV rv = p->C_OpenSession(0, CKF_SERIAL_SESSION, nullptr, nullptr, &h);
    if (rv == CKR_OK) {
      held.push_back(h);
    } else {
      REQUIRE(rv == CKR_SESSION_COUNT);
      ++refused;
      std::this_thread::sleep_for(20ms);
    }
  }
  CAPTURE(refused);
  CHECK(bender_stats().bend_session_count > 0);
  CHECK(held.size() == kWanted);
  for (CK_SESSION_HANDLE h : held) CHECK(p->C_CloseSession(h) == CKR_OK);
}

std::string read_file(const std::string& path) {
  std::ifstream in(path);
  std::stringstream text;
  text << in.rdbuf();
  return text.str();
}

// A backend that fills ulValueLen with the length it needs: the trace shows at
// most what the caller's buffer holds (ASan: no read past a heap buffer).
TEST_CASE("spec bender: tracing C_GetAttributeValue never reads past the caller's buffer") {
  FOR_EACH_SESSION_MODE(mode);
  std::string log = std::string("/tmp/p11mux-bender-trace-") + mode + ".log";
  ::unlink(log.c_str());
  const std::string label(200, 'L');
  const std::string neighbour = "NEIGHBOUR-BYTES-NOT-THE-CALLERS";
  {
    BenderProxy proxy(mode, bends(kBendsButCount),
                      {{"P11MUX_LOG_LEVEL", "trace"}, {"P11MUX_LOG_FILE", log.c_str()}});
    CK_FUNCTION_LIST* p = proxy.p11;
    CK_SESSION_HANDLE h = proxy.open();
    CK_OBJECT_CLASS cls = CKO_DATA;
    CK_ATTRIBUTE templ[] = {{CKA_CLASS, &cls, sizeof cls},
                            {CKA_LABEL, const_cast<char*>(label.data()), label.size()}};
    CK_OBJECT_HANDLE obj = 0;
    REQUIRE(p->C_CreateObject(h, templ, 2, &obj) == CKR_OK);
    // A heap buffer of exactly 8 bytes: ASan sees any read past it.
    auto exact = std::make_unique<unsigned char[]>(8);
    std::memset(exact.get(), 'e', 8);
    CK_ATTRIBUTE get{CKA_LABEL, exact.get(), 8};
    CHECK(p->C_GetAttributeValue(h, obj, &get, 1) == CKR_BUFFER_TOO_SMALL);
    // 8 bytes of the caller's followed by bytes that are not: never in the log.
    std::string region = std::string(8, 'c') + neighbour + std::string(200, 'n');
    CK_ATTRIBUTE get2{CKA_LABEL, region.data(), 8};
    CHECK(p->C_GetAttributeValue(h, obj, &get2, 1) == CKR_BUFFER_TOO_SMALL);
    CHECK(bender_stats().bend_lengths_filled == 2);
  }
  std::string text = read_file(log);
  CHECK(text.find("C_GetAttributeValue(") != std::string::npos);
  CHECK(text.find("NEIGHBOUR") == std::string::npos);
  CHECK(text.find("nnnnnnnn") == std::string::npos);
  ::unlink(log.c_str());
}

}  // namespace
}  // namespace p11mux::test
