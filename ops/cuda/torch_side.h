// What the torch side of every CUDA operator (edge_message_cuda.cpp, attention_cuda.cpp) needs:
// the current stream of a tensor's device, found through c10's device-guard interface (so that
// these files compile against any torch's headers), and the check that the inputs share one
// CUDA device.
#pragma once

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <torch/torch.h>

#include <initializer_list>

namespace efa {
namespace cuda {

inline void *current_stream(const torch::Tensor &t)
{
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(t.device()).native_handle();
}

inline void require_one_cuda_device(const char *op, std::initializer_list<const torch::Tensor *> tensors)
{
  const torch::Tensor &first = **tensors.begin();
  for (const torch::Tensor *t : tensors) {
    TORCH_CHECK(t->is_cuda() && t->device() == first.device(), op,
                ": every input must be on the same CUDA device, got ", t->device(), " and ", first.device());
  }
}

}  // namespace cuda
}  // namespace efa
