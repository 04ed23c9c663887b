// A caching CPU allocator for loops that allocate the same tensors every iteration (the sampler's
// U-Net forward, a training step). glibc serves large blocks with mmap and returns them on free,
// so each iteration pays a page fault per 4 KiB of every large activation it writes, a sizeable
// share of a small model's sampler step (measurements: docs/performance.md#measurements-behind-the-code).
// While enabled, this allocator stands in for c10's CPU allocator and keeps freed blocks of
// >= kMinBytes in per-size free lists, so a steady loop reuses memory that is already mapped.
// Disabling restores the previous allocator and frees the cache; blocks still alive then are freed
// normally when their tensors die.
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <mutex>
#include <unordered_map>
#include <vector>

namespace fastddpm {
namespace {

constexpr size_t kMinBytes = 1 << 16;  // smaller blocks come from malloc's arenas without faults

class CachingCPUAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = nullptr;
    if (nbytes >= kMinBytes) {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = free_.find(nbytes);
      if (it != free_.end() && !it->second.empty()) {
        ptr = it->second.back();
        it->second.pop_back();
        cached_bytes_ -= nbytes;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (!ptr) ptr = c10::alloc_cpu(nbytes);
    if (!ptr) return {nullptr, nullptr, &release, c10::Device(c10::DeviceType::CPU)};  // nbytes == 0
    {
      std::lock_guard<std::mutex> lock(mu_);
      live_[ptr] = nbytes;
    }
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return &release; }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  // Stand in for the current CPU allocator; `limit` bounds the bytes kept in the free lists.
  // Scopes nest: only the outermost enable takes effect (and sets the limit), and only the
  // matching outermost disable restores the previous allocator.
  void enable(int64_t limit) {
    std::lock_guard<std::mutex> lock(mu_);
    if (depth_++ > 0) return;
    previous_ = c10::GetCPUAllocator();
    limit_ = static_cast<size_t>(limit);
    hits_ = misses_ = 0;
    enabled_ = true;
    c10::SetCPUAllocator(this, /*priority=*/0);
  }

  // Restore the previous allocator and free every cached block.
  void disable() {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (depth_ == 0 || --depth_ > 0) return;
      c10::SetCPUAllocator(previous_, /*priority=*/0);
      enabled_ = false;
      for (auto& [size, blocks] : free_) drop.insert(drop.end(), blocks.begin(), blocks.end());
      free_.clear();
      cached_bytes_ = 0;
    }
    for (void* p : drop) c10::free_cpu(p);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mu_);
    return {enabled_ ? 1 : 0, static_cast<int64_t>(cached_bytes_), static_cast<int64_t>(live_.size()),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_)};
  }

  static CachingCPUAllocator& instance() {
    static CachingCPUAllocator* pool = new CachingCPUAllocator();  // never destroyed: deleters may run late
    return *pool;
  }

 private:
  static void release(void* ptr) { instance().give_back(ptr); }

  void give_back(void* ptr) {
    if (!ptr) return;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(ptr);
      const size_t nbytes = it->second;
      live_.erase(it);
      if (enabled_ && nbytes >= kMinBytes && cached_bytes_ + nbytes <= limit_) {
        free_[nbytes].push_back(ptr);
        cached_bytes_ += nbytes;
        return;
      }
    }
    c10::free_cpu(ptr);
  }

  std::mutex mu_;
  c10::Allocator* previous_ = nullptr;
  bool enabled_ = false;
  int64_t depth_ = 0;  // nesting of enable/disable pairs
  size_t limit_ = 0, cached_bytes_ = 0;
  int64_t hits_ = 0, misses_ = 0;
  std::unordered_map<size_t, std::vector<void*>> free_;
  std::unordered_map<void*, size_t> live_;
};

std::vector<int64_t> cpu_memory_pool(bool enable, int64_t limit_bytes) {
  auto& pool = CachingCPUAllocator::instance();
  TORCH_CHECK_VALUE(limit_bytes >= 0, "limit_bytes: expected an int >= 0, got ", limit_bytes);
  if (enable) pool.enable(limit_bytes);
  else pool.disable();
  return pool.stats();
}

std::vector<int64_t> cpu_memory_pool_stats() { return CachingCPUAllocator::instance().stats(); }

}  // namespace

// Returns [enabled, cached bytes, live blocks, hits, misses]; hits and misses count since enabling.
TORCH_LIBRARY_FRAGMENT(fastddpm, m) {
  m.def("cpu_memory_pool(bool enable, int limit_bytes) -> int[]", &cpu_memory_pool);
  m.def("cpu_memory_pool_stats() -> int[]", &cpu_memory_pool_stats);
}

}  // namespace fastddpm
