// The CUDA kernels of efa::attention_keys / attention_queries and their backward (attention.cu),
// called by attention_cuda.cpp; plain C++ (no torch, no CUDA headers). Each stage is, per chunk of
// consecutive atoms of one structure, a kernel that makes the atoms' coefficient rows
// A[m, g] = conj(c_m e^{i omega_m (u_g . r)}) (the CPU operator's rows, ops/fused_efa.cpp) and one
// cuBLAS product with the structure's KV; backward makes the rows' gradient by cuBLAS and a kernel
// turns it into the channels' and positions' gradients.
#pragma once

#include <cstdint>

namespace efa {
namespace cuda {

template <typename T>
struct AttentionArgs {
  const T *positions;   // (N, 3)
  const T *channels;    // (N, M, 2): keys or queries
  const T *omega;       // (M,)
  const T *directions;  // (G, 3)
  int64_t channel_count, direction_count;  // M, G
};

// The rows (count, 2MG) of atoms start .. start + count - 1.
template <typename T>
void attention_rows(const AttentionArgs<T> &a, int64_t start, int64_t count, T *rows, void *stream);

// From the rows' gradient (count, 2MG): the gradients of those atoms' channels (rows of
// g_channels (N, M, 2)) and positions (rows of g_positions (N, 3)), written.
template <typename T>
void attention_rows_backward(const AttentionArgs<T> &a, int64_t start, int64_t count, const T *grad_rows,
                             T *g_channels, T *g_positions, void *stream);

// The most frequency channels the backward kernel keeps per thread.
constexpr int64_t kMaxChannels = 64;

}  // namespace cuda
}  // namespace efa
