// efa::radial_basis: the radial basis and envelope of the edge lengths r (E,), as
// efa_deploy.model.local.radial_basis (the reference, also registered as this operator in pure
// torch when this library is not built):
//   rbf[e][k]   = sin(n_pi[k] r) / r
//   envelope[e] = 0.5 (cos(pi r / cutoff) + 1) (r < cutoff)
// Backward saves only r and recomputes the sines and cosines for a chunk of edges at a time,
// so the energy + forces call keeps no E x R intermediates (the reference saves n_pi r, its
// sine and the quotient's inputs, and its backward makes several more). The chunks use the
// same ATen kernels as the reference. First derivatives only, like efa::message.
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>

#include "fused_autograd.h"

namespace efa {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunk = 512;  // edges whose E x R temporaries exist at once
constexpr const char *kNoDoubleBackward =
    "efa::radial_basis (the fused radial basis used by exported models) has no second derivative; "
    "train with the reference path: efa_deploy.model.use_fused(model, False)";

void check_inputs(const Tensor &r, const Tensor &n_pi)
{
  TORCH_CHECK(r.dim() == 1, "efa::radial_basis: r must be (E,), got ", r.sizes());
  TORCH_CHECK(n_pi.dim() == 1, "efa::radial_basis: n_pi must be (R,), got ", n_pi.sizes());
  TORCH_CHECK(n_pi.scalar_type() == r.scalar_type(), "efa::radial_basis: n_pi must have r's dtype ",
              r.scalar_type(), ", got ", n_pi.scalar_type());
}

// The envelope of all edges (E, 1): E-sized temporaries only.
Tensor envelope_of(const Tensor &r, double cutoff)
{
  const Tensor column = r.unsqueeze(1);
  return 0.5 * (at::cos(M_PI * column / cutoff) + 1.0) * column.lt(cutoff).to(r.scalar_type());
}

// sin(n_pi r) and n_pi r of edges [e0, e0 + rows) into the first rows of the scratch
// buffers, by the same vectorised ATen kernels as the reference.
void phases_chunk(const Tensor &r, const Tensor &n_pi, int64_t e0, int64_t rows, Tensor &phase, Tensor &sine)
{
  Tensor kx = phase.narrow(0, 0, rows), s = sine.narrow(0, 0, rows);
  at::mul_out(kx, n_pi, r.narrow(0, e0, rows).unsqueeze(1));
  at::sin_out(s, kx);
}

std::tuple<Tensor, Tensor> radial_basis_cpu(const Tensor &r_in, const Tensor &n_pi_in, double cutoff)
{
  check_inputs(r_in, n_pi_in);
  const Tensor r = r_in.contiguous(), n_pi = n_pi_in.contiguous();
  const int64_t e = r.size(0), nr = n_pi.size(0), chunk = std::min(kChunk, e);
  Tensor rbf = at::empty({e, nr}, r.options());
  Tensor phase = at::empty({chunk, nr}, r.options()), sine = at::empty({chunk, nr}, r.options());
  for (int64_t e0 = 0; e0 < e; e0 += kChunk) {
    const int64_t rows = std::min(kChunk, e - e0);
    phases_chunk(r, n_pi, e0, rows, phase, sine);
    Tensor out = rbf.narrow(0, e0, rows);
    at::div_out(out, sine.narrow(0, 0, rows), r.narrow(0, e0, rows).unsqueeze(1));
  }
  return {rbf, envelope_of(r, cutoff)};
}

// d rbf / dr = (n_pi cos(n_pi r) - sin(n_pi r) / r) / r; d envelope / dr = -pi/(2 rc) sin(pi r / rc).
Tensor radial_basis_backward_cpu(const Tensor &grad_rbf_in, const Tensor &grad_envelope_in, const Tensor &r_in,
                                 const Tensor &n_pi_in, double cutoff)
{
  check_inputs(r_in, n_pi_in);
  const Tensor r = r_in.contiguous(), n_pi = n_pi_in.contiguous();
  const int64_t e = r.size(0), nr = n_pi.size(0), chunk = std::min(kChunk, e);
  TORCH_CHECK(grad_rbf_in.sizes() == at::IntArrayRef({e, nr}) && grad_envelope_in.sizes() == at::IntArrayRef({e, 1}),
              "efa::radial_basis_backward: gradients must be (E, R) and (E, 1)");
  const Tensor column = r.unsqueeze(1);
  const Tensor slope = (-0.5 * M_PI / cutoff) * at::sin(M_PI * column / cutoff) * column.lt(cutoff).to(r.scalar_type());
  Tensor grad_r = (grad_envelope_in * slope).squeeze(1);
  Tensor phase = at::empty({chunk, nr}, r.options()), sine = at::empty({chunk, nr}, r.options());
  Tensor sums = at::empty({chunk}, r.options());
  for (int64_t e0 = 0; e0 < e; e0 += kChunk) {
    const int64_t rows = std::min(kChunk, e - e0);
    phases_chunk(r, n_pi, e0, rows, phase, sine);
    const Tensor rr = r.narrow(0, e0, rows).unsqueeze(1);
    Tensor kx = phase.narrow(0, 0, rows), s = sine.narrow(0, 0, rows);
    kx.cos_().mul_(n_pi).sub_(s.div_(rr)).div_(rr).mul_(grad_rbf_in.narrow(0, e0, rows));
    Tensor out = sums.narrow(0, 0, rows);
    at::sum_out(out, kx, {1});
    grad_r.narrow(0, e0, rows).add_(out);
  }
  return grad_r;
}

std::tuple<Tensor, Tensor> radial_basis_meta(const Tensor &r, const Tensor &n_pi, double)
{
  check_inputs(r, n_pi);
  return {at::empty({r.size(0), n_pi.size(0)}, r.options()), at::empty({r.size(0), 1}, r.options())};
}

Tensor radial_basis_backward_meta(const Tensor &, const Tensor &, const Tensor &r, const Tensor &, double)
{
  return at::empty_like(r);
}

using ForwardSignature = std::tuple<Tensor, Tensor>(const Tensor &, const Tensor &, double);
using BackwardSignature = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, double);

