// efa::edge_message and efa::edge_message_backward for CUDA tensors: the CPU operator's checks
// (message_checks.h), then the kernels of edge_message.cu on the inputs' device and its current
// stream (torch_side.h). Autograd is the CPU operator's (fused_message.cpp: its Autograd kernel
// calls these two through the dispatcher). Compiled only with EFA_CUDA (ops/CMakeLists.txt).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../message_checks.h"
#include "edge_message.h"
#include "torch_side.h"

namespace efa {
namespace {

using torch::Tensor;

// The checks every CUDA call adds to the CPU operator's: one device, features within a block,
// and (as the CPU loop checks per edge) edge ends that are atoms.
void check_cuda(const Sizes &z, std::initializer_list<const Tensor *> tensors, const Tensor &sender,
                const Tensor &receiver)
{
  cuda::require_one_cuda_device("efa::edge_message", tensors);
  TORCH_CHECK(z.features <= cuda::kMaxFeatures, "efa::edge_message on CUDA: at most ", cuda::kMaxFeatures,
              " features, got ", z.features);
  if (z.edges == 0) return;
  const auto [smallest, largest] = at::aminmax(at::cat({sender, receiver}));
  const int64_t low = smallest.item<int64_t>(), high = largest.item<int64_t>();
  TORCH_CHECK(low >= 0 && high < z.atoms, "efa::edge_message: an edge joins atom ", low < 0 ? low : high,
              " but there are ", z.atoms, " atoms");
}

template <typename T>
cuda::EdgeMessageArgs<T> args_of(const EdgeInputs &in, double cutoff)
{
  const Sizes &z = in.z;
  return {in.filter.data_ptr<T>(), in.vec.data_ptr<T>(),   in.d.data_ptr<T>(),  in.n_pi.data_ptr<T>(),
          in.weight.data_ptr<T>(), in.bias.data_ptr<T>(), in.sender.data_ptr<int64_t>(),
          in.receiver.data_ptr<int64_t>(), z.atoms, z.edges, z.features, z.radial, static_cast<T>(cutoff)};
}

std::tuple<Tensor, Tensor> edge_message_cuda(const Tensor &filter, const Tensor &vec, const Tensor &d,
                                             const Tensor &n_pi, const Tensor &weight, const Tensor &bias,
                                             const Tensor &sender, const Tensor &receiver, double cutoff)
{
  const EdgeInputs in = contiguous_edge_inputs(filter, vec, d, n_pi, weight, bias, sender, receiver);
  const Sizes &z = in.z;
  check_cuda(z, {&in.filter, &in.vec, &in.d, &in.n_pi, &in.weight, &in.bias, &in.sender, &in.receiver}, in.sender,
             in.receiver);
  const c10::DeviceGuard guard(in.vec.device());
  Tensor dx = at::zeros({z.atoms, z.features}, in.vec.options());
  Tensor dv = at::zeros({z.atoms, 3, z.features}, in.vec.options());
  AT_DISPATCH_FLOATING_TYPES(in.vec.scalar_type(), "efa::edge_message (CUDA)", [&] {
    cuda::edge_message_forward<scalar_t>(args_of<scalar_t>(in, cutoff), dx.data_ptr<scalar_t>(),
                                         dv.data_ptr<scalar_t>(), cuda::current_stream(in.vec));
  });
  return {dx, dv};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> edge_message_backward_cuda(
    const Tensor &grad_dx_in, const Tensor &grad_dv_in, const Tensor &filter, const Tensor &vec, const Tensor &d,
    const Tensor &n_pi, const Tensor &weight, const Tensor &bias, const Tensor &sender, const Tensor &receiver,
    double cutoff, std::array<bool, 3> output_mask)
{
  const EdgeInputs in = contiguous_edge_inputs(filter, vec, d, n_pi, weight, bias, sender, receiver);
  const Sizes &z = in.z;
  const Tensor grad_dx = grad_dx_in.contiguous(), grad_dv = grad_dv_in.contiguous();
  check_cuda(z, {&in.filter, &in.vec, &in.d, &in.n_pi, &in.weight, &in.bias, &in.sender, &in.receiver, &grad_dx,
                 &grad_dv},
             in.sender, in.receiver);
  const c10::DeviceGuard guard(in.vec.device());
  Tensor g_filter = at::zeros_like(in.filter), g_vec = at::zeros_like(in.vec);
  Tensor g_d = output_mask[0] ? at::zeros_like(in.d) : Tensor();
  const bool radial = output_mask[1] || output_mask[2];
  Tensor g_radial = radial ? at::empty({z.edges, 3 * z.features}, in.vec.options()) : Tensor();
  Tensor rbf = output_mask[1] ? at::empty({z.edges, z.radial}, in.vec.options()) : Tensor();
  AT_DISPATCH_FLOATING_TYPES(in.vec.scalar_type(), "efa::edge_message_backward (CUDA)", [&] {
    const auto pointer = [](Tensor &t) { return t.defined() ? t.data_ptr<scalar_t>() : nullptr; };
    cuda::edge_message_backward<scalar_t>(args_of<scalar_t>(in, cutoff), grad_dx.data_ptr<scalar_t>(),
                                          grad_dv.data_ptr<scalar_t>(), g_filter.data_ptr<scalar_t>(),
                                          g_vec.data_ptr<scalar_t>(), pointer(g_d), pointer(g_radial), pointer(rbf),
                                          cuda::current_stream(in.vec));
  });
  Tensor g_weight = output_mask[1] ? at::mm(g_radial.t(), rbf) : Tensor();
  Tensor g_bias = output_mask[2] ? g_radial.sum(0) : Tensor();
  return {g_filter, g_vec, g_d, g_weight, g_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(efa, CUDA, m)
{
  m.impl("edge_message", edge_message_cuda);
  m.impl("edge_message_backward", edge_message_backward_cuda);
}

}  // namespace efa
