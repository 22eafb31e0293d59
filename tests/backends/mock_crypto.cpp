// The fake crypto: deterministic functions the tests can recompute through
// mock_reference_digest / mock_reference_signature / mock_reference_xor_byte.
#include "mock_state.h"

namespace p11mux::mock {

namespace {

constexpr std::uint64_t kFnvOffset = 0xcbf29ce484222325ULL;
constexpr std::uint64_t kFnvPrime = 0x100000001b3ULL;

std::uint64_t fnv1a(std::uint64_t h, const unsigned char* data, std::size_t len) {
  for (std::size_t i = 0; i < len; ++i) {
    h ^= data[i];
    h *= kFnvPrime;
  }
  return h;
}

void store_le(std::uint64_t v, unsigned char* out) {
  for (int i = 0; i < 8; ++i) out[i] = static_cast<unsigned char>(v >> (8 * i));
}

}  // namespace

// Block i = FNV-1a-64 over (byte i, data...), little-endian.
Digest reference_digest(const unsigned char* data, std::size_t len) {
  Digest out{};
  for (unsigned char block = 0; block < 4; ++block) {
    std::uint64_t h = fnv1a(kFnvOffset, &block, 1);
    store_le(fnv1a(h, data, len), out.data() + 8 * block);
  }
  return out;
}

Digest reference_signature(unsigned long key_id, const unsigned char* data, std::size_t len) {
  Bytes input(8 + len);
  store_le(key_id, input.data());
  for (std::size_t i = 0; i < len; ++i) input[8 + i] = data[i];
  return reference_digest(input.data(), input.size());
}

unsigned char xor_byte(unsigned long key_id) {
  return static_cast<unsigned char>(key_id % 255 + 1);
}

// Not random at all, but never repeating soon and never all zero: a
// splitmix64 stream shared by all callers.
void fill_random(unsigned char* out, std::size_t len) {
  static std::atomic<std::uint64_t> state{0x853c49e6748fea9bULL};
  for (std::size_t i = 0; i < len; i += 8) {
    std::uint64_t z = state.fetch_add(0x9e3779b97f4a7c15ULL, std::memory_order_relaxed);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    unsigned char block[8];
    store_le(z, block);
    for (std::size_t j = 0; j < 8 && i + j < len; ++j) out[i + j] = block[j];
  }
}

}  // namespace p11mux::mock
