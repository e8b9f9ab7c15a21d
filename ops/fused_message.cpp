// efa::message: one layer's local message passing in one pass over the edges.
//
// It equals message_passing in efa_deploy/model/local.py (the reference, also registered
// as this operator in pure torch when this library is not built): for edge e = (s -> r)
//   m   = filter[s] * (W rbf[e] + b) * envelope[e]          (3F: ds | dvv | dvs)
//   dx[r]    += ds
//   dv[r][k] += vec[s][k] * dvv + dvs * unit[e][k]
// without any E x F or E x 3 x F tensor: the radial weights W rbf + b are made by BLAS for a
// chunk of edges at a time into a scratch buffer, used and dropped. Backward saves only the
// inputs and recomputes the chunk's radial weights. First derivatives only: a double
// backward raises (training with a force loss keeps the reference path).
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>

#include "fused_autograd.h"

namespace efa {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunk = 256;  // edges whose radial weights are in the scratch at once (in L2)
constexpr const char *kNoDoubleBackward =
    "efa::message (the fused message passing used by exported models) has no second derivative; "
    "train with the reference path: efa_deploy.model.use_fused(model, False)";

struct Sizes {
  int64_t atoms, features, edges, radial;
};

Sizes check_inputs(const Tensor &filter, const Tensor &vec, const Tensor &rbf, const Tensor &weight,
                   const Tensor &bias, const Tensor &envelope, const Tensor &unit, const Tensor &sender,
                   const Tensor &receiver)
{
  TORCH_CHECK(vec.dim() == 3 && vec.size(1) == 3, "efa::message: vec must be (N, 3, F), got ", vec.sizes());
  const int64_t n = vec.size(0), f = vec.size(2);
  TORCH_CHECK(filter.dim() == 2 && filter.size(0) == n && filter.size(1) == 3 * f,
              "efa::message: filter must be (N, 3F) = (", n, ", ", 3 * f, "), got ", filter.sizes());
  TORCH_CHECK(rbf.dim() == 2, "efa::message: rbf must be (E, R), got ", rbf.sizes());
  const int64_t e = rbf.size(0), r = rbf.size(1);
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == 3 * f && weight.size(1) == r,
              "efa::message: weight must be (3F, R) = (", 3 * f, ", ", r, "), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == 3 * f, "efa::message: bias must be (3F,) = (", 3 * f, ",), got ",
              bias.sizes());
  TORCH_CHECK(envelope.dim() == 2 && envelope.size(0) == e && envelope.size(1) == 1,
              "efa::message: envelope must be (E, 1) = (", e, ", 1), got ", envelope.sizes());
  TORCH_CHECK(unit.dim() == 2 && unit.size(0) == e && unit.size(1) == 3,
              "efa::message: unit must be (E, 3) = (", e, ", 3), got ", unit.sizes());
  for (const Tensor *index : {&sender, &receiver}) {
    TORCH_CHECK(index->dim() == 1 && index->size(0) == e && index->scalar_type() == at::kLong,
                "efa::message: sender and receiver must be int64 of shape (E,) = (", e, ",), got ",
                index->scalar_type(), " ", index->sizes());
  }
  for (const Tensor *t : {&filter, &rbf, &weight, &bias, &envelope, &unit}) {
    TORCH_CHECK(t->scalar_type() == vec.scalar_type(), "efa::message: all floating inputs must have vec's dtype ",
                vec.scalar_type(), ", got ", t->scalar_type());
  }
  return {n, f, e, r};
}

// The radial weights of edges [e0, e0 + rows): W rbf + b, into the first rows of scratch.
Tensor radial_chunk(const Tensor &rbf, const Tensor &weight, const Tensor &bias, int64_t e0, int64_t rows,
                    Tensor &scratch)
{
  Tensor out = scratch.narrow(0, 0, rows);
  at::addmm_out(out, bias, rbf.narrow(0, e0, rows), weight.t());
  return out;
}

