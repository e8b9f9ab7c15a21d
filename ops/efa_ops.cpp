#include "efa_ops.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace efa {

namespace {
CommBackend *g_backend = nullptr;

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;
using Op = c10::TypedOperatorHandle<torch::Tensor(const torch::Tensor &)>;

// The backend kernels (below autograd): a copy, which the installed backend turns into a
// collective in place.
torch::Tensor apply_in_place(const torch::Tensor &x, void (CommBackend::*op)(torch::Tensor &))
{
  torch::Tensor out = x.clone();
  if (g_backend != nullptr) (g_backend->*op)(out);
  return out;
}
torch::Tensor global_sum_kernel(const torch::Tensor &x) { return apply_in_place(x, &CommBackend::global_sum); }
torch::Tensor forward_ghosts_kernel(const torch::Tensor &x) { return apply_in_place(x, &CommBackend::forward_ghosts); }
torch::Tensor reverse_ghosts_kernel(const torch::Tensor &x) { return apply_in_place(x, &CommBackend::reverse_ghosts); }

// Shape-only kernel for meta/fake tensors (torch.export, torch.compile).
torch::Tensor same_shape(const torch::Tensor &x) { return torch::empty_like(x); }

Op op(const char *name)
{
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<torch::Tensor(const torch::Tensor &)>();
}

// Autograd: each operator's adjoint is another operator of the set, called through the
// dispatcher so that double backward (force training) is differentiable too.
template <const char *Name, const char *Adjoint>
struct Collective : public torch::autograd::Function<Collective<Name, Adjoint>> {
  static torch::Tensor forward(AutogradContext *, const torch::Tensor &x)
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    static const Op self = op(Name);
    return self.call(x);
  }
  static tensor_list backward(AutogradContext *, tensor_list grads)
  {
    static const Op adjoint = op(Adjoint);
    return {adjoint.call(grads[0])};
  }
};

constexpr char kGlobalSum[] = "efa::global_sum";
constexpr char kForwardGhosts[] = "efa::forward_ghosts";
constexpr char kReverseGhosts[] = "efa::reverse_ghosts";

torch::Tensor global_sum_autograd(const torch::Tensor &x) { return Collective<kGlobalSum, kGlobalSum>::apply(x); }
torch::Tensor forward_ghosts_autograd(const torch::Tensor &x)
{
  return Collective<kForwardGhosts, kReverseGhosts>::apply(x);
}
torch::Tensor reverse_ghosts_autograd(const torch::Tensor &x)
{
  return Collective<kReverseGhosts, kForwardGhosts>::apply(x);
}
}  // namespace

// Whether the fused operators have CUDA kernels for t: t is a CUDA tensor and this library was
// built with EFA_CUDA (ops/cuda/). The model code runs the fused operators on CUDA tensors only
// then. (The tensor argument also keeps TorchScript from folding the answer into a model file.)
bool cuda_kernels(const torch::Tensor &t)
{
#ifdef EFA_CUDA_KERNELS
  return t.is_cuda();
#else
  (void)t;
  return false;
#endif
}

void set_backend(CommBackend *backend) { g_backend = backend; }
CommBackend *current_backend() { return g_backend; }

// The schemas here must match efa_deploy/ops.py, which registers the same operators in pure
// torch when this library is not built.
TORCH_LIBRARY(efa, m)
{
  m.def("global_sum(Tensor x) -> Tensor");
  m.def("forward_ghosts(Tensor x) -> Tensor");
  m.def("reverse_ghosts(Tensor x) -> Tensor");
  m.def("cuda_kernels(Tensor t) -> bool", &cuda_kernels);
}

TORCH_LIBRARY_IMPL(efa, CPU, m)
{
  m.impl("global_sum", global_sum_kernel);
  m.impl("forward_ghosts", forward_ghosts_kernel);
  m.impl("reverse_ghosts", reverse_ghosts_kernel);
}

TORCH_LIBRARY_IMPL(efa, CUDA, m)
{
  m.impl("global_sum", global_sum_kernel);
  m.impl("forward_ghosts", forward_ghosts_kernel);
  m.impl("reverse_ghosts", reverse_ghosts_kernel);
}

TORCH_LIBRARY_IMPL(efa, Meta, m)
{
  m.impl("global_sum", same_shape);
  m.impl("forward_ghosts", same_shape);
  m.impl("reverse_ghosts", same_shape);
}

TORCH_LIBRARY_IMPL(efa, Autograd, m)
{
  m.impl("global_sum", global_sum_autograd);
  m.impl("forward_ghosts", forward_ghosts_autograd);
  m.impl("reverse_ghosts", reverse_ghosts_autograd);
}

}  // namespace efa
