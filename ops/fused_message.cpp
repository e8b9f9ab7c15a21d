// efa::message and efa::edge_message: one layer's local message passing in one pass over the edges.
//
// efa::message equals message_passing in efa_deploy/model/local.py (the reference, also
// registered as this operator in pure torch when this library is not built): for edge e = (s -> r)
//   m   = filter[s] * (W rbf[e] + b) * envelope[e]          (3F: ds | dvv | dvs)
//   dx[r]    += ds
//   dv[r][k] += vec[s][k] * dvv + dvs * unit[e][k]
// without any E x F or E x 3 x F tensor: the radial weights W rbf + b are made by BLAS for a
// chunk of edges at a time into a scratch buffer, used and dropped. Backward saves only the
// inputs and recomputes the chunk's radial weights. First derivatives only: a double
// backward raises (training with a force loss keeps the reference path).
//
// efa::edge_message (what exported files call since format version 3's second revision; the
// reference is local.edge_message_passing) takes the edge vectors d (E, 3) instead of rbf,
// envelope and unit, and makes r = |d|, unit = d / r, the radial basis sin(n_pi r) / r and the
// envelope for each chunk of edges itself, forward and again in backward: no E x R tensor (nor
// its gradient) exists, and autograd keeps only d of the edge geometry. efa::message stays for
// the files exported before it.
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <initializer_list>

#include "fused_autograd.h"
#include "message_checks.h"

