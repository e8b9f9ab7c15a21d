// Collective operators the EFA model calls from TorchScript.
//
// The model is written once and calls torch.ops.efa.global_sum / forward_ghosts /
// reverse_ghosts. In a plain Python process no backend is installed and each operator is
// the identity (a copy). Inside LAMMPS the pair style installs a backend for the duration
// of one compute() call, and the same operators become MPI_Allreduce and LAMMPS ghost
// communication. Each operator's backward is the other half of the pair (global_sum is
// self-adjoint; forward_ghosts and reverse_ghosts are adjoint to each other), so forces
// and the double backward used in training are exact.
#pragma once

#include <torch/torch.h>

namespace efa {

class CommBackend {
 public:
  virtual ~CommBackend() = default;
  // Sum `t` over all ranks, in place.
  virtual void global_sum(torch::Tensor &t) = 0;
  // Overwrite the ghost rows of `t` (N x C) with their owners' rows, in place.
  virtual void forward_ghosts(torch::Tensor &t) = 0;
  // Add the ghost rows of `t` into their owners' rows and zero the ghost rows, in place.
  virtual void reverse_ghosts(torch::Tensor &t) = 0;
};

void set_backend(CommBackend *backend);
CommBackend *current_backend();

// Installs a backend for the lifetime of the guard.
class BackendGuard {
 public:
  explicit BackendGuard(CommBackend *backend) : previous_(current_backend()) { set_backend(backend); }
  ~BackendGuard() { set_backend(previous_); }
  BackendGuard(const BackendGuard &) = delete;
  BackendGuard &operator=(const BackendGuard &) = delete;

 private:
  CommBackend *previous_;
};

}  // namespace efa

// Sets glibc's malloc policy named by EFA_DEPLOY_MALLOC (lean, keep or system), `fallback` when it is
// unset; returns 1 when a setting was applied, 0 for system or a C library without mallopt
// (malloc_policy.cpp).
extern "C" int efa_malloc_policy(const char *fallback);
// 1 when the lean policy advises transparent huge pages for large tensors (malloc_policy.cpp).
extern "C" int efa_huge_page_advice();
