// Why a pipeline: verifying a store read means a checksum over every byte just read. Done
// after the read, it is a second pass over memory (+24 % on a warm full-store read, bench/
// RESULTS.md "Store integrity"); taken by a second thread piece by piece right behind the
// reader, it runs on bytes still in cache and overlaps the copy out of the page cache.
#include "pread_crc.h"

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <thread>

#include <unistd.h>

#ifdef ACTSTORE_OPENMP
#include <omp.h>
#endif

#include "crc32c.h"

namespace actstore_native {
namespace {

struct Piece {
  size_t span, begin, size;
};

// Pieces of a sixteenth of the read, 64 KiB to 1 MiB: small enough that the checksum of the
// last piece (after the reader is done) is a small part of the whole, large enough that the
// read is not dominated by system calls, and within a core's L2 cache.
std::vector<Piece> cut(const std::vector<Span> &spans) {
  size_t total = 0;
  for (const Span &s : spans) total += s.size;
  const size_t piece = std::clamp<size_t>((total / 16) & ~size_t{4095}, 64 << 10, 1 << 20);
  std::vector<Piece> pieces;
  for (size_t s = 0; s < spans.size(); ++s)
    for (size_t b = 0; b < spans[s].size; b += piece)
      pieces.push_back({s, b, std::min(piece, spans[s].size - b)});
  return pieces;
}

// Read one piece whole; false at the end of the file or on an error (`out` updated).
bool read_piece(int fd, int64_t offset, uint8_t *dst, size_t size, ReadCrc &out) {
  size_t done = 0;
  while (done < size) {
    const ssize_t r = ::pread(fd, dst + done, size - done, offset + static_cast<int64_t>(done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      out.error = r < 0 ? errno : 0;
      out.got += static_cast<int64_t>(done);
      return false;
    }
    done += static_cast<size_t>(r);
  }
  out.got += static_cast<int64_t>(size);
  return true;
}

}  // namespace

ReadCrc pread_crc(int fd, int64_t offset, const std::vector<Span> &spans) {
  ReadCrc out;
  out.crcs.assign(spans.size(), 0);
  const std::vector<Piece> pieces = cut(spans);
  const size_t n = pieces.size();
  std::atomic<size_t> ready{0};     // pieces read so far (release: their bytes are visible)
  std::atomic<bool> ended{false};   // the reader stopped (all read, end of file or error)
  std::vector<int64_t> at(n);
  for (size_t i = 0, pos = 0; i < n; pos += pieces[i].size, ++i)
    at[i] = offset + static_cast<int64_t>(pos);

  auto reader = [&] {
    for (size_t i = 0; i < n; ++i) {
      const Piece &p = pieces[i];
      if (!read_piece(fd, at[i], spans[p.span].data + p.begin, p.size, out)) break;
      ready.store(i + 1, std::memory_order_release);
    }
    ended.store(true, std::memory_order_release);
  };
  auto checksummer = [&] {
    for (size_t i = 0; i < n; ++i) {
      while (ready.load(std::memory_order_acquire) <= i) {
        if (ended.load(std::memory_order_acquire) && ready.load(std::memory_order_acquire) <= i)
          return;
        std::this_thread::yield();
      }
      const Piece &p = pieces[i];
      out.crcs[p.span] = crc32c(spans[p.span].data + p.begin, p.size, out.crcs[p.span]);
    }
  };

#ifdef ACTSTORE_OPENMP
#pragma omp parallel num_threads(2) if (n > 1)
  {
    if (omp_get_num_threads() == 2) {
      if (omp_get_thread_num() == 0) reader();
      else checksummer();
    } else {   // one thread only (nested, or OMP_NUM_THREADS=1): read, then checksum
      reader();
      checksummer();
    }
  }
#else
  reader();
  checksummer();
#endif
  // pieces after the end of the file are not checksummed: the caller sees got < asked
  return out;
}

}  // namespace actstore_native