// Calls body(std::integral_constant<int64_t, FC>) with FC = f for the usual widths, else 0.
template <typename Body>
void with_feature_count(int64_t f, const Body &body)
{
  switch (f) {
    case 16: return body(std::integral_constant<int64_t, 16>{});
    case 32: return body(std::integral_constant<int64_t, 32>{});
    case 64: return body(std::integral_constant<int64_t, 64>{});
    case 128: return body(std::integral_constant<int64_t, 128>{});
    default: return body(std::integral_constant<int64_t, 0>{});
  }
}

// One edge's message into its receiver's rows. The outputs never alias the inputs (other
// tensors), which the restrict qualifiers say; a compile-time feature count FC (0: use
// f_runtime) tells the compiler that the rows' thirds do not overlap, so it vectorises.
template <typename T, int64_t FC>
inline void edge_forward(int64_t f_runtime, const T *__restrict__ fs, const T *__restrict__ vs, const T *__restrict__ w, T en,
                         const T *__restrict__ u, T *__restrict__ xr, T *__restrict__ vr)
{
  const int64_t f = FC ? FC : f_runtime;
  const T u0 = u[0], u1 = u[1], u2 = u[2];
  for (int64_t i = 0; i < f; ++i) xr[i] += fs[i] * w[i] * en;
  for (int64_t i = 0; i < f; ++i) {
    const T a = fs[f + i] * w[f + i] * en, c = fs[2 * f + i] * w[2 * f + i] * en;
    vr[i] += vs[i] * a + c * u0;
    vr[f + i] += vs[f + i] * a + c * u1;
    vr[2 * f + i] += vs[2 * f + i] * a + c * u2;
  }
}

template <typename T, int64_t FC>
void forward_edges(const Sizes &z, const Tensor &filter, const Tensor &vec, const Tensor &rbf, const Tensor &weight,
                   const Tensor &bias, const Tensor &envelope, const Tensor &unit, const Tensor &sender,
                   const Tensor &receiver, Tensor &dx, Tensor &dv)
{
  const int64_t f = z.features, n = z.atoms;
  const T *fil = filter.data_ptr<T>();
  const T *vc = vec.data_ptr<T>();
  const T *env = envelope.data_ptr<T>();
  const T *un = unit.data_ptr<T>();
  const int64_t *snd = sender.data_ptr<int64_t>();
  const int64_t *rcv = receiver.data_ptr<int64_t>();
  T *out_x = dx.data_ptr<T>();
  T *out_v = dv.data_ptr<T>();
  Tensor scratch = at::empty({std::min(kChunk, z.edges), 3 * f}, filter.options());
  for (int64_t e0 = 0; e0 < z.edges; e0 += kChunk) {
    const int64_t rows = std::min(kChunk, z.edges - e0);
    const T *rad = radial_chunk(rbf, weight, bias, e0, rows, scratch).data_ptr<T>();
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t e = e0 + k, s = snd[e], r = rcv[e];
      TORCH_CHECK(s >= 0 && s < n && r >= 0 && r < n, "efa::message: edge ", e, " joins atoms ", s, " -> ", r,
                  " but there are ", n, " atoms");
      edge_forward<T, FC>(f, fil + s * 3 * f, vc + s * 3 * f, rad + k * 3 * f, env[e], un + 3 * e, out_x + r * f,
                   out_v + r * 3 * f);
    }
  }
}

std::tuple<Tensor, Tensor> message_cpu(const Tensor &filter_in, const Tensor &vec_in, const Tensor &rbf_in,
                                       const Tensor &weight, const Tensor &bias, const Tensor &envelope_in,
                                       const Tensor &unit_in, const Tensor &sender_in, const Tensor &receiver_in)
{
  const Sizes z = check_inputs(filter_in, vec_in, rbf_in, weight, bias, envelope_in, unit_in, sender_in, receiver_in);
  const Tensor filter = filter_in.contiguous(), vec = vec_in.contiguous(), rbf = rbf_in.contiguous();
  const Tensor envelope = envelope_in.contiguous(), unit = unit_in.contiguous();
  const Tensor sender = sender_in.contiguous(), receiver = receiver_in.contiguous();
  Tensor dx = at::zeros({z.atoms, z.features}, vec.options());
  Tensor dv = at::zeros({z.atoms, 3, z.features}, vec.options());
  if (z.edges == 0) return {dx, dv};
  AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "efa::message", [&] {
    with_feature_count(z.features, [&](auto fc) {
      forward_edges<scalar_t, decltype(fc)::value>(z, filter, vec, rbf, weight, bias, envelope, unit, sender, receiver, dx, dv);
    });
  });
  return {dx, dv};
}

