// The input checks of efa::attention_keys / attention_queries, shared by their CPU operators
// (fused_efa.cpp, which defines them) and their CUDA operators (cuda/attention_cuda.cpp). The
// device is each caller's to check.
#pragma once

#include <torch/torch.h>

namespace efa {

struct AttentionSizes {
  int64_t atoms, channels, directions, columns, structures;  // N, M, G, D, B
  int64_t width() const { return 2 * channels * directions; }
};

AttentionSizes check_keys(const torch::Tensor &positions, const torch::Tensor &keys, const torch::Tensor &values,
                          const torch::Tensor &owned, const torch::Tensor &batch, int64_t n_structures,
                          const torch::Tensor &omega, const torch::Tensor &directions);

AttentionSizes check_queries(const torch::Tensor &positions, const torch::Tensor &queries, const torch::Tensor &kv,
                             const torch::Tensor &batch, const torch::Tensor &omega, const torch::Tensor &directions);

}  // namespace efa
