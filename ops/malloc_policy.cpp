// Keeps large freed blocks inside the process (glibc malloc).
//
// By default glibc serves every block above 32 MB with its own mmap and unmaps it on free, so
// each model call at a few thousand atoms faults in hundreds of MB of fresh zero pages (measured:
// 40% of the call at 3,000 atoms). Turning mmap off and raising the trim threshold lets the heap
// keep those blocks for the next call. That suits MD, where every step has the same shapes; a
// process that alternates very different workloads keeps the largest heap it ever needed, so the
// policy is on in pair_style efa (unless EFA_DEPLOY_MALLOC=system) and opt-in for Python
// (EFA_DEPLOY_MALLOC=keep, applied by efa_deploy.ops).
#include "efa_ops.h"

#include <malloc.h>

#include <climits>
#include <cstdlib>
#include <cstring>

extern "C" int efa_keep_large_blocks()
{
#ifdef M_MMAP_MAX
  const char *choice = std::getenv("EFA_DEPLOY_MALLOC");
  if (choice != nullptr && std::strcmp(choice, "system") == 0) return 0;
  return mallopt(M_MMAP_MAX, 0) == 1 && mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1;
#else
  return 0;
#endif
}