// Per edge: the gradients of filter and vec (scattered to the sender), of the radial
// weights (one chunk row), and the per-feature terms of the envelope and unit gradients
// (summed over features per chunk by ATen, which vectorises the reduction).
template <typename T, int64_t FC>
inline void edge_backward(int64_t f_runtime, const T *__restrict__ gxr, const T *__restrict__ gvr, const T *__restrict__ fs,
                          const T *__restrict__ vs, const T *__restrict__ w, T en, const T *__restrict__ u,
                          T *__restrict__ gfs, T *__restrict__ gvs, T *__restrict__ gwk, T *__restrict__ t)
{
  const int64_t f = FC ? FC : f_runtime;
  const T u0 = u[0], u1 = u[1], u2 = u[2];
  for (int64_t i = 0; i < f; ++i) {
    const T g_ds = gxr[i];
    const T g0 = gvr[i], g1 = gvr[f + i], g2 = gvr[2 * f + i];
    const T g_dvv = g0 * vs[i] + g1 * vs[f + i] + g2 * vs[2 * f + i];
    const T g_dvs = g0 * u0 + g1 * u1 + g2 * u2;
    const T fw_s = fs[i] * w[i], fw_v = fs[f + i] * w[f + i], fw_u = fs[2 * f + i] * w[2 * f + i];
    const T dvv = fw_v * en, dvs = fw_u * en;
    gvs[i] += g0 * dvv;
    gvs[f + i] += g1 * dvv;
    gvs[2 * f + i] += g2 * dvv;
    gfs[i] += g_ds * w[i] * en;
    gfs[f + i] += g_dvv * w[f + i] * en;
    gfs[2 * f + i] += g_dvs * w[2 * f + i] * en;
    gwk[i] = g_ds * fs[i] * en;
    gwk[f + i] = g_dvv * fs[f + i] * en;
    gwk[2 * f + i] = g_dvs * fs[2 * f + i] * en;
    t[i] = g_ds * fw_s + g_dvv * fw_v + g_dvs * fw_u;
    t[f + i] = g0 * dvs;
    t[2 * f + i] = g1 * dvs;
    t[3 * f + i] = g2 * dvs;
  }
}

template <typename T, int64_t FC>
void backward_edges(const Sizes &z, const Tensor &grad_dx, const Tensor &grad_dv, const Tensor &filter,
                    const Tensor &vec, const Tensor &rbf, const Tensor &weight, const Tensor &bias,
                    const Tensor &envelope, const Tensor &unit, const Tensor &sender, const Tensor &receiver,
                    Tensor &g_filter, Tensor &g_vec, Tensor &g_rbf, Tensor &g_weight, Tensor &g_bias,
                    Tensor &g_envelope, Tensor &g_unit)
{
  const int64_t f = z.features;
  const T *gx = grad_dx.data_ptr<T>();
  const T *gv = grad_dv.data_ptr<T>();
  const T *fil = filter.data_ptr<T>();
  const T *vc = vec.data_ptr<T>();
  const T *env = envelope.data_ptr<T>();
  const T *un = unit.data_ptr<T>();
  const int64_t *snd = sender.data_ptr<int64_t>();
  const int64_t *rcv = receiver.data_ptr<int64_t>();
  T *gf = g_filter.data_ptr<T>();
  T *gvec = g_vec.data_ptr<T>();
  const int64_t chunk = std::min(kChunk, z.edges);
  Tensor radial_scratch = at::empty({chunk, 3 * f}, filter.options());
  Tensor g_radial = at::empty({chunk, 3 * f}, filter.options());
  Tensor terms = at::empty({chunk, 4, f}, filter.options());  // envelope, unit x, y, z
  Tensor sums = at::empty({chunk, 4}, filter.options());
  const bool radial_grad = g_rbf.defined() || g_weight.defined() || g_bias.defined();
  for (int64_t e0 = 0; e0 < z.edges; e0 += kChunk) {
    const int64_t rows = std::min(kChunk, z.edges - e0);
    const T *rad = radial_chunk(rbf, weight, bias, e0, rows, radial_scratch).data_ptr<T>();
    T *gw = g_radial.data_ptr<T>();
    T *tm = terms.data_ptr<T>();
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t e = e0 + k, s = snd[e], r = rcv[e];
      edge_backward<T, FC>(f, gx + r * f, gv + r * 3 * f, fil + s * 3 * f, vc + s * 3 * f, rad + k * 3 * f, env[e],
                    un + 3 * e, gf + s * 3 * f, gvec + s * 3 * f, gw + k * 3 * f, tm + k * 4 * f);
    }
    Tensor s = sums.narrow(0, 0, rows);
    at::sum_out(s, terms.narrow(0, 0, rows), {2});
    g_envelope.narrow(0, e0, rows).copy_(s.narrow(1, 0, 1));
    g_unit.narrow(0, e0, rows).copy_(s.narrow(1, 1, 3));
    if (!radial_grad) continue;
    const Tensor gr = g_radial.narrow(0, 0, rows);
    if (g_rbf.defined()) {
      Tensor out = g_rbf.narrow(0, e0, rows);
      at::mm_out(out, gr, weight);
    }
    if (g_weight.defined()) g_weight.addmm_(gr.t(), rbf.narrow(0, e0, rows));
    if (g_bias.defined()) g_bias.add_(gr.sum(0));
  }
}

