// The glibc malloc policy of processes that run models (pair_style efa, Python via efa_deploy.ops).
//
// glibc's default serves a block above its mmap threshold with its own mmap and unmaps it on free,
// but raises that threshold to the size of every mmapped block it frees (up to 32 MB). After a
// model call's first large tensors are freed, the later ones therefore come from the brk heap,
// whose freed middle is neither returned to the system nor reusable for blocks of other sizes:
// the resident set grows to about twice the live tensors (measured: 39 KB/atom against a live
// peak of about 16-20 KB/atom, 3,072-atom droplet, float32; benchmarks/droplet_call.py).
//
// EFA_DEPLOY_MALLOC selects (efa_malloc_policy's argument is the default when it is unset):
//   lean   (default) a fixed mmap threshold of 256 KB: every tensor above it is mmapped and
//          returned at free, so the peak stays near the live tensors (20 KB/atom there); the
//          price is a page fault per 4 KB of such tensors in every call. Where the kernel offers
//          transparent huge pages (/sys/kernel/mm/transparent_hugepage/enabled: madvise or
//          always), torch's CPU allocator is wrapped so that the 2 MB-aligned interior of every
//          tensor of 4 MB or more is advised MADV_HUGEPAGE before its first use: one fault per
//          2 MB instead of 512 (periodic EFA on the mesh at 1e4 atoms: 13-15% faster).
//   keep   no mmap and no trimming: large freed blocks stay in the heap for the next call (no
//          page faults; the heap keeps the largest layout it ever needed: 38 KB/atom there, and
//          a process alternating very different workloads was seen to keep 17-20 GB).
//   system glibc's default, untouched.
#include "efa_ops.h"

#include <c10/core/CPUAllocator.h>
#include <malloc.h>
#include <sys/mman.h>

#include <climits>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace {
constexpr int kLeanMmapThreshold = 256 * 1024;
constexpr size_t kHugePage = size_t(2) << 20;
constexpr size_t kHugeAdvice = size_t(4) << 20;  // tensors from this size on

// torch's CPU allocator, unchanged but for the advice: the DataPtr (and so the deleter) is the
// wrapped allocator's own.
class HugePageAdvice final : public c10::Allocator {
 public:
  explicit HugePageAdvice(c10::Allocator *base) : base_(base) {}

  c10::DataPtr allocate(size_t n) override
  {
    c10::DataPtr data = base_->allocate(n);
#ifdef MADV_HUGEPAGE
    if (n >= kHugeAdvice) {
      const auto start = reinterpret_cast<uintptr_t>(data.get());
      const uintptr_t first = (start + kHugePage - 1) & ~(kHugePage - 1), last = (start + n) & ~(kHugePage - 1);
      if (last > first) madvise(reinterpret_cast<void *>(first), last - first, MADV_HUGEPAGE);
    }
#endif
    return data;
  }

  c10::DeleterFnPtr raw_deleter() const override { return base_->raw_deleter(); }

  void copy_data(void *dest, const void *src, std::size_t count) const override { base_->copy_data(dest, src, count); }

 private:
  c10::Allocator *base_;
};

bool huge_pages_offered()
{
  FILE *f = std::fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");
  if (f == nullptr) return false;
  char line[128] = {0};
  const bool read = std::fgets(line, sizeof(line), f) != nullptr;
  std::fclose(f);
  return read && (std::strstr(line, "[madvise]") != nullptr || std::strstr(line, "[always]") != nullptr);
}

// The wrapper, once per process where the kernel offers huge pages (it lives as long as the
// process), else null.
HugePageAdvice *advice = nullptr;

void advise_huge_pages()
{
  if (advice != nullptr || !huge_pages_offered()) return;
  static HugePageAdvice wrapper(c10::GetCPUAllocator());
  advice = &wrapper;
  c10::SetCPUAllocator(advice, /*priority=*/1);
}
}  // namespace

extern "C" int efa_huge_page_advice() { return advice != nullptr && c10::GetCPUAllocator() == advice ? 1 : 0; }

extern "C" int efa_malloc_policy(const char *fallback)
{
#ifdef M_MMAP_MAX
  const char *choice = std::getenv("EFA_DEPLOY_MALLOC");
  if (choice == nullptr || *choice == '\0') choice = fallback != nullptr ? fallback : "system";
  if (std::strcmp(choice, "keep") == 0) return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1;
  // a fixed threshold also stops glibc's dynamic raising of it (and of the trim threshold)
  if (std::strcmp(choice, "lean") == 0) {
    advise_huge_pages();
    return mallopt(M_MMAP_THRESHOLD, kLeanMmapThreshold) == 1;
  }
  return 0;
#else
  (void)fallback;
  return 0;
#endif
}
