// Keeps large freed blocks inside the process (glibc malloc).
//
// By default glibc serves every block above 32 MB with its own mmap and unmaps it on free,
// so each model call at a few thousand atoms faults in hundreds of MB of fresh zero pages
// (measured: 40% of the call at 3,000 atoms). Turning mmap off and raising the trim threshold
// lets the heap keep those blocks for the next call. It runs once, when libefa_ops.so is loaded
// (by Python through efa_deploy.ops, or by the LAMMPS plugin), and can be disabled with
// EFA_DEPLOY_MALLOC=system.
#include <malloc.h>

#include <climits>
#include <cstdlib>
#include <cstring>

namespace {

struct KeepLargeBlocks {
  KeepLargeBlocks()
  {
#ifdef M_MMAP_MAX
    const char *choice = std::getenv("EFA_DEPLOY_MALLOC");
    if (choice != nullptr && std::strcmp(choice, "system") == 0) return;
    mallopt(M_MMAP_MAX, 0);
    mallopt(M_TRIM_THRESHOLD, INT_MAX);
#endif
  }
};

const KeepLargeBlocks keep_large_blocks;

}  // namespace
