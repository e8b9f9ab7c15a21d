#include "efa_ops.h"

#include <torch/library.h>

namespace efa {

namespace {
CommBackend *g_backend = nullptr;

using torch::autograd::AutogradContext;
using torch::autograd::tensor_list;

torch::Tensor apply_in_place(const torch::Tensor &x, void (CommBackend::*op)(torch::Tensor &)) {
  torch::Tensor out = x.clone();
  if (g_backend != nullptr) (g_backend->*op)(out);
  return out;
}

struct GlobalSum : public torch::autograd::Function<GlobalSum> {
  static torch::Tensor forward(AutogradContext *, const torch::Tensor &x) {
    return apply_in_place(x, &CommBackend::global_sum);
  }
  static tensor_list backward(AutogradContext *, tensor_list grads) {
    return {GlobalSum::apply(grads[0])};
  }
};

struct ReverseGhosts;

struct ForwardGhosts : public torch::autograd::Function<ForwardGhosts> {
  static torch::Tensor forward(AutogradContext *, const torch::Tensor &x) {
    return apply_in_place(x, &CommBackend::forward_ghosts);
  }
  static tensor_list backward(AutogradContext *, tensor_list grads);
};

struct ReverseGhosts : public torch::autograd::Function<ReverseGhosts> {
  static torch::Tensor forward(AutogradContext *, const torch::Tensor &x) {
    return apply_in_place(x, &CommBackend::reverse_ghosts);
  }
  static tensor_list backward(AutogradContext *, tensor_list grads) {
    return {ForwardGhosts::apply(grads[0])};
  }
};

tensor_list ForwardGhosts::backward(AutogradContext *, tensor_list grads) {
  return {ReverseGhosts::apply(grads[0])};
}

torch::Tensor global_sum(const torch::Tensor &x) { return GlobalSum::apply(x); }
torch::Tensor forward_ghosts(const torch::Tensor &x) { return ForwardGhosts::apply(x); }
torch::Tensor reverse_ghosts(const torch::Tensor &x) { return ReverseGhosts::apply(x); }
}  // namespace

void set_backend(CommBackend *backend) { g_backend = backend; }
CommBackend *current_backend() { return g_backend; }

TORCH_LIBRARY(efa, m) {
  m.def("global_sum(Tensor x) -> Tensor", &global_sum);
  m.def("forward_ghosts(Tensor x) -> Tensor", &forward_ghosts);
  m.def("reverse_ghosts(Tensor x) -> Tensor", &reverse_ghosts);
}

}  // namespace efa
