// CRC32C (Castagnoli) of `actstore._native`, the checksum a store keeps per row block (plain
// C++; bindings.cpp exposes it to Python). Equal to zarr's crc32c codec and google_crc32c.
#pragma once
#include <cstddef>
#include <cstdint>

namespace actstore_native {

// crc32c of n bytes, continuing from `crc` (0 for a fresh checksum; pass a previous result to
// checksum a concatenation). SSE4.2 instructions on x86-64 CPUs that have them (three
// interleaved streams), a table-driven loop elsewhere or when `portable` (for the tests).
uint32_t crc32c(const uint8_t *data, size_t n, uint32_t crc = 0, bool portable = false);

// The crc32c of A followed by B from crc(A), crc(B) and the length of B (polynomial arithmetic
// modulo the CRC polynomial: x^(8 len_b) times crc(A), plus crc(B)).
uint32_t crc32c_combine(uint32_t crc_a, uint32_t crc_b, size_t len_b);

}  // namespace actstore_native