struct FusedRadialBasis : public torch::autograd::Function<FusedRadialBasis> {
  static variable_list forward(AutogradContext *ctx, const Tensor &r, const Tensor &n_pi, double cutoff)
  {
    static const auto op = typed_op<ForwardSignature>("efa::radial_basis");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({r, n_pi});
    ctx->saved_data["cutoff"] = cutoff;
    auto [rbf, envelope] = op.call(r, n_pi, cutoff);
    return {rbf, envelope};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    static const auto op = typed_op<BackwardSignature>("efa::radial_basis_backward");
    TORCH_CHECK(!ctx->needs_input_grad(1), "efa::radial_basis: no gradient with respect to n_pi (a fixed buffer)");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &r = saved[0], &n_pi = saved[1];
    const Tensor g_rbf = grads[0].defined() ? grads[0] : at::zeros({r.size(0), n_pi.size(0)}, r.options());
    const Tensor g_env = grads[1].defined() ? grads[1] : at::zeros({r.size(0), 1}, r.options());
    variable_list out(3);
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      out[0] = op.call(g_rbf, g_env, r, n_pi, ctx->saved_data["cutoff"].toDouble());
    }
    forbid_double_backward(kNoDoubleBackward, out, {g_rbf, g_env, r});
    return out;
  }
};

std::tuple<Tensor, Tensor> radial_basis_autograd(const Tensor &r, const Tensor &n_pi, double cutoff)
{
  variable_list out = FusedRadialBasis::apply(r, n_pi, cutoff);
  return {out[0], out[1]};
}
}  // namespace

// The schema must match efa_deploy/ops.py (RADIAL_SCHEMA, the pure-torch registration).
TORCH_LIBRARY_FRAGMENT(efa, m)
{
  m.def("radial_basis(Tensor r, Tensor n_pi, float cutoff) -> (Tensor, Tensor)");
  m.def("radial_basis_backward(Tensor grad_rbf, Tensor grad_envelope, Tensor r, Tensor n_pi, float cutoff) -> Tensor");
}

TORCH_LIBRARY_IMPL(efa, CPU, m)
{
  m.impl("radial_basis", radial_basis_cpu);
  m.impl("radial_basis_backward", radial_basis_backward_cpu);
}

TORCH_LIBRARY_IMPL(efa, Meta, m)
{
  m.impl("radial_basis", radial_basis_meta);
  m.impl("radial_basis_backward", radial_basis_backward_meta);
}

TORCH_LIBRARY_IMPL(efa, Autograd, m) { m.impl("radial_basis", radial_basis_autograd); }

}  // namespace efa
