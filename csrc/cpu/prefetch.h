// Software prefetch spread over a compute-bound loop, so that the memory-bound loop after it finds
// its lines in cache: the in-kernel noise is generated in L1-sized pieces (compute: the generator's
// arithmetic, not memory, sets its pace), then applied to the piece's inputs and outputs (memory).
// Without this the two phases alternate and memory idles while the generator runs (measurements:
// docs/performance.md#measurements-behind-the-code).
#pragma once

#include <cstdint>

namespace fastddpm {

class Prefetcher {
 public:
  // Streams of `bytes` each.
  explicit Prefetcher(int64_t bytes) : bytes_(bytes) {}

  // The compute loop has `work` units: the streams are requested in step with them.
  void set_work(int64_t work) { work_ = work > 0 ? work : 1; }

  // [p, p + bytes) will be read (write = false) or written.
  void add(const void* p, bool write) {
    if (n_ < kMax) streams_[n_++] = {static_cast<const char*>(p), write};
  }

  // `units` more units of work done: request every stream's lines up to the same fraction.
  void advance(int64_t units) {
    done_ += units;
    const int64_t upto = done_ >= work_ ? bytes_ : done_ * bytes_ / work_;
    for (; issued_ < upto; issued_ += kLine)
      for (int s = 0; s < n_; ++s) {
        if (streams_[s].write) __builtin_prefetch(streams_[s].p + issued_, 1, 3);
        else __builtin_prefetch(streams_[s].p + issued_, 0, 3);
      }
  }

 private:
  static constexpr int kMax = 3;
  static constexpr int64_t kLine = 64;
  struct Stream {
    const char* p;
    bool write;
  };
  Stream streams_[kMax] = {};
  int n_ = 0;
  int64_t bytes_, work_ = 1, done_ = 0, issued_ = 0;
};

}  // namespace fastddpm