using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// Gradients of (filter, vec, rbf, weight, bias, envelope, unit); output_mask says which of
// rbf, weight, bias are wanted (the others are undefined tensors).
Grads message_backward_cpu(const Tensor &grad_dx_in, const Tensor &grad_dv_in, const Tensor &filter_in,
                           const Tensor &vec_in, const Tensor &rbf_in, const Tensor &weight, const Tensor &bias,
                           const Tensor &envelope_in, const Tensor &unit_in, const Tensor &sender_in,
                           const Tensor &receiver_in, std::array<bool, 3> output_mask)
{
  const Sizes z = check_inputs(filter_in, vec_in, rbf_in, weight, bias, envelope_in, unit_in, sender_in, receiver_in);
  const Tensor grad_dx = grad_dx_in.contiguous(), grad_dv = grad_dv_in.contiguous();
  const Tensor filter = filter_in.contiguous(), vec = vec_in.contiguous(), rbf = rbf_in.contiguous();
  const Tensor envelope = envelope_in.contiguous(), unit = unit_in.contiguous();
  const Tensor sender = sender_in.contiguous(), receiver = receiver_in.contiguous();
  Tensor g_filter = at::zeros_like(filter), g_vec = at::zeros_like(vec);
  Tensor g_envelope = at::empty_like(envelope), g_unit = at::empty_like(unit);
  Tensor g_rbf = output_mask[0] ? at::empty_like(rbf) : Tensor();
  Tensor g_weight = output_mask[1] ? at::zeros_like(weight) : Tensor();
  Tensor g_bias = output_mask[2] ? at::zeros_like(bias) : Tensor();
  if (z.edges > 0) {
    AT_DISPATCH_FLOATING_TYPES(vec.scalar_type(), "efa::message_backward", [&] {
      with_feature_count(z.features, [&](auto fc) {
        backward_edges<scalar_t, decltype(fc)::value>(z, grad_dx, grad_dv, filter, vec, rbf, weight, bias, envelope, unit, sender,
                                       receiver, g_filter, g_vec, g_rbf, g_weight, g_bias, g_envelope, g_unit);
      });
    });
  }
  return {g_filter, g_vec, g_rbf, g_weight, g_bias, g_envelope, g_unit};
}

// Shape-only kernels for meta/fake tensors (torch.export, torch.compile).
std::tuple<Tensor, Tensor> message_meta(const Tensor &filter, const Tensor &vec, const Tensor &rbf,
                                        const Tensor &weight, const Tensor &bias, const Tensor &envelope,
                                        const Tensor &unit, const Tensor &sender, const Tensor &receiver)
{
  const Sizes z = check_inputs(filter, vec, rbf, weight, bias, envelope, unit, sender, receiver);
  return {at::empty({z.atoms, z.features}, vec.options()), at::empty_like(vec)};
}

