// Large op outputs on transparent huge pages. A fresh large block from glibc is a new mapping,
// and the first write of each 4 KiB page is a page fault; on 2 MiB pages the same block takes 512
// times fewer. Where faults are expensive (in a virtual machine they are), an op's as-called time
// was mostly its outputs' faults, not their writes (measurements: docs/performance.md#measurements-behind-the-code).
// c10 can do the same for every allocation (THP_MEM_ALLOC_ENABLE=1, read once at startup);
// this does it for the ops' own outputs only.
#include "huge_pages.h"

#include <ATen/EmptyTensor.h>
#include <c10/core/CPUAllocator.h>
#include <sys/mman.h>

#include <cstdlib>

namespace fastddpm {
namespace {

constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kMinBytes = size_t(8) << 20;  // the last huge page may be part empty: <= 25% waste

class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t nbytes) override {
    if (nbytes < kMinBytes) return c10::GetDefaultCPUAllocator()->allocate(nbytes);
    const size_t bytes = (nbytes + kHugePage - 1) / kHugePage * kHugePage;
    void* ptr = nullptr;
    TORCH_CHECK(posix_memalign(&ptr, kHugePage, bytes) == 0 && ptr, "fastddpm huge-page allocator: not enough memory: ",
                "you tried to allocate ", nbytes, " bytes.");
    madvise(ptr, bytes, MADV_HUGEPAGE);  // a hint: where THP is off the block keeps 4 KiB pages
    return {ptr, ptr, &release, c10::Device(c10::DeviceType::CPU)};
  }

  c10::DeleterFnPtr raw_deleter() const override { return nullptr; }  // two deleters: no raw one

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* ptr) { std::free(ptr); }
};

}  // namespace

at::Tensor empty_output_like(const at::Tensor& x) {
  static HugePageAllocator allocator;
  const size_t bytes = static_cast<size_t>(x.numel()) * x.element_size();
  if (bytes < kMinBytes || c10::GetCPUAllocator() != c10::GetDefaultCPUAllocator()) return at::empty_like(x);
  return at::detail::empty_strided_generic(x.sizes(), x.strides(), &allocator,
                                           c10::DispatchKeySet(c10::DispatchKey::CPU), x.scalar_type());
}

}  // namespace fastddpm
