// CUDA kernels of efa::edge_message (edge_message.h). A block holds 256 / F edges x F threads
// (threadIdx.x: the feature, threadIdx.y: the block's edge); each edge has its part of shared
// memory, and the kernels run the steps of edge_message_steps.h with a block synchronisation
// between them: geometry (thread 0 of the edge), basis (the edge's threads, a function each),
// then per feature the messages (forward) or the sender's gradients and the per-edge terms
// (backward), then the basis terms and g_d (thread 0). Atomic adds scatter to the receivers /
// senders. Nothing E x F is kept unless the caller asks for the weight gradients.
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "edge_message.h"
#include "edge_message_steps.h"

namespace efa {
namespace cuda {
namespace {

constexpr int64_t kThreadsPerBlock = 256;

int64_t edges_per_block(int64_t features)
{
  return features < kThreadsPerBlock ? kThreadsPerBlock / features : 1;
}

// This thread row's edge: its part of shared memory with geometry and basis made (every thread
// of the block calls this: it synchronises the block).
template <typename T>
__device__ T *edge_setup(const EdgeMessageArgs<T> &a, T *shared, bool backward, int64_t e, bool live, T *rbf_out)
{
  T *scratch = shared + threadIdx.y * steps::scratch_per_edge(a.features, a.radial, backward);
  if (live && threadIdx.x == 0) steps::geometry_of(a, e, scratch);
  __syncthreads();
  if (live)
    for (int64_t k = threadIdx.x; k < a.radial; k += a.features) steps::basis_of(a, e, k, scratch, scratch + 5, rbf_out);
  __syncthreads();
  return scratch;
}

template <typename T>
__global__ void forward_kernel(EdgeMessageArgs<T> a, T *dx, T *dv)
{
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = e < a.edges;
  T *scratch = edge_setup(a, reinterpret_cast<T *>(shared_bytes), false, e, live, static_cast<T *>(nullptr));
  if (live) steps::forward_feature(a, e, threadIdx.x, scratch, scratch + 5, dx, dv);
}

template <typename T>
__global__ void backward_kernel(EdgeMessageArgs<T> a, const T *grad_dx, const T *grad_dv, T *g_filter, T *g_vec,
                                T *g_d, T *g_radial, T *rbf_out)
{
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t f = a.features, i = threadIdx.x;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = e < a.edges;
  T *geometry = edge_setup(a, reinterpret_cast<T *>(shared_bytes), true, e, live, rbf_out);
  T *rbf = geometry + 5, *g_rad = rbf + a.radial, *terms = g_rad + 3 * f, *basis_terms = terms + 4 * f;
  if (live) steps::backward_feature(a, e, i, geometry, rbf, grad_dx, grad_dv, g_filter, g_vec, g_rad, terms, g_radial);
  if (g_d == nullptr) return;  // the same for every thread of the grid: no thread waits below
  __syncthreads();
  if (live)
    for (int64_t k = i; k < a.radial; k += f) steps::basis_term(a, k, geometry, rbf, g_rad, basis_terms);
  __syncthreads();
  if (live && i == 0) steps::edge_gradient(a, e, geometry, terms, basis_terms, g_d);
}

template <typename T>
void launch_shape(const EdgeMessageArgs<T> &a, bool backward, dim3 &grid, dim3 &block, size_t &bytes)
{
  const int64_t rows = edges_per_block(a.features);
  grid = dim3(static_cast<unsigned>((a.edges + rows - 1) / rows));
  block = dim3(static_cast<unsigned>(a.features), static_cast<unsigned>(rows));
  bytes = sizeof(T) * rows * steps::scratch_per_edge(a.features, a.radial, backward);
}

}  // namespace

void check_launch(const char *what)
{
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA launch failed: " + cudaGetErrorString(error));
}

template <typename T>
void edge_message_forward(const EdgeMessageArgs<T> &a, T *dx, T *dv, void *stream)
{
  if (a.edges == 0) return;
  dim3 grid, block;
  size_t bytes;
  launch_shape(a, false, grid, block, bytes);
  forward_kernel<T><<<grid, block, bytes, static_cast<cudaStream_t>(stream)>>>(a, dx, dv);
  check_launch("efa::edge_message");
}

template <typename T>
void edge_message_backward(const EdgeMessageArgs<T> &a, const T *grad_dx, const T *grad_dv, T *g_filter, T *g_vec,
                           T *g_d, T *g_radial, T *rbf, void *stream)
{
  if (a.edges == 0) return;
  dim3 grid, block;
  size_t bytes;
  launch_shape(a, true, grid, block, bytes);
  backward_kernel<T><<<grid, block, bytes, static_cast<cudaStream_t>(stream)>>>(a, grad_dx, grad_dv, g_filter, g_vec,
                                                                                g_d, g_radial, rbf);
  check_launch("efa::edge_message_backward");
}

template void edge_message_forward<float>(const EdgeMessageArgs<float> &, float *, float *, void *);
template void edge_message_forward<double>(const EdgeMessageArgs<double> &, double *, double *, void *);
template void edge_message_backward<float>(const EdgeMessageArgs<float> &, const float *, const float *, float *,
                                           float *, float *, float *, float *, void *);
template void edge_message_backward<double>(const EdgeMessageArgs<double> &, const double *, const double *, double *,
                                            double *, double *, double *, double *, void *);

}  // namespace cuda
}  // namespace efa
