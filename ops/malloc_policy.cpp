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
//          price is a page fault per 4 KB of such tensors in every call (about 10% of the call).
//   keep   no mmap and no trimming: large freed blocks stay in the heap for the next call (no
//          page faults; the heap keeps the largest layout it ever needed: 38 KB/atom there, and
//          a process alternating very different workloads was seen to keep 17-20 GB).
//   system glibc's default, untouched.
#include "efa_ops.h"

#include <malloc.h>

#include <climits>
#include <cstdlib>
#include <cstring>

namespace {
constexpr int kLeanMmapThreshold = 256 * 1024;
}

extern "C" int efa_malloc_policy(const char *fallback)
{
#ifdef M_MMAP_MAX
  const char *choice = std::getenv("EFA_DEPLOY_MALLOC");
  if (choice == nullptr || *choice == '\0') choice = fallback != nullptr ? fallback : "system";
  if (std::strcmp(choice, "keep") == 0) return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1;
  // a fixed threshold also stops glibc's dynamic raising of it (and of the trim threshold)
  if (std::strcmp(choice, "lean") == 0) return mallopt(M_MMAP_THRESHOLD, kLeanMmapThreshold) == 1;
  return 0;
#else
  (void)fallback;
  return 0;
#endif
}
