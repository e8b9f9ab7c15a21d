// The CUDA kernels of efa::edge_message and efa::edge_message_backward (edge_message.cu), called by
// edge_message_cuda.cpp. Plain C++ (no torch, no CUDA headers), so that nvcc compiles the kernels
// and the host compiler the torch side. Semantics: ops/fused_message.cpp (the CPU operator) and
// efa_deploy/model/local.py edge_message_passing (the reference).
#pragma once

#include <cstdint>

namespace efa {
namespace cuda {

template <typename T>
struct EdgeMessageArgs {
  const T *filter;      // (N, 3F)
  const T *vec;         // (N, 3, F)
  const T *d;           // (E, 3)
  const T *n_pi;        // (R,)
  const T *weight;      // (3F, R)
  const T *bias;        // (3F,)
  const int64_t *sender, *receiver;  // (E,)
  int64_t atoms, edges, features, radial;
  T cutoff;
};

// dx (N, F) and dv (N, 3, F), zeroed by the caller, receive every edge's message (atomic adds).
template <typename T>
void edge_message_forward(const EdgeMessageArgs<T> &a, T *dx, T *dv, void *stream);

// Gradients for the upstream gradients grad_dx (N, F), grad_dv (N, 3, F): g_filter and g_vec
// (zeroed by the caller; atomic adds), g_d (E, 3) if not null (written), and where not null the
// per-edge gradients of the radial weights g_radial (E, 3F) and the basis rbf (E, R), from which
// the caller makes the weight and bias gradients.
template <typename T>
void edge_message_backward(const EdgeMessageArgs<T> &a, const T *grad_dx, const T *grad_dv, T *g_filter, T *g_vec,
                           T *g_d, T *g_radial, T *rbf, void *stream);

// The largest feature count the kernels take (one thread per feature and edge in a block; the
// backward kernel's shared memory, about 7 F values per edge, stays within the default 48 KB).
constexpr int64_t kMaxFeatures = 512;

// Throws std::runtime_error naming `what` if the last kernel launch failed (edge_message.cu).
void check_launch(const char *what);

}  // namespace cuda
}  // namespace efa
