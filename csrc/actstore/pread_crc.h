// Verified reads of `actstore._native`: file bytes into buffers, each buffer's crc32c taken
// while the next bytes are read (plain C++/POSIX; bindings.cpp exposes it to Python).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

namespace actstore_native {

struct Span {
  uint8_t *data;
  size_t size;
};

struct ReadCrc {
  int64_t got = 0;              // bytes read (less than asked: the file ended)
  int error = 0;                // errno of a failed read, 0 if none
  std::vector<uint32_t> crcs;   // crc32c of each span (of what was read into it)
};

// Read the file `fd` from `offset` into the spans, one after another, and return each span's
// crc32c. The calling thread reads while a helper thread checksums what is already read, in
// pieces small enough to stay in cache, so the checksum costs little more than the read; the
// caller checksums what the helper has not taken, never waiting for it to be scheduled.
ReadCrc pread_crc(int fd, int64_t offset, const std::vector<Span> &spans);

}  // namespace actstore_native
