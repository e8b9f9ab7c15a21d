// CUDA kernels of efa::edge_message (edge_message.h). A block holds `rows` edges x F threads
// (threadIdx.x: the feature, threadIdx.y: the edge of the block): per edge, thread 0 makes the
// geometry (|d|, d / |d|, the cosine envelope), the edge's threads make its radial basis
// sin(n_pi r) / r together in shared memory, and each thread makes its feature's three radial
// weights W rbf + b and adds its messages to the receiver (forward) or its gradients to the
// sender (backward) with atomics. Backward recomputes everything from the inputs, as the CPU
// operator does; per-edge sums over the features (envelope, unit vector and basis gradients)
// go through shared memory, and thread 0 of the edge writes g_d. Nothing E x F is stored
// unless the caller asks for the weight gradients (g_radial, rbf).
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "edge_message.h"

namespace efa {
namespace cuda {
namespace {

constexpr int kThreadsPerBlock = 256;

__host__ __device__ inline int64_t edges_per_block(int64_t features)
{
  const int64_t rows = kThreadsPerBlock / features;
  return rows > 0 ? rows : 1;
}

// r, unit (3) and envelope of edge e into g[0..4]
template <typename T>
__device__ void edge_geometry(const T *d, int64_t e, T cutoff, T *g)
{
  const T x = d[3 * e], y = d[3 * e + 1], z = d[3 * e + 2];
  const T r = sqrt(x * x + y * y + z * z);
  g[0] = r;
  g[1] = x / r;
  g[2] = y / r;
  g[3] = z / r;
  g[4] = r < cutoff ? T(0.5) * (cos(T(M_PI) * r / cutoff) + T(1)) : T(0);
}

// The three radial weights of feature i: rows i, F + i, 2F + i of W rbf + b.
template <typename T>
__device__ void radial_weights(const EdgeMessageArgs<T> &a, const T *rbf, int64_t i, T *w)
{
  for (int q = 0; q < 3; ++q) {
    const int64_t row = q * a.features + i;
    T acc = a.bias[row];
    for (int64_t k = 0; k < a.radial; ++k) acc += a.weight[row * a.radial + k] * rbf[k];
    w[q] = acc;
  }
}

// Shared memory per edge of a block: geometry (5), basis (R) [, backward: radial-weight
// gradients (3F), feature terms (4F: envelope, unit x, y, z), basis-gradient terms (R)].
template <typename T>
__host__ __device__ inline int64_t shared_per_edge(int64_t features, int64_t radial, bool backward)
{
  return 5 + radial + (backward ? 7 * features + radial : 0);
}

// Both kernels' start: this thread row's edge e (live: e < E) gets its geometry (r, unit, envelope)
// and then its basis (R, also into rbf_out if not null) in its part of shared memory, which it
// returns; every thread of the block calls it (it synchronises the block).
template <typename T>
__device__ T *edge_setup(const EdgeMessageArgs<T> &a, T *shared, int64_t per_edge, int64_t e, bool live, T *rbf_out)
{
  T *geometry = shared + threadIdx.y * per_edge, *rbf = geometry + 5;
  if (live && threadIdx.x == 0) edge_geometry(a.d, e, a.cutoff, geometry);
  __syncthreads();
  if (live)
    for (int64_t k = threadIdx.x; k < a.radial; k += a.features) {
      rbf[k] = sin(a.n_pi[k] * geometry[0]) / geometry[0];
      if (rbf_out != nullptr) rbf_out[e * a.radial + k] = rbf[k];
    }
  __syncthreads();
  return geometry;
}

template <typename T>
__global__ void forward_kernel(EdgeMessageArgs<T> a, T *dx, T *dv)
{
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t f = a.features, i = threadIdx.x;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = e < a.edges;
  T *geometry = edge_setup(a, reinterpret_cast<T *>(shared_bytes), shared_per_edge<T>(f, a.radial, false), e, live,
                           static_cast<T *>(nullptr));
  T *rbf = geometry + 5;
  if (!live) return;
  T w[3];
  radial_weights(a, rbf, i, w);
  const int64_t s = a.sender[e], r = a.receiver[e];
  const T en = geometry[4];
  const T *fs = a.filter + s * 3 * f, *vs = a.vec + s * 3 * f;
  atomicAdd(dx + r * f + i, fs[i] * w[0] * en);
  const T along = fs[f + i] * w[1] * en, across = fs[2 * f + i] * w[2] * en;
  for (int c = 0; c < 3; ++c) atomicAdd(dv + r * 3 * f + c * f + i, vs[c * f + i] * along + across * geometry[1 + c]);
}

template <typename T>
__global__ void backward_kernel(EdgeMessageArgs<T> a, const T *grad_dx, const T *grad_dv, T *g_filter, T *g_vec,
                                T *g_d, T *g_radial, T *rbf_out)
{
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  const int64_t f = a.features, i = threadIdx.x;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  const bool live = e < a.edges;
  T *geometry = edge_setup(a, reinterpret_cast<T *>(shared_bytes), shared_per_edge<T>(f, a.radial, true), e, live,
                           rbf_out);
  T *rbf = geometry + 5, *g_rad = rbf + a.radial, *terms = g_rad + 3 * f, *basis_terms = terms + 4 * f;
  if (live) {
    T w[3];
    radial_weights(a, rbf, i, w);
    const int64_t s = a.sender[e], r = a.receiver[e];
    const T en = geometry[4], u[3] = {geometry[1], geometry[2], geometry[3]};
    const T *fs = a.filter + s * 3 * f, *vs = a.vec + s * 3 * f;
    const T g_ds = grad_dx[r * f + i];
    const T g[3] = {grad_dv[r * 3 * f + i], grad_dv[r * 3 * f + f + i], grad_dv[r * 3 * f + 2 * f + i]};
    const T g_dvv = g[0] * vs[i] + g[1] * vs[f + i] + g[2] * vs[2 * f + i];
    const T g_dvs = g[0] * u[0] + g[1] * u[1] + g[2] * u[2];
    const T fw_s = fs[i] * w[0], fw_v = fs[f + i] * w[1], fw_u = fs[2 * f + i] * w[2];
    const T dvv = fw_v * en, dvs = fw_u * en;
    for (int c = 0; c < 3; ++c) atomicAdd(g_vec + s * 3 * f + c * f + i, g[c] * dvv);
    atomicAdd(g_filter + s * 3 * f + i, g_ds * w[0] * en);
    atomicAdd(g_filter + s * 3 * f + f + i, g_dvv * w[1] * en);
    atomicAdd(g_filter + s * 3 * f + 2 * f + i, g_dvs * w[2] * en);
    const T gr[3] = {g_ds * fs[i] * en, g_dvv * fs[f + i] * en, g_dvs * fs[2 * f + i] * en};
    for (int q = 0; q < 3; ++q) {
      g_rad[q * f + i] = gr[q];
      if (g_radial != nullptr) g_radial[e * 3 * f + q * f + i] = gr[q];
    }
    terms[i] = g_ds * fw_s + g_dvv * fw_v + g_dvs * fw_u;  // d / d envelope
    for (int c = 0; c < 3; ++c) terms[(1 + c) * f + i] = g[c] * dvs;  // d / d unit_c
  }
  if (g_d == nullptr) return;  // the same for every thread of the grid: no thread waits below
  __syncthreads();
  if (live)
    for (int64_t k = i; k < a.radial; k += f) {
      // d rbf_k / dr = (n_pi cos(n_pi r) - rbf) / r, times the basis gradient sum_j g_rad_j W_jk
      T g_basis = 0;
      for (int64_t j = 0; j < 3 * f; ++j) g_basis += g_rad[j] * a.weight[j * a.radial + k];
      const T r = geometry[0], n = a.n_pi[k];
      basis_terms[k] = g_basis * (n * cos(n * r) - rbf[k]) / r;
    }
  __syncthreads();
  if (!live || i != 0) return;
  T sums[4] = {0, 0, 0, 0};
  for (int q = 0; q < 4; ++q)
    for (int64_t j = 0; j < f; ++j) sums[q] += terms[q * f + j];
  const T r = geometry[0], u[3] = {geometry[1], geometry[2], geometry[3]};
  T g_r = 0;
  for (int64_t k = 0; k < a.radial; ++k) g_r += basis_terms[k];
  if (r < a.cutoff) g_r += sums[0] * (-T(0.5) * T(M_PI) / a.cutoff) * sin(T(M_PI) * r / a.cutoff);
  const T along = sums[1] * u[0] + sums[2] * u[1] + sums[3] * u[2];
  // unit = d / r, r = |d|: d unit / d d = (I - u u^T) / r, d r / d d = u
  for (int c = 0; c < 3; ++c) g_d[3 * e + c] = (sums[1 + c] - along * u[c]) / r + g_r * u[c];
}

template <typename T>
dim3 block_shape(const EdgeMessageArgs<T> &a)
{
  return dim3(static_cast<unsigned>(a.features), static_cast<unsigned>(edges_per_block(a.features)));
}

template <typename T>
unsigned block_count(const EdgeMessageArgs<T> &a)
{
  const int64_t rows = edges_per_block(a.features);
  return static_cast<unsigned>((a.edges + rows - 1) / rows);
}

}  // namespace

template <typename T>
void edge_message_forward(const EdgeMessageArgs<T> &a, T *dx, T *dv, void *stream)
{
  if (a.edges == 0) return;
  const size_t bytes = sizeof(T) * edges_per_block(a.features) * shared_per_edge<T>(a.features, a.radial, false);
  forward_kernel<T><<<block_count(a), block_shape(a), bytes, static_cast<cudaStream_t>(stream)>>>(a, dx, dv);
}

template <typename T>
void edge_message_backward(const EdgeMessageArgs<T> &a, const T *grad_dx, const T *grad_dv, T *g_filter, T *g_vec,
                           T *g_d, T *g_radial, T *rbf, void *stream)
{
  if (a.edges == 0) return;
  const size_t bytes = sizeof(T) * edges_per_block(a.features) * shared_per_edge<T>(a.features, a.radial, true);
  backward_kernel<T><<<block_count(a), block_shape(a), bytes, static_cast<cudaStream_t>(stream)>>>(
      a, grad_dx, grad_dv, g_filter, g_vec, g_d, g_radial, rbf);
}

template void edge_message_forward<float>(const EdgeMessageArgs<float> &, float *, float *, void *);
template void edge_message_forward<double>(const EdgeMessageArgs<double> &, double *, double *, void *);
template void edge_message_backward<float>(const EdgeMessageArgs<float> &, const float *, const float *, float *,
                                           float *, float *, float *, float *, void *);
template void edge_message_backward<double>(const EdgeMessageArgs<double> &, const double *, const double *, double *,
                                            double *, double *, double *, double *, void *);

}  // namespace cuda
}  // namespace efa
