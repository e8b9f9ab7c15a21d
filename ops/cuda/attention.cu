// CUDA kernels of the attention stages (attention.h): one thread per row entry (atom, m, g) for
// the rows, one thread per atom for their backward; the steps are attention_steps.h's.
#include <cuda_runtime.h>

#include <cstdint>

#include "attention.h"
#include "attention_steps.h"
#include "edge_message.h"  // check_launch

namespace efa {
namespace cuda {
namespace {

constexpr int64_t kThreads = 256;

template <typename T>
__global__ void rows_kernel(AttentionArgs<T> a, int64_t start, int64_t count, T *rows)
{
  const int64_t per_atom = a.channel_count * a.direction_count;
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= count * per_atom) return;
  const int64_t k = idx / per_atom, mg = idx % per_atom;
  steps::coefficient(a, start + k, mg / a.direction_count, mg % a.direction_count, rows + k * 2 * per_atom + 2 * mg);
}

template <typename T>
__global__ void rows_backward_kernel(AttentionArgs<T> a, int64_t start, int64_t count, const T *grad_rows,
                                     T *g_channels, T *g_positions)
{
  const int64_t k = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (k >= count) return;
  steps::row_backward(a, start + k, grad_rows + k * 2 * a.channel_count * a.direction_count, g_channels, g_positions);
}

unsigned blocks_for(int64_t threads) { return static_cast<unsigned>((threads + kThreads - 1) / kThreads); }

}  // namespace

template <typename T>
void attention_rows(const AttentionArgs<T> &a, int64_t start, int64_t count, T *rows, void *stream)
{
  const int64_t threads = count * a.channel_count * a.direction_count;
  if (threads == 0) return;
  rows_kernel<T><<<blocks_for(threads), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(a, start, count, rows);
  check_launch("efa::attention rows");
}

template <typename T>
void attention_rows_backward(const AttentionArgs<T> &a, int64_t start, int64_t count, const T *grad_rows,
                             T *g_channels, T *g_positions, void *stream)
{
  if (count == 0) return;
  rows_backward_kernel<T><<<blocks_for(count), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      a, start, count, grad_rows, g_channels, g_positions);
  check_launch("efa::attention rows backward");
}

template void attention_rows<float>(const AttentionArgs<float> &, int64_t, int64_t, float *, void *);
template void attention_rows<double>(const AttentionArgs<double> &, int64_t, int64_t, double *, void *);
template void attention_rows_backward<float>(const AttentionArgs<float> &, int64_t, int64_t, const float *, float *,
                                             float *, void *);
template void attention_rows_backward<double>(const AttentionArgs<double> &, int64_t, int64_t, const double *,
                                              double *, double *, void *);

}  // namespace cuda
}  // namespace efa
