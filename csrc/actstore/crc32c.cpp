// CRC32C: reflected polynomial 0x82F63B78, register initialised and finalised with ~0.
//
// Why three streams: the crc32 instruction has a latency of 3 cycles and a throughput of 1, so
// one dependent chain runs at a third of the unit's speed. Each round checksums three adjacent
// stretches of kStream bytes independently (the 2nd and 3rd from a zero register) and joins
// them: a CRC register is linear, so reg(a, X||Y) = shift(reg(a, X), |Y|) ^ reg(0, Y), where
// shift(r, k) feeds k zero bytes. shift by kStream and 2*kStream bytes are 32x32 bit matrices,
// kept as four 256-entry tables each.
#include "crc32c.h"

#include <array>
#include <cstring>

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define ACTSTORE_CRC_X86 1
#include <nmmintrin.h>
#endif

namespace actstore_native {
namespace {

constexpr uint32_t kPoly = 0x82F63B78u;
constexpr size_t kStream = 4096;   // bytes per stream and round (a multiple of 8)

using Table = std::array<uint32_t, 256>;

struct Tables {
  std::array<Table, 8> slice;      // slicing-by-8 for the portable loop
  std::array<Table, 4> shift1;     // feed kStream zero bytes
  std::array<Table, 4> shift2;     // feed 2 * kStream zero bytes

  Tables() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c >> 1) ^ (kPoly & (0u - (c & 1u)));
      slice[0][i] = c;
    }
    for (int t = 1; t < 8; ++t)
      for (int i = 0; i < 256; ++i)
        slice[t][i] = (slice[t - 1][i] >> 8) ^ slice[0][slice[t - 1][i] & 0xFF];
    fill_shift(shift1, kStream);
    fill_shift(shift2, 2 * kStream);
  }

  uint32_t zeros(uint32_t r, size_t n) const {
    for (size_t i = 0; i < n; ++i) r = (r >> 8) ^ slice[0][r & 0xFF];
    return r;
  }

  void fill_shift(std::array<Table, 4> &t, size_t n) const {
    uint32_t basis[32];
    for (int b = 0; b < 32; ++b) basis[b] = zeros(1u << b, n);
    for (int k = 0; k < 4; ++k)
      for (uint32_t v = 0; v < 256; ++v) {
        uint32_t r = 0;
        for (int b = 0; b < 8; ++b)
          if (v & (1u << b)) r ^= basis[8 * k + b];
        t[k][v] = r;
      }
  }
};

const Tables &tables() {
  static const Tables t;   // thread-safe one-time initialisation
  return t;
}

inline uint32_t shift(const std::array<Table, 4> &t, uint32_t r) {
  return t[0][r & 0xFF] ^ t[1][(r >> 8) & 0xFF] ^ t[2][(r >> 16) & 0xFF] ^ t[3][r >> 24];
}

uint32_t table_driven(const uint8_t *p, size_t n, uint32_t r) {
  const auto &s = tables().slice;
  for (; n >= 8; n -= 8, p += 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);   // little-endian hosts only (every platform we build for)
    v ^= r;
    r = s[7][v & 0xFF] ^ s[6][(v >> 8) & 0xFF] ^ s[5][(v >> 16) & 0xFF] ^
        s[4][(v >> 24) & 0xFF] ^ s[3][(v >> 32) & 0xFF] ^ s[2][(v >> 40) & 0xFF] ^
        s[1][(v >> 48) & 0xFF] ^ s[0][v >> 56];
  }
  for (; n; --n, ++p) r = (r >> 8) ^ s[0][(r ^ *p) & 0xFF];
  return r;
}

#ifdef ACTSTORE_CRC_X86
__attribute__((target("sse4.2"))) inline uint64_t run8(uint64_t r, const uint8_t *p,
                                                        size_t n) {
  for (size_t i = 0; i < n; i += 8) {
    uint64_t v;
    std::memcpy(&v, p + i, 8);
    r = _mm_crc32_u64(r, v);
  }
  return r;
}

__attribute__((target("sse4.2"))) uint32_t hardware(const uint8_t *p, size_t n, uint32_t r) {
  const Tables &t = tables();
  uint64_t a = r;
  for (; n >= 3 * kStream; n -= 3 * kStream, p += 3 * kStream) {
    uint64_t b = 0, c = 0;
    for (size_t i = 0; i < kStream; i += 8) {   // three independent chains in one loop
      uint64_t x, y, z;
      std::memcpy(&x, p + i, 8);
      std::memcpy(&y, p + kStream + i, 8);
      std::memcpy(&z, p + 2 * kStream + i, 8);
      a = _mm_crc32_u64(a, x);
      b = _mm_crc32_u64(b, y);
      c = _mm_crc32_u64(c, z);
    }
    a = shift(t.shift2, static_cast<uint32_t>(a)) ^ shift(t.shift1, static_cast<uint32_t>(b)) ^
        static_cast<uint32_t>(c);
  }
  const size_t whole = n & ~static_cast<size_t>(7);
  a = run8(a, p, whole);
  uint32_t r32 = static_cast<uint32_t>(a);
  for (size_t i = whole; i < n; ++i) r32 = _mm_crc32_u8(r32, p[i]);
  return r32;
}

bool has_sse42() {
  static const bool yes = __builtin_cpu_supports("sse4.2");
  return yes;
}
#endif

// Polynomials modulo P in the reflected bit order: bit 31 is x^0.
uint32_t mult_mod_p(uint32_t a, uint32_t b) {
  uint32_t product = 0;
  for (uint32_t m = 1u << 31; m != 0; m >>= 1) {
    if (a & m) product ^= b;
    b = (b >> 1) ^ (kPoly & (0u - (b & 1u)));   // b *= x
  }
  return product;
}

// x^(2^k) mod P for k = 0..63
const std::array<uint32_t, 64> &x_pow_2k() {
  static const std::array<uint32_t, 64> table = [] {
    std::array<uint32_t, 64> t{};
    uint32_t p = 1u << 30;   // x^1
    for (auto &v : t) {
      v = p;
      p = mult_mod_p(p, p);
    }
    return t;
  }();
  return table;
}

}  // namespace

uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t len_b) {
  // x^(8 len_b) mod P by squaring: bit k of 8 len_b contributes x^(2^k)
  const auto &t = x_pow_2k();
  uint32_t x = 1u << 31;   // x^0
  uint64_t bits = static_cast<uint64_t>(len_b) << 3;
  for (int k = 0; bits != 0; ++k, bits >>= 1)
    if (bits & 1) x = mult_mod_p(t[k], x);
  return mult_mod_p(x, crc_a) ^ crc_b;
}

uint32_t crc32c(const uint8_t *data, size_t n, uint32_t crc, bool portable) {
  uint32_t r = ~crc;
#ifdef ACTSTORE_CRC_X86
  if (!portable && has_sse42()) return ~hardware(data, n, r);
#endif
  return ~table_driven(data, n, r);
}

}  // namespace actstore_native