Grads message_backward_meta(const Tensor &, const Tensor &, const Tensor &filter, const Tensor &vec,
                            const Tensor &rbf, const Tensor &weight, const Tensor &bias, const Tensor &envelope,
                            const Tensor &unit, const Tensor &, const Tensor &, std::array<bool, 3> output_mask)
{
  auto maybe = [](bool wanted, const Tensor &like) { return wanted ? at::empty_like(like) : Tensor(); };
  return {at::empty_like(filter), at::empty_like(vec),      maybe(output_mask[0], rbf), maybe(output_mask[1], weight),
          maybe(output_mask[2], bias), at::empty_like(envelope), at::empty_like(unit)};
}

using ForwardSignature = std::tuple<Tensor, Tensor>(const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                                    const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                                    const Tensor &);
using BackwardSignature = Grads(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                const Tensor &, std::array<bool, 3>);

struct FusedMessage : public torch::autograd::Function<FusedMessage> {
  static variable_list forward(AutogradContext *ctx, const Tensor &filter, const Tensor &vec, const Tensor &rbf,
                               const Tensor &weight, const Tensor &bias, const Tensor &envelope, const Tensor &unit,
                               const Tensor &sender, const Tensor &receiver)
  {
    static const auto op = typed_op<ForwardSignature>("efa::message");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({filter, vec, rbf, weight, bias, envelope, unit, sender, receiver});
    auto [dx, dv] = op.call(filter, vec, rbf, weight, bias, envelope, unit, sender, receiver);
    return {dx, dv};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    static const auto op = typed_op<BackwardSignature>("efa::message_backward");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &filter = saved[0], &vec = saved[1];
    const Tensor grad_dx = grads[0].defined() ? grads[0] : at::zeros({vec.size(0), vec.size(2)}, vec.options());
    const Tensor grad_dv = grads[1].defined() ? grads[1] : at::zeros_like(vec);
    const std::array<bool, 3> mask = {ctx->needs_input_grad(2), ctx->needs_input_grad(3), ctx->needs_input_grad(4)};
    variable_list out(9);
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out[0], out[1], out[2], out[3], out[4], out[5], out[6]) =
          op.call(grad_dx, grad_dv, filter, vec, saved[2], saved[3], saved[4], saved[5], saved[6], saved[7],
                  saved[8], mask);
    }
    forbid_double_backward(kNoDoubleBackward, out, {grad_dx, grad_dv, filter, vec, saved[2], saved[3], saved[4], saved[5], saved[6]});
    return out;
  }
};

std::tuple<Tensor, Tensor> message_autograd(const Tensor &filter, const Tensor &vec, const Tensor &rbf,
                                            const Tensor &weight, const Tensor &bias, const Tensor &envelope,
                                            const Tensor &unit, const Tensor &sender, const Tensor &receiver)
{
  variable_list out = FusedMessage::apply(filter, vec, rbf, weight, bias, envelope, unit, sender, receiver);
  return {out[0], out[1]};
}
}  // namespace

// The schema must match efa_deploy/ops.py (pure-torch registration of efa::message).
TORCH_LIBRARY_FRAGMENT(efa, m)
{
  m.def("message(Tensor filter, Tensor vec, Tensor rbf, Tensor weight, Tensor bias, Tensor envelope, Tensor unit, "
        "Tensor sender, Tensor receiver) -> (Tensor, Tensor)");
  m.def("message_backward(Tensor grad_dx, Tensor grad_dv, Tensor filter, Tensor vec, Tensor rbf, Tensor weight, "
        "Tensor bias, Tensor envelope, Tensor unit, Tensor sender, Tensor receiver, bool[3] output_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(efa, CPU, m)
{
  m.impl("message", message_cpu);
  m.impl("message_backward", message_backward_cpu);
}

TORCH_LIBRARY_IMPL(efa, Meta, m)
{
  m.impl("message", message_meta);
  m.impl("message_backward", message_backward_meta);
}

TORCH_LIBRARY_IMPL(efa, Autograd, m) { m.impl("message", message_autograd); }

}  // namespace efa
