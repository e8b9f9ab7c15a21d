// Helpers shared by the fused operators (fused_message.cpp, fused_efa.cpp): calling an
// operator through the dispatcher, and refusing a second derivative with a clear error.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/torch.h>

#include <memory>
#include <type_traits>

namespace efa {

template <typename Signature>
c10::TypedOperatorHandle<Signature> typed_op(const char *name)
{
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

// Graph nodes are held by c10::intrusive_ptr in newer torch, by std::shared_ptr in older.
template <typename NodeHandle>
NodeHandle error_node(const char *message, const torch::autograd::variable_list &used)
{
  using ErrorNode = std::conditional_t<true, torch::autograd::Error, NodeHandle>;  // dependent: one branch compiles
  if constexpr (std::is_same_v<NodeHandle, std::shared_ptr<torch::autograd::Node>>)
    return std::make_shared<ErrorNode>(message, torch::autograd::collect_next_edges(used));
  else
    return c10::make_intrusive<ErrorNode>(message, torch::autograd::collect_next_edges(used));
}

// A second derivative would need the backward's own derivative, which the fused operators do
// not have: when a backward runs with create_graph and anything it used requires grad, its
// outputs get an Error node, so differentiating them again raises `message` instead of
// silently treating them as constants.
inline void forbid_double_backward(const char *message, torch::autograd::variable_list &outputs,
                                   const torch::autograd::variable_list &used)
{
  if (!at::GradMode::is_enabled() || !torch::autograd::any_variable_requires_grad(used)) return;
  auto error = error_node<std::decay_t<decltype(std::declval<const torch::Tensor &>().grad_fn())>>(message, used);
  for (torch::Tensor &out : outputs) {
    if (out.defined()) torch::autograd::set_history(out, error);
  }
}

}  // namespace efa