namespace efa {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kChunk = 256;  // edges whose radial weights are in the scratch at once (in L2)
constexpr const char *kNoDoubleBackward =
    "efa::message (the fused message passing used by exported models) has no second derivative; "
    "train with the reference path: efa_deploy.model.use_fused(model, False)";

// The checks both operators share: e edges, r radial functions; `floats` must have vec's dtype.
Sizes check_layer(const char *op, const Tensor &filter, const Tensor &vec, int64_t e, int64_t r, const Tensor &weight,
                  const Tensor &bias, const Tensor &sender, const Tensor &receiver,
                  std::initializer_list<const Tensor *> floats)
{
  TORCH_CHECK(vec.dim() == 3 && vec.size(1) == 3, op, ": vec must be (N, 3, F), got ", vec.sizes());
  const int64_t n = vec.size(0), f = vec.size(2);
  TORCH_CHECK(filter.dim() == 2 && filter.size(0) == n && filter.size(1) == 3 * f, op, ": filter must be (N, 3F) = (",
              n, ", ", 3 * f, "), got ", filter.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == 3 * f && weight.size(1) == r, op, ": weight must be (3F, R) = (",
              3 * f, ", ", r, "), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == 3 * f, op, ": bias must be (3F,) = (", 3 * f, ",), got ",
              bias.sizes());
  for (const Tensor *index : {&sender, &receiver}) {
    TORCH_CHECK(index->dim() == 1 && index->size(0) == e && index->scalar_type() == at::kLong, op,
                ": sender and receiver must be int64 of shape (E,) = (", e, ",), got ", index->scalar_type(), " ",
                index->sizes());
  }
  for (const Tensor *t : floats) {
    TORCH_CHECK(t->scalar_type() == vec.scalar_type(), op, ": all floating inputs must have vec's dtype ",
                vec.scalar_type(), ", got ", t->scalar_type());
  }
  return {n, f, e, r};
}

Sizes check_inputs(const Tensor &filter, const Tensor &vec, const Tensor &rbf, const Tensor &weight,
                   const Tensor &bias, const Tensor &envelope, const Tensor &unit, const Tensor &sender,
                   const Tensor &receiver)
{
  TORCH_CHECK(rbf.dim() == 2, "efa::message: rbf must be (E, R), got ", rbf.sizes());
  const int64_t e = rbf.size(0);
  TORCH_CHECK(envelope.dim() == 2 && envelope.size(0) == e && envelope.size(1) == 1,
              "efa::message: envelope must be (E, 1) = (", e, ", 1), got ", envelope.sizes());
  TORCH_CHECK(unit.dim() == 2 && unit.size(0) == e && unit.size(1) == 3,
              "efa::message: unit must be (E, 3) = (", e, ", 3), got ", unit.sizes());
  return check_layer("efa::message", filter, vec, e, rbf.size(1), weight, bias, sender, receiver,
                     {&filter, &rbf, &weight, &bias, &envelope, &unit});
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

// The edges' per-chunk inputs to edge_forward / edge_backward: row k of the chunk is edge e0 + k.
template <typename T>
struct EdgeChunk {
  const T *radial;    // (rows, 3F): W rbf + b
  const T *envelope;  // (rows,)
  const T *unit;      // (rows, 3)
};

// The scatter loop shared by both operators; chunk(e0, rows) makes a chunk's EdgeChunk.
template <typename T, int64_t FC, typename Chunk>
void forward_edges(const char *op, const Sizes &z, const Tensor &filter, const Tensor &vec, const Tensor &sender,
                   const Tensor &receiver, Tensor &dx, Tensor &dv, const Chunk &chunk)
{
  const int64_t f = z.features, n = z.atoms;
  const T *fil = filter.data_ptr<T>();
  const T *vc = vec.data_ptr<T>();
  const int64_t *snd = sender.data_ptr<int64_t>();
  const int64_t *rcv = receiver.data_ptr<int64_t>();
  T *out_x = dx.data_ptr<T>();
  T *out_v = dv.data_ptr<T>();
  for (int64_t e0 = 0; e0 < z.edges; e0 += kChunk) {
    const int64_t rows = std::min(kChunk, z.edges - e0);
    const EdgeChunk<T> c = chunk(e0, rows);
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t e = e0 + k, s = snd[e], r = rcv[e];
      TORCH_CHECK(s >= 0 && s < n && r >= 0 && r < n, op, ": edge ", e, " joins atoms ", s, " -> ", r,
                  " but there are ", n, " atoms");
      edge_forward<T, FC>(f, fil + s * 3 * f, vc + s * 3 * f, c.radial + k * 3 * f, c.envelope[k], c.unit + 3 * k,
                          out_x + r * f, out_v + r * 3 * f);
    }
  }
}

template <typename T, int64_t FC>
void message_forward_edges(const Sizes &z, const Tensor &filter, const Tensor &vec, const Tensor &rbf,
                           const Tensor &weight, const Tensor &bias, const Tensor &envelope, const Tensor &unit,
                           const Tensor &sender, const Tensor &receiver, Tensor &dx, Tensor &dv)
{
  const T *env = envelope.data_ptr<T>();
  const T *un = unit.data_ptr<T>();
  Tensor scratch = at::empty({std::min(kChunk, z.edges), 3 * z.features}, filter.options());
  forward_edges<T, FC>("efa::message", z, filter, vec, sender, receiver, dx, dv, [&](int64_t e0, int64_t rows) {
    return EdgeChunk<T>{radial_chunk(rbf, weight, bias, e0, rows, scratch).data_ptr<T>(), env + e0, un + 3 * e0};
  });
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
      message_forward_edges<scalar_t, decltype(fc)::value>(z, filter, vec, rbf, weight, bias, envelope, unit, sender,
                                                              receiver, dx, dv);
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

// The gradient loop shared by both operators: per chunk, chunk(e0, rows) makes its EdgeChunk, the
// edges' gradients of filter and vec are scattered to the senders, and finish(e0, rows, g_radial,
// sums) takes the chunk's gradients of the radial weights (rows, 3F) and of the envelope and the
// unit vectors (rows, 4: envelope, unit x, y, z).
template <typename T, int64_t FC, typename Chunk, typename Finish>
void backward_edges(const Sizes &z, const Tensor &grad_dx, const Tensor &grad_dv, const Tensor &filter,
                    const Tensor &vec, const Tensor &sender, const Tensor &receiver, Tensor &g_filter, Tensor &g_vec,
                    const Chunk &chunk, const Finish &finish)
{
  const int64_t f = z.features;
  const T *gx = grad_dx.data_ptr<T>();
  const T *gv = grad_dv.data_ptr<T>();
  const T *fil = filter.data_ptr<T>();
  const T *vc = vec.data_ptr<T>();
  const int64_t *snd = sender.data_ptr<int64_t>();
  const int64_t *rcv = receiver.data_ptr<int64_t>();
  T *gf = g_filter.data_ptr<T>();
  T *gvec = g_vec.data_ptr<T>();
  const int64_t rows_max = std::min(kChunk, z.edges);
  Tensor g_radial = at::empty({rows_max, 3 * f}, filter.options());
  Tensor terms = at::empty({rows_max, 4, f}, filter.options());  // envelope, unit x, y, z
  Tensor sums = at::empty({rows_max, 4}, filter.options());
  for (int64_t e0 = 0; e0 < z.edges; e0 += kChunk) {
    const int64_t rows = std::min(kChunk, z.edges - e0);
    const EdgeChunk<T> c = chunk(e0, rows);
    T *gw = g_radial.data_ptr<T>();
    T *tm = terms.data_ptr<T>();
    for (int64_t k = 0; k < rows; ++k) {
      const int64_t e = e0 + k, s = snd[e], r = rcv[e];
      edge_backward<T, FC>(f, gx + r * f, gv + r * 3 * f, fil + s * 3 * f, vc + s * 3 * f, c.radial + k * 3 * f,
                           c.envelope[k], c.unit + 3 * k, gf + s * 3 * f, gvec + s * 3 * f, gw + k * 3 * f,
                           tm + k * 4 * f);
    }
    Tensor s = sums.narrow(0, 0, rows);
    at::sum_out(s, terms.narrow(0, 0, rows), {2});
    finish(e0, rows, g_radial.narrow(0, 0, rows), s);
  }
}

template <typename T, int64_t FC>
void message_backward_edges(const Sizes &z, const Tensor &grad_dx, const Tensor &grad_dv, const Tensor &filter,
                            const Tensor &vec, const Tensor &rbf, const Tensor &weight, const Tensor &bias,
                            const Tensor &envelope, const Tensor &unit, const Tensor &sender, const Tensor &receiver,
                            Tensor &g_filter, Tensor &g_vec, Tensor &g_rbf, Tensor &g_weight, Tensor &g_bias,
                            Tensor &g_envelope, Tensor &g_unit)
{
  const T *env = envelope.data_ptr<T>();
  const T *un = unit.data_ptr<T>();
  Tensor radial_scratch = at::empty({std::min(kChunk, z.edges), 3 * z.features}, filter.options());
  const auto chunk = [&](int64_t e0, int64_t rows) {
    return EdgeChunk<T>{radial_chunk(rbf, weight, bias, e0, rows, radial_scratch).data_ptr<T>(), env + e0,
                        un + 3 * e0};
  };
  const auto finish = [&](int64_t e0, int64_t rows, const Tensor &gr, const Tensor &s) {
    g_envelope.narrow(0, e0, rows).copy_(s.narrow(1, 0, 1));
    g_unit.narrow(0, e0, rows).copy_(s.narrow(1, 1, 3));
    if (g_rbf.defined()) {
      Tensor out = g_rbf.narrow(0, e0, rows);
      at::mm_out(out, gr, weight);
    }
    if (g_weight.defined()) g_weight.addmm_(gr.t(), rbf.narrow(0, e0, rows));
    if (g_bias.defined()) g_bias.add_(gr.sum(0));
  };
  backward_edges<T, FC>(z, grad_dx, grad_dv, filter, vec, sender, receiver, g_filter, g_vec, chunk, finish);
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
        message_backward_edges<scalar_t, decltype(fc)::value>(z, grad_dx, grad_dv, filter, vec, rbf, weight, bias, envelope,
                                                               unit, sender, receiver, g_filter, g_vec, g_rbf, g_weight,
                                                               g_bias, g_envelope, g_unit);
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

// ---- efa::edge_message: the same layer from the edge vectors d ------------------------------

constexpr const char *kEdgeNoDoubleBackward =
    "efa::edge_message (the fused message passing used by exported models) has no second derivative; "
    "train with the reference path: efa_deploy.model.use_fused(model, False)";


// A chunk's edge geometry, made from d as the reference does (EnergyModel.edge_geometry,
// local.radial_basis): r = |d|, unit = d / r, envelope 0.5 (cos(pi r / rc) + 1) (r < rc), the
// basis sin(n_pi r) / r by the same ATen kernels, and the radial weights W rbf + b; scratch
// buffers of kChunk rows, reused by every chunk.
template <typename T>
struct Geometry {
  const T *d;
  const Tensor &n_pi, &weight, &bias;
  const T cutoff;
  Tensor r, unit, envelope, phase, rbf, radial;

  Geometry(const Tensor &d_in, const Tensor &n_pi_in, const Tensor &weight_in, const Tensor &bias_in, double cutoff_in,
           int64_t rows_max)
      : d(d_in.data_ptr<T>()), n_pi(n_pi_in), weight(weight_in), bias(bias_in), cutoff(static_cast<T>(cutoff_in)),
        r(at::empty({rows_max, 1}, d_in.options())), unit(at::empty({rows_max, 3}, d_in.options())),
        envelope(at::empty({rows_max}, d_in.options())), phase(at::empty({rows_max, n_pi_in.size(0)}, d_in.options())),
        rbf(at::empty({rows_max, n_pi_in.size(0)}, d_in.options())),
        radial(at::empty({rows_max, weight_in.size(0)}, d_in.options()))
  {
  }

  EdgeChunk<T> make(int64_t e0, int64_t rows)
  {
    T *rr = r.data_ptr<T>(), *u = unit.data_ptr<T>(), *env = envelope.data_ptr<T>();
    const T pi = static_cast<T>(M_PI);
    for (int64_t k = 0; k < rows; ++k) {
      const T *dk = d + 3 * (e0 + k);
      const T length = std::sqrt(dk[0] * dk[0] + dk[1] * dk[1] + dk[2] * dk[2]);
      rr[k] = length;
      for (int c = 0; c < 3; ++c) u[3 * k + c] = dk[c] / length;
      env[k] = length < cutoff ? T(0.5) * (std::cos(pi * length / cutoff) + T(1)) : T(0);
    }
    const Tensor column = r.narrow(0, 0, rows);
    Tensor kx = phase.narrow(0, 0, rows), basis = rbf.narrow(0, 0, rows);
    at::mul_out(kx, n_pi, column);
    at::sin_out(basis, kx);
    basis.div_(column);
    return {radial_chunk(rbf, weight, bias, 0, rows, radial).data_ptr<T>(), env, u};
  }

  // d of the chunk's edges from the gradients of their radial weights (rows, 3F) and of their
  // envelope and unit vectors (rows, 4), into g_d rows [e0, e0 + rows); uses the chunk make() made.
  void backward(int64_t e0, int64_t rows, const Tensor &g_radial, const Tensor &g_env_unit, Tensor &g_basis,
                Tensor &g_length, T *g_d) const
  {
    const Tensor column = r.narrow(0, 0, rows), basis = rbf.narrow(0, 0, rows);
    Tensor gb = g_basis.narrow(0, 0, rows), gl = g_length.narrow(0, 0, rows), kx = phase.narrow(0, 0, rows);
    at::mm_out(gb, g_radial, weight);
    // d rbf / dr = (n_pi cos(n_pi r) - rbf) / r
    kx.cos_().mul_(n_pi).sub_(basis).div_(column).mul_(gb);
    at::sum_out(gl, kx, {1});
    const T *rr = r.data_ptr<T>(), *u = unit.data_ptr<T>(), *gs = g_env_unit.data_ptr<T>(), *gr = gl.data_ptr<T>();
    const T pi = static_cast<T>(M_PI), slope = -T(0.5) * pi / cutoff;
    for (int64_t k = 0; k < rows; ++k) {
      const T length = rr[k], *uk = u + 3 * k, *gk = gs + 4 * k;
      const T g_r = gr[k] + (length < cutoff ? gk[0] * slope * std::sin(pi * length / cutoff) : T(0));
      const T along = gk[1] * uk[0] + gk[2] * uk[1] + gk[3] * uk[2];
      // unit = d / r, r = |d|: d unit / d d = (I - u u^T) / r, d r / d d = u
      for (int c = 0; c < 3; ++c) g_d[3 * (e0 + k) + c] = (gk[1 + c] - along * uk[c]) / length + g_r * uk[c];
    }
  }
};

std::tuple<Tensor, Tensor> edge_message_cpu(const Tensor &filter, const Tensor &vec, const Tensor &d,
                                            const Tensor &n_pi, const Tensor &weight, const Tensor &bias,
                                            const Tensor &sender, const Tensor &receiver, double cutoff)
{
  const EdgeInputs in = contiguous_edge_inputs(filter, vec, d, n_pi, weight, bias, sender, receiver);
  const Sizes &z = in.z;
  Tensor dx = at::zeros({z.atoms, z.features}, in.vec.options());
  Tensor dv = at::zeros({z.atoms, 3, z.features}, in.vec.options());
  if (z.edges == 0) return {dx, dv};
  AT_DISPATCH_FLOATING_TYPES(in.vec.scalar_type(), "efa::edge_message", [&] {
    Geometry<scalar_t> geometry(in.d, in.n_pi, in.weight, in.bias, cutoff, std::min(kChunk, z.edges));
    with_feature_count(z.features, [&](auto fc) {
      forward_edges<scalar_t, decltype(fc)::value>("efa::edge_message", z, in.filter, in.vec, in.sender, in.receiver,
                                                   dx, dv,
                                                   [&](int64_t e0, int64_t rows) { return geometry.make(e0, rows); });
    });
  });
  return {dx, dv};
}

using EdgeGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Gradients of (filter, vec, d, weight, bias); output_mask says which of d, weight, bias are
// wanted (the others are undefined tensors).
EdgeGrads edge_message_backward_cpu(const Tensor &grad_dx_in, const Tensor &grad_dv_in, const Tensor &filter,
                                    const Tensor &vec, const Tensor &d, const Tensor &n_pi, const Tensor &weight,
                                    const Tensor &bias, const Tensor &sender, const Tensor &receiver, double cutoff,
                                    std::array<bool, 3> output_mask)
{
  const EdgeInputs in = contiguous_edge_inputs(filter, vec, d, n_pi, weight, bias, sender, receiver);
  const Sizes &z = in.z;
  const Tensor grad_dx = grad_dx_in.contiguous(), grad_dv = grad_dv_in.contiguous();
  Tensor g_filter = at::zeros_like(in.filter), g_vec = at::zeros_like(in.vec);
  Tensor g_d = output_mask[0] ? at::zeros_like(in.d) : Tensor();
  Tensor g_weight = output_mask[1] ? at::zeros_like(in.weight) : Tensor();
  Tensor g_bias = output_mask[2] ? at::zeros_like(in.bias) : Tensor();
  if (z.edges > 0) {
    AT_DISPATCH_FLOATING_TYPES(in.vec.scalar_type(), "efa::edge_message_backward", [&] {
      const int64_t rows_max = std::min(kChunk, z.edges);
      Geometry<scalar_t> geometry(in.d, in.n_pi, in.weight, in.bias, cutoff, rows_max);
      Tensor g_basis = at::empty({rows_max, z.radial}, in.d.options());
      Tensor g_length = at::empty({rows_max}, in.d.options());
      const auto chunk = [&](int64_t e0, int64_t rows) { return geometry.make(e0, rows); };
      const auto finish = [&](int64_t e0, int64_t rows, const Tensor &gr, const Tensor &s) {
        if (g_weight.defined()) g_weight.addmm_(gr.t(), geometry.rbf.narrow(0, 0, rows));
        if (g_bias.defined()) g_bias.add_(gr.sum(0));
        if (g_d.defined()) geometry.backward(e0, rows, gr, s, g_basis, g_length, g_d.data_ptr<scalar_t>());
      };
      with_feature_count(z.features, [&](auto fc) {
        backward_edges<scalar_t, decltype(fc)::value>(z, grad_dx, grad_dv, in.filter, in.vec, in.sender,
                                                      in.receiver, g_filter, g_vec, chunk, finish);
      });
    });
  }
  return {g_filter, g_vec, g_d, g_weight, g_bias};
}

std::tuple<Tensor, Tensor> edge_message_meta(const Tensor &filter, const Tensor &vec, const Tensor &d,
                                             const Tensor &n_pi, const Tensor &weight, const Tensor &bias,
                                             const Tensor &sender, const Tensor &receiver, double)
{
  const Sizes z = check_edge_inputs(filter, vec, d, n_pi, weight, bias, sender, receiver);
  return {at::empty({z.atoms, z.features}, vec.options()), at::empty_like(vec)};
}

EdgeGrads edge_message_backward_meta(const Tensor &, const Tensor &, const Tensor &filter, const Tensor &vec,
                                     const Tensor &d, const Tensor &, const Tensor &weight, const Tensor &bias,
                                     const Tensor &, const Tensor &, double, std::array<bool, 3> output_mask)
{
  auto maybe = [](bool wanted, const Tensor &like) { return wanted ? at::empty_like(like) : Tensor(); };
  return {at::empty_like(filter), at::empty_like(vec), maybe(output_mask[0], d), maybe(output_mask[1], weight),
          maybe(output_mask[2], bias)};
}

using EdgeForwardSignature = std::tuple<Tensor, Tensor>(const Tensor &, const Tensor &, const Tensor &,
                                                        const Tensor &, const Tensor &, const Tensor &,
                                                        const Tensor &, const Tensor &, double);
using EdgeBackwardSignature = EdgeGrads(const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                        const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                        const Tensor &, const Tensor &, double, std::array<bool, 3>);

struct FusedEdgeMessage : public torch::autograd::Function<FusedEdgeMessage> {
  static variable_list forward(AutogradContext *ctx, const Tensor &filter, const Tensor &vec, const Tensor &d,
                               const Tensor &n_pi, const Tensor &weight, const Tensor &bias, const Tensor &sender,
                               const Tensor &receiver, double cutoff)
  {
    static const auto op = typed_op<EdgeForwardSignature>("efa::edge_message");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({filter, vec, d, n_pi, weight, bias, sender, receiver});
    ctx->saved_data["cutoff"] = cutoff;
    auto [dx, dv] = op.call(filter, vec, d, n_pi, weight, bias, sender, receiver, cutoff);
    return {dx, dv};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    static const auto op = typed_op<EdgeBackwardSignature>("efa::edge_message_backward");
    TORCH_CHECK(!ctx->needs_input_grad(3), "efa::edge_message: no gradient with respect to n_pi (a fixed buffer)");
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &filter = saved[0], &vec = saved[1];
    const Tensor grad_dx = grads[0].defined() ? grads[0] : at::zeros({vec.size(0), vec.size(2)}, vec.options());
    const Tensor grad_dv = grads[1].defined() ? grads[1] : at::zeros_like(vec);
    const std::array<bool, 3> mask = {ctx->needs_input_grad(2), ctx->needs_input_grad(4), ctx->needs_input_grad(5)};
    variable_list out(9);
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(out[0], out[1], out[2], out[4], out[5]) =
          op.call(grad_dx, grad_dv, filter, vec, saved[2], saved[3], saved[4], saved[5], saved[6], saved[7],
                  ctx->saved_data["cutoff"].toDouble(), mask);
    }
    forbid_double_backward(kEdgeNoDoubleBackward, out, {grad_dx, grad_dv, filter, vec, saved[2], saved[4], saved[5]});
    return out;
  }
};

std::tuple<Tensor, Tensor> edge_message_autograd(const Tensor &filter, const Tensor &vec, const Tensor &d,
                                                 const Tensor &n_pi, const Tensor &weight, const Tensor &bias,
                                                 const Tensor &sender, const Tensor &receiver, double cutoff)
{
  variable_list out = FusedEdgeMessage::apply(filter, vec, d, n_pi, weight, bias, sender, receiver, cutoff);
  return {out[0], out[1]};
}

}  // namespace

Sizes check_edge_inputs(const Tensor &filter, const Tensor &vec, const Tensor &d, const Tensor &n_pi,
                        const Tensor &weight, const Tensor &bias, const Tensor &sender, const Tensor &receiver)
{
  TORCH_CHECK(d.dim() == 2 && d.size(1) == 3, "efa::edge_message: d must be (E, 3), got ", d.sizes());
  TORCH_CHECK(n_pi.dim() == 1, "efa::edge_message: n_pi must be (R,), got ", n_pi.sizes());
  return check_layer("efa::edge_message", filter, vec, d.size(0), n_pi.size(0), weight, bias, sender, receiver,
                     {&filter, &d, &n_pi, &weight, &bias});
}

EdgeInputs contiguous_edge_inputs(const Tensor &filter, const Tensor &vec, const Tensor &d, const Tensor &n_pi,
                                  const Tensor &weight, const Tensor &bias, const Tensor &sender,
                                  const Tensor &receiver)
{
  const Sizes z = check_edge_inputs(filter, vec, d, n_pi, weight, bias, sender, receiver);
  return {z,
          filter.contiguous(),
          vec.contiguous(),
          d.contiguous(),
          n_pi.contiguous(),
          weight.contiguous(),
          bias.contiguous(),
          sender.contiguous(),
          receiver.contiguous()};
}

// The schemas must match efa_deploy/ops.py (MESSAGE_SCHEMA, EDGE_MESSAGE_SCHEMA: the pure-torch registrations).
TORCH_LIBRARY_FRAGMENT(efa, m)
{
  m.def("message(Tensor filter, Tensor vec, Tensor rbf, Tensor weight, Tensor bias, Tensor envelope, Tensor unit, "
        "Tensor sender, Tensor receiver) -> (Tensor, Tensor)");
  m.def("message_backward(Tensor grad_dx, Tensor grad_dv, Tensor filter, Tensor vec, Tensor rbf, Tensor weight, "
        "Tensor bias, Tensor envelope, Tensor unit, Tensor sender, Tensor receiver, bool[3] output_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("edge_message(Tensor filter, Tensor vec, Tensor d, Tensor n_pi, Tensor weight, Tensor bias, Tensor sender, "
        "Tensor receiver, float cutoff) -> (Tensor, Tensor)");
  m.def("edge_message_backward(Tensor grad_dx, Tensor grad_dv, Tensor filter, Tensor vec, Tensor d, Tensor n_pi, "
        "Tensor weight, Tensor bias, Tensor sender, Tensor receiver, float cutoff, bool[3] output_mask) -> "
        "(Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(efa, CPU, m)
{
  m.impl("message", message_cpu);
  m.impl("message_backward", message_backward_cpu);
  m.impl("edge_message", edge_message_cpu);
  m.impl("edge_message_backward", edge_message_backward_cpu);
}

TORCH_LIBRARY_IMPL(efa, Meta, m)
{
  m.impl("message", message_meta);
  m.impl("message_backward", message_backward_meta);
  m.impl("edge_message", edge_message_meta);
  m.impl("edge_message_backward", edge_message_backward_meta);
}

TORCH_LIBRARY_IMPL(efa, Autograd, m)
{
  m.impl("message", message_autograd);
  m.impl("edge_message", edge_message_autograd);
}

}  // namespace efa
