// Why a helper thread: verifying a store read means a checksum over every byte just read. Done
// after the read it is a second pass over memory (+24 % on a warm full-store read, bench/
// RESULTS.md "Store integrity"). Here the calling thread reads the file piece by piece and a
// helper thread checksums each piece right behind it, while it is still in cache.
//
// The caller never waits for the helper to start: pieces are claimed from a shared counter,
// and once the reading is done the caller checksums every piece not yet claimed itself. On a
// busy machine where the helper gets no core, a read is then a read plus a checksum pass, never
// a wait for a thread to be scheduled. Each piece has its own crc (from a fresh register), and
// a span's crc is put together from its pieces' (crc32c_combine), so any thread may take any
// piece.
#include "pread_crc.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cerrno>
#include <condition_variable>
#include <memory>
#include <mutex>
#include <thread>

#include <unistd.h>

#include "crc32c.h"

namespace actstore_native {
namespace {

struct Piece {
  size_t span, begin, size;
  int64_t offset;   // in the file
};

// Pieces of a sixteenth of the read, 64 to 512 KiB: small enough that the checksum of the
// last piece (after the reading is done) is a small part of the whole, large enough that the
// read is not dominated by system calls, and within a core's L2 cache.
std::vector<Piece> cut(const std::vector<Span> &spans, int64_t offset) {
  size_t total = 0;
  for (const Span &s : spans) total += s.size;
  const size_t piece = std::clamp<size_t>((total / 16) & ~size_t{4095}, 64 << 10, 512 << 10);
  std::vector<Piece> pieces;
  int64_t at = offset;
  for (size_t s = 0; s < spans.size(); ++s)
    for (size_t b = 0; b < spans[s].size; b += piece) {
      const size_t n = std::min(piece, spans[s].size - b);
      pieces.push_back({s, b, n, at});
      at += static_cast<int64_t>(n);
    }
  return pieces;
}

// One verified read, shared by the caller and the helper (which may still hold it after the
// caller returned: then every piece is claimed and it touches nothing).
struct Job {
  std::vector<Span> spans;
  std::vector<Piece> pieces;
  std::vector<uint32_t> crcs;        // per piece
  std::atomic<size_t> ready{0};      // pieces read (release: their bytes are visible)
  std::atomic<bool> ended{false};    // the reading stopped (done, end of file or error)
  std::atomic<size_t> claimed{0};    // next piece to checksum
  std::atomic<size_t> finished{0};   // pieces checksummed or given up

  // Checksum pieces until none is left to claim. `wait`: a claimed piece not yet read is
  // waited for (the helper); the caller claims only after the reading ended.
  void work() {
    const size_t n = pieces.size();
    for (size_t i = claimed.fetch_add(1); i < n; i = claimed.fetch_add(1)) {
      while (ready.load(std::memory_order_acquire) <= i &&
             !ended.load(std::memory_order_acquire))
        std::this_thread::yield();
      if (ready.load(std::memory_order_acquire) > i) {
        const Piece &p = pieces[i];
        crcs[i] = crc32c(spans[p.span].data + p.begin, p.size);
      }
      finished.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

// A thread that runs Job::work for whoever posts a job; created on first use, per process
// (a child after fork() makes its own and never touches the parent's).
class Helper {
 public:
  static Helper &get() {
    static std::mutex guard;
    static Helper *helper = nullptr;
    std::lock_guard<std::mutex> lock(guard);
    if (helper == nullptr || helper->pid_ != ::getpid())
      helper = new Helper();   // lives as long as the process (a detached thread uses it)
    return *helper;
  }

  void post(std::shared_ptr<Job> job) {
    std::lock_guard<std::mutex> lock(m_);
    job_ = std::move(job);
    has_job_.store(true, std::memory_order_release);
    if (sleeping_) cv_.notify_one();
  }

 private:
  Helper() : pid_(::getpid()) { std::thread([this] { loop(); }).detach(); }

  // After a job the helper stays awake for kLinger before it sleeps: a layer-by-layer read
  // posts a job every few hundred microseconds, and waking a sleeping thread takes longer than
  // checksumming one of its pieces.
  static constexpr std::chrono::microseconds kLinger{500};

  void loop() {
    for (;;) {
      const auto until = std::chrono::steady_clock::now() + kLinger;
      while (!has_job_.load(std::memory_order_acquire) &&
             std::chrono::steady_clock::now() < until)
        std::this_thread::yield();
      std::shared_ptr<Job> job;
      {
        std::unique_lock<std::mutex> lock(m_);
        if (job_ == nullptr) {
          sleeping_ = true;
          cv_.wait(lock, [this] { return job_ != nullptr; });
          sleeping_ = false;
        }
        job = std::move(job_);
        job_.reset();
        has_job_.store(false, std::memory_order_relaxed);
      }
      job->work();
    }
  }

  pid_t pid_;
  std::mutex m_;
  std::condition_variable cv_;
  std::shared_ptr<Job> job_;
  std::atomic<bool> has_job_{false};
  bool sleeping_ = false;   // guarded by m_
};

// Read one piece whole; false at the end of the file or on an error (`got`, `error` set).
bool read_piece(int fd, const Piece &p, uint8_t *dst, int64_t &got, int &error) {
  size_t done = 0;
  while (done < p.size) {
    const ssize_t r = ::pread(fd, dst + done, p.size - done, p.offset + static_cast<int64_t>(done));
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) {
      error = r < 0 ? errno : 0;
      got += static_cast<int64_t>(done);
      return false;
    }
    done += static_cast<size_t>(r);
  }
  got += static_cast<int64_t>(p.size);
  return true;
}

}  // namespace

ReadCrc pread_crc(int fd, int64_t offset, const std::vector<Span> &spans) {
  auto job = std::make_shared<Job>();
  job->spans = spans;
  job->pieces = cut(spans, offset);
  const size_t n = job->pieces.size();
  job->crcs.assign(n, 0);
  if (n > 1) Helper::get().post(job);

  ReadCrc out;
  for (size_t i = 0; i < n; ++i) {
    const Piece &p = job->pieces[i];
    if (!read_piece(fd, p, spans[p.span].data + p.begin, out.got, out.error)) break;
    job->ready.store(i + 1, std::memory_order_release);
  }
  job->ended.store(true, std::memory_order_release);
  job->work();   // whatever the helper has not claimed
  while (job->finished.load(std::memory_order_acquire) < n)   // a piece the helper is on
    std::this_thread::yield();

  // each span's crc from its pieces' (pieces past the end of the file are left out: the
  // caller sees got < asked and reports a truncated file)
  const size_t read = job->ready.load(std::memory_order_acquire);
  out.crcs.assign(spans.size(), 0);
  for (size_t i = 0; i < read; ++i) {
    const Piece &p = job->pieces[i];
    out.crcs[p.span] = p.begin == 0 ? job->crcs[i]
                                    : crc32c_combine(out.crcs[p.span], job->crcs[i], p.size);
  }
  return out;
}

}  // namespace actstore_native
