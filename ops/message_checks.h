// The input checks of efa::edge_message, shared by its CPU operator (fused_message.cpp, which
// defines them) and its CUDA operator (cuda/edge_message_cuda.cpp).
#pragma once

#include <torch/torch.h>

namespace efa {

struct Sizes {
  int64_t atoms, features, edges, radial;
};

// Shapes and dtypes of efa::edge_message's inputs, with errors that name the argument.
Sizes check_edge_inputs(const torch::Tensor &filter, const torch::Tensor &vec, const torch::Tensor &d,
                        const torch::Tensor &n_pi, const torch::Tensor &weight, const torch::Tensor &bias,
                        const torch::Tensor &sender, const torch::Tensor &receiver);

// efa::edge_message's inputs, checked (check_edge_inputs) and contiguous: what each of its
// kernels, CPU and CUDA, forward and backward, reads.
struct EdgeInputs {
  Sizes z;
  torch::Tensor filter, vec, d, n_pi, weight, bias, sender, receiver;
};
EdgeInputs contiguous_edge_inputs(const torch::Tensor &filter, const torch::Tensor &vec, const torch::Tensor &d,
                                  const torch::Tensor &n_pi, const torch::Tensor &weight, const torch::Tensor &bias,
                                  const torch::Tensor &sender, const torch::Tensor &receiver);

}  // namespace efa
