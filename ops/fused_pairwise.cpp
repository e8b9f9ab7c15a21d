// efa::pairwise_attention: the EFA block's exact pairwise form, which training takes for small
// structures (model.train_pairwise_max_atoms), with its first and second derivatives:
//
//   y_i = sum_{j of i's structure} a_ij v_j,   a_ij = sum_m (q_i^m . k_j^m) s_m(r_ij),
//   s_m(r) = sinc(omega_m r) = sin(omega_m r) / (omega_m r),   s_m = 1 where i = j or omega_m = 0
//
// (unscaled; the model multiplies by 1/sqrt(2M)). efa_deploy/model/pairwise.py's
// pairwise_attention_reference is the reference and this operator's pure-torch registration.
//
// Force training differentiates the forces, themselves a derivative: the backward is the operator
// efa::pairwise_attention_backward, whose own backward is the Hessian-vector product of
// L = sum_i gy_i . y_i below. Each pass visits every unordered pair once (the sinc terms of (i, j)
// serve (j, i)) and keeps nothing per pair; a third derivative raises. Atoms are addressed through the padded layout of
// erope.padded_slots: atom i sits in structure slot_i / n_max.
#include <torch/library.h>
#include <torch/torch.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <tuple>
#include <vector>

#include "frequencies.h"
#include "fused_autograd.h"

namespace efa {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using Grads = std::tuple<Tensor, Tensor, Tensor, Tensor>;
using SecondGrads = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

constexpr const char *kNoThirdDerivative =
    "efa::pairwise_attention has first and second derivatives only (force training); a third derivative is not "
    "implemented";

// sinc(x) and its first two derivatives.
template <typename T>
struct Sinc {
  T s, d1, d2;
};

// Below this the closed forms lose digits to cancellation (about eps / x^2 relative in the second
// derivative: 1e-14 in float64 at 0.1).
template <typename T>
constexpr T kSeriesBelow = T(0.1);

// sinc = sum_n c_n x^2n, c_n = (-1)^n / (2n+1)!, and its derivatives term by term, in Horner
// form; 6 terms leave < 1e-17 below 0.1.
template <typename T>
struct SincSeries {
  static constexpr int kTerms = 6;
  std::array<T, kTerms> s{}, d1{}, d2{};  // coefficients of x^2n (d1: of x^(2n-1), d2: of x^(2n-2))

  SincSeries()
  {
    double factorial = 1;
    for (int n = 0; n < kTerms; ++n) {
      if (n > 0) factorial *= double((2 * n) * (2 * n + 1));
      const double c = (n % 2 == 0 ? 1.0 : -1.0) / factorial;
      s[n] = T(c), d1[n] = T(2 * n * c), d2[n] = T(2 * n * (2 * n - 1) * c);
    }
  }

  Sinc<T> operator()(T x) const
  {
    const T x2 = x * x;
    T a = s[kTerms - 1], b = d1[kTerms - 1], c = d2[kTerms - 1];
    for (int n = kTerms - 2; n >= 0; --n) a = a * x2 + s[n];
    for (int n = kTerms - 2; n >= 1; --n) b = b * x2 + d1[n], c = c * x2 + d2[n];
    return {a, b * x, c};
  }
};

// from sin x, cos x and 1 / x
template <typename T>
Sinc<T> sinc_closed(T sine, T cosine, T inverse)
{
  const T s = sine * inverse;
  const T d1 = (cosine - s) * inverse;
  return {s, d1, -s - T(2) * d1 * inverse};
}

struct Layout {
  int64_t atoms, channels, columns, structures, n_max;  // N, M, D, B, Nmax
};

Layout check_inputs(const char *op, const Tensor &positions, const Tensor &queries, const Tensor &keys,
                    const Tensor &values, const Tensor &omega, const Tensor &slot, int64_t n_structures, int64_t n_max)
{
  const int64_t n = positions.size(0);
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3, op, ": positions must be (N, 3), got ",
              positions.sizes());
  TORCH_CHECK(queries.dim() == 3 && queries.size(0) == n && queries.size(2) == 2, op,
              ": queries must be (N, M, 2), got ", queries.sizes());
  TORCH_CHECK(keys.sizes() == queries.sizes(), op, ": keys must have the queries' shape ", queries.sizes(), ", got ",
              keys.sizes());
  TORCH_CHECK(values.dim() == 2 && values.size(0) == n, op, ": values must be (N, D), got ", values.sizes());
  TORCH_CHECK(omega.dim() == 1 && omega.size(0) == queries.size(1), op, ": omega must hold one frequency per channel (",
              queries.size(1), "), got ", omega.sizes());
  TORCH_CHECK(!omega.requires_grad(), op, ": omega is the model's constant buffer and must not require grad");
  TORCH_CHECK(slot.dim() == 1 && slot.size(0) == n && slot.scalar_type() == at::kLong, op,
              ": slot must be (N,) int64, got ", slot.sizes(), " ", slot.scalar_type());
  TORCH_CHECK(n_structures >= 0 && n_max >= 0, op, ": n_structures and n_max must be 0 or more");
  for (const Tensor *t : {&queries, &keys, &values})
    TORCH_CHECK(t->scalar_type() == positions.scalar_type(), op, ": all inputs must have the positions' dtype ",
                positions.scalar_type());
  return {n, queries.size(1), values.size(1), n_structures, n_max};
}

// Atoms of each structure, in slot order: members[first[b] .. first[b + 1]).
struct Members {
  std::vector<int64_t> atoms, first;
};

Members members_of(const char *op, const Tensor &slot_in, const Layout &z)
{
  const Tensor slot = slot_in.contiguous();
  const int64_t *s = slot.data_ptr<int64_t>();
  std::vector<int64_t> occupant(z.structures * z.n_max, -1);
  for (int64_t i = 0; i < z.atoms; ++i) {
    TORCH_CHECK(s[i] >= 0 && s[i] < z.structures * z.n_max && occupant[s[i]] < 0, op, ": atom ", i, " has slot ", s[i],
                ", outside 0 .. B * Nmax - 1 or shared with another atom");
    occupant[s[i]] = i;
  }
  Members m;
  m.first.push_back(0);
  for (int64_t b = 0; b < z.structures; ++b) {
    for (int64_t r = 0; r < z.n_max; ++r)
      if (occupant[b * z.n_max + r] >= 0) m.atoms.push_back(occupant[b * z.n_max + r]);
    m.first.push_back(static_cast<int64_t>(m.atoms.size()));
  }
  return m;
}

// Two atoms of a structure more than r_max apart: the grid form the model is exported with would
// alias them (the same message as efa_deploy/model/pairwise.py's reference).
template <typename T>
void check_extent(const Members &members, const T *p, double r_max)
{
  double farthest = 0;
  for (size_t b = 0; b + 1 < members.first.size(); ++b)
    for (int64_t a = members.first[b]; a < members.first[b + 1]; ++a)
      for (int64_t c = a + 1; c < members.first[b + 1]; ++c) {
        const int64_t i = members.atoms[a], j = members.atoms[c];
        double r2 = 0;
        for (int x = 0; x < 3; ++x) r2 += double(p[3 * i + x] - p[3 * j + x]) * double(p[3 * i + x] - p[3 * j + x]);
        farthest = std::max(farthest, r2);
      }
  farthest = std::sqrt(farthest);
  TORCH_CHECK_VALUE(farthest <= r_max, "efa::pairwise_attention: a training structure has atoms ", farthest,
                    " A apart, more than r_max = ", r_max, " A: the grid form (validation, export, MD) would alias "
                    "them; raise model.r_max or set model.train_pairwise_max_atoms: 0");
}

// The channels' distinct frequencies (rows) and each channel's row: on a ladder (frequencies.h)
// the rows are the multiples 0 .. top of the base, whose sin/cos follow from one pair of them.
template <typename T>
struct Rows {
  std::vector<T> omega, inverse;  // per row: the frequency and 1 / it (0 for a zero frequency)
  std::vector<int64_t> of;        // row of each channel
  bool ladder = false;
  T base = 0;
};

template <typename T>
Rows<T> rows_of(const Tensor &omega)
{
  const Frequencies f = frequencies_of(omega);
  Rows<T> rows;
  if (!f.multiple.empty()) {
    rows.ladder = true;
    rows.base = T(f.base);
    for (int64_t n = 0; n <= f.top; ++n) rows.omega.push_back(T(double(n) * f.base));
    rows.of = f.multiple;
  } else {
    for (double w : f.omega) {
      const auto found = std::find(rows.omega.begin(), rows.omega.end(), T(w));
      rows.of.push_back(found - rows.omega.begin());
      if (found == rows.omega.end()) rows.omega.push_back(T(w));
    }
  }
  for (T w : rows.omega) rows.inverse.push_back(w != T(0) ? T(1) / w : T(0));
  return rows;
}

// One ordered pair (i, j): its distance, unit vector i - j, and every channel's sinc terms.
template <typename T>
struct Pair {
  T r = 0, u[3] = {0, 0, 0};
  // per real of the complex channels (each channel's value twice): s_m(r), ds_m/dr, d2s_m/dr2
  std::vector<T> s, ds, dds;
  std::vector<T> sine, cosine, row[3];  // per row

  Pair(int64_t channels, int64_t rows)
      : s(2 * channels), ds(2 * channels), dds(2 * channels), sine(rows), cosine(rows)
  {
    for (auto &terms : row) terms.resize(rows);
  }

  void at(const T *p, int64_t i, int64_t j, const Rows<T> &rows)
  {
    static const SincSeries<T> series;
    r = 0;
    for (int c = 0; c < 3; ++c) {
      u[c] = p[3 * i + c] - p[3 * j + c];
      r += u[c] * u[c];
    }
    r = std::sqrt(r);
    const T inverse_r = T(1) / r;
    if (i == j) {
      for (int c = 0; c < 3; ++c) u[c] = T(0);
      std::fill(s.begin(), s.end(), T(1));
      std::fill(ds.begin(), ds.end(), T(0));
      std::fill(dds.begin(), dds.end(), T(0));
      return;
    }
    for (int c = 0; c < 3; ++c) u[c] *= inverse_r;
    const size_t n_rows = rows.omega.size();
    if (rows.ladder) {
      const T step_sin = std::sin(rows.base * r), step_cos = std::cos(rows.base * r);
      sine[0] = T(0), cosine[0] = T(1);
      for (size_t n = 1; n < n_rows; ++n) {
        sine[n] = sine[n - 1] * step_cos + cosine[n - 1] * step_sin;
        cosine[n] = cosine[n - 1] * step_cos - sine[n - 1] * step_sin;
      }
    } else {
      for (size_t n = 0; n < n_rows; ++n) {
        sine[n] = std::sin(rows.omega[n] * r);
        cosine[n] = std::cos(rows.omega[n] * r);
      }
    }
    for (size_t n = 0; n < n_rows; ++n) {
      const T w = rows.omega[n], x = w * r;
      Sinc<T> f{T(1), T(0), T(0)};
      if (w != T(0))
        f = x < kSeriesBelow<T> ? series(x) : sinc_closed(sine[n], cosine[n], rows.inverse[n] * inverse_r);
      row[0][n] = f.s, row[1][n] = w * f.d1, row[2][n] = w * w * f.d2;
    }
    for (size_t e = 0; e < s.size(); ++e) {
      const int64_t n = rows.of[e / 2];
      s[e] = row[0][n], ds[e] = row[1][n], dds[e] = row[2][n];
    }
  }
};

// Runs body(pair, i, j) over the ordered pairs of every structure, structures in parallel (each
// atom belongs to one structure, so the pairs of different structures write different rows). The
// sinc terms of (i, j) serve (j, i) too, with the unit vector reversed.
template <typename T, typename Body>
void for_each_pair(const Members &members, const T *p, const Rows<T> &rows, const Body &body)
{
  const int64_t structures = static_cast<int64_t>(members.first.size()) - 1;
  at::parallel_for(0, structures, 1, [&](int64_t begin, int64_t end) {
    Pair<T> pair(static_cast<int64_t>(rows.of.size()), static_cast<int64_t>(rows.omega.size()));
    for (int64_t b = begin; b < end; ++b)
      for (int64_t a = members.first[b]; a < members.first[b + 1]; ++a)
        for (int64_t c = a; c < members.first[b + 1]; ++c) {
          const int64_t i = members.atoms[a], j = members.atoms[c];
          pair.at(p, i, j, rows);
          body(pair, i, j);
          if (i == j) continue;
          for (T &component : pair.u) component = -component;
          body(pair, j, i);
        }
  });
}

template <typename T>
T dot(const T *a, const T *b, int64_t n)
{
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t c = 0; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

Tensor forward_cpu(const Tensor &positions, const Tensor &queries, const Tensor &keys, const Tensor &values,
                   const Tensor &omega, const Tensor &slot, int64_t n_structures, int64_t n_max, double r_max)
{
  const char *op = "efa::pairwise_attention";
  const Layout z = check_inputs(op, positions, queries, keys, values, omega, slot, n_structures, n_max);
  const Members members = members_of(op, slot, z);
  const Tensor pos = positions.contiguous(), q = queries.contiguous(), k = keys.contiguous(), v = values.contiguous();
  Tensor y = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "pairwise_attention", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    scalar_t *yp = y.data_ptr<scalar_t>();
    const int64_t m2 = 2 * z.channels, d = z.columns;
    check_extent(members, pos.data_ptr<scalar_t>(), r_max);
    for_each_pair(members, pos.data_ptr<scalar_t>(), rows_of<scalar_t>(omega),
                  [&](const Pair<scalar_t> &pair, int64_t i, int64_t j) {
                    const scalar_t *__restrict__ qi = qp + i * m2, *__restrict__ kj = kp + j * m2;
                    const scalar_t *__restrict__ vj = vp + j * d, *__restrict__ sp = pair.s.data();
                    scalar_t *__restrict__ yi = yp + i * d;
                    scalar_t a = 0;
                    _Pragma("omp simd reduction(+ : a)")
                    for (int64_t e = 0; e < m2; ++e) a += qi[e] * kj[e] * sp[e];
                    for (int64_t c = 0; c < d; ++c) yi[c] += a * vj[c];
                  });
  });
  return y;
}

// Gradients of L = sum_i gy_i . y_i: with g_ij = gy_i . v_j and c_m = q_i^m . k_j^m,
//   dL/dv_j = sum_i a_ij gy_i,  dL/dq_i^m = sum_j g_ij s_m k_j^m,  dL/dk_j^m = sum_i g_ij s_m q_i^m,
//   dL/dp_i = -dL/dp_j (pair part) = g_ij sum_m c_m s_m'(r_ij) u_ij.
Grads backward_cpu(const Tensor &grad_y, const Tensor &positions, const Tensor &queries, const Tensor &keys,
                   const Tensor &values, const Tensor &omega, const Tensor &slot, int64_t n_structures, int64_t n_max)
{
  const char *op = "efa::pairwise_attention_backward";
  const Layout z = check_inputs(op, positions, queries, keys, values, omega, slot, n_structures, n_max);
  TORCH_CHECK(grad_y.sizes() == values.sizes(), op, ": grad_y must have the values' shape");
  const Members members = members_of(op, slot, z);
  const Tensor pos = positions.contiguous(), q = queries.contiguous(), k = keys.contiguous(), v = values.contiguous();
  const Tensor gy = grad_y.contiguous();
  Tensor gpos = at::zeros_like(pos), gq = at::zeros_like(q), gk = at::zeros_like(k), gv = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "pairwise_attention_backward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const scalar_t *gyp = gy.data_ptr<scalar_t>();
    scalar_t *gpp = gpos.data_ptr<scalar_t>(), *gqp = gq.data_ptr<scalar_t>(), *gkp = gk.data_ptr<scalar_t>();
    scalar_t *gvp = gv.data_ptr<scalar_t>();
    const int64_t m2 = 2 * z.channels, d = z.columns;
    for_each_pair(members, pos.data_ptr<scalar_t>(), rows_of<scalar_t>(omega),
                  [&](const Pair<scalar_t> &pair, int64_t i, int64_t j) {
                    const scalar_t *__restrict__ qi = qp + i * m2, *__restrict__ kj = kp + j * m2;
                    const scalar_t *__restrict__ gyi = gyp + i * d, *__restrict__ vj = vp + j * d;
                    const scalar_t *__restrict__ sp = pair.s.data(), *__restrict__ dsp = pair.ds.data();
                    scalar_t *__restrict__ gqi = gqp + i * m2, *__restrict__ gkj = gkp + j * m2;
                    scalar_t *__restrict__ gvj = gvp + j * d;
                    const scalar_t g = dot(gyi, vj, d);
                    scalar_t a = 0, h = 0;
                    _Pragma("omp simd reduction(+ : a, h)")
                    for (int64_t e = 0; e < m2; ++e) {
                      const scalar_t c = qi[e] * kj[e];
                      a += c * sp[e];
                      h += c * dsp[e];
                      gqi[e] += g * sp[e] * kj[e];
                      gkj[e] += g * sp[e] * qi[e];
                    }
                    for (int64_t c = 0; c < d; ++c) gvj[c] += a * gyi[c];
                    for (int x = 0; x < 3; ++x) {
                      gpp[3 * i + x] += g * h * pair.u[x];
                      gpp[3 * j + x] -= g * h * pair.u[x];
                    }
                  });
  });
  return {gpos, gq, gk, gv};
}

// The backward's own gradients: the Hessian-vector product of L along (Gp, Gq, Gk, Gv), the
// cotangents of (dL/dp, dL/dq, dL/dk, dL/dv). Per pair, with e = gy_i . Gv_j,
// delta = u . (Gp_i - Gp_j), chat_m = Gq_i^m . k_j^m + q_i^m . Gk_j^m, b = sum_m (chat_m s_m + c_m s_m' delta),
// the directional derivative is e a + g b, and its gradients are
//   gy_i: a Gv_j + b v_j;  v_j: b gy_i;  q_i^m: (e s_m + g s_m' delta) k_j^m + g s_m Gk_j^m (k likewise);
//   p_i = -p_j: alpha u + beta (Gp_i - Gp_j - delta u) / r, alpha = sum_m (e c_m + g chat_m) s_m'
//   + g c_m s_m'' delta, beta = g sum_m c_m s_m'.
SecondGrads double_backward_cpu(const Tensor &grad_y, const Tensor &positions, const Tensor &queries,
                                const Tensor &keys, const Tensor &values, const Tensor &omega, const Tensor &slot,
                                int64_t n_structures, int64_t n_max, const Tensor &gg_pos, const Tensor &gg_q,
                                const Tensor &gg_k, const Tensor &gg_v, bool position_terms)
{
  const char *op = "efa::pairwise_attention_backward (its derivative)";
  const Layout z = check_inputs(op, positions, queries, keys, values, omega, slot, n_structures, n_max);
  const Members members = members_of(op, slot, z);
  const Tensor pos = positions.contiguous(), q = queries.contiguous(), k = keys.contiguous(), v = values.contiguous();
  const Tensor gy = grad_y.contiguous();
  auto or_zeros = [](const Tensor &t, const Tensor &like) {
    return t.defined() ? t.contiguous() : at::zeros_like(like);
  };
  const Tensor Gp = or_zeros(gg_pos, pos), Gq = or_zeros(gg_q, q), Gk = or_zeros(gg_k, k), Gv = or_zeros(gg_v, v);
  Tensor dgy = at::zeros_like(gy), dpos = at::zeros_like(pos), dq = at::zeros_like(q), dk = at::zeros_like(k);
  Tensor dv = at::zeros_like(v);
  AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "pairwise_attention_double_backward", [&] {
    const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = k.data_ptr<scalar_t>(), *vp = v.data_ptr<scalar_t>();
    const scalar_t *gyp = gy.data_ptr<scalar_t>(), *Gpp = Gp.data_ptr<scalar_t>(), *Gqp = Gq.data_ptr<scalar_t>();
    const scalar_t *Gkp = Gk.data_ptr<scalar_t>(), *Gvp = Gv.data_ptr<scalar_t>();
    scalar_t *dgyp = dgy.data_ptr<scalar_t>(), *dpp = dpos.data_ptr<scalar_t>(), *dqp = dq.data_ptr<scalar_t>();
    scalar_t *dkp = dk.data_ptr<scalar_t>(), *dvp = dv.data_ptr<scalar_t>();
    const int64_t m2 = 2 * z.channels, d = z.columns;
    for_each_pair(members, pos.data_ptr<scalar_t>(), rows_of<scalar_t>(omega),
                  [&](const Pair<scalar_t> &pair, int64_t i, int64_t j) {
                    const scalar_t *__restrict__ qi = qp + i * m2, *__restrict__ kj = kp + j * m2;
                    const scalar_t *__restrict__ Gqi = Gqp + i * m2, *__restrict__ Gkj = Gkp + j * m2;
                    const scalar_t *__restrict__ gyi = gyp + i * d, *__restrict__ vj = vp + j * d;
                    const scalar_t *__restrict__ Gvj = Gvp + j * d;
                    const scalar_t *__restrict__ sp = pair.s.data(), *__restrict__ dsp = pair.ds.data();
                    const scalar_t *__restrict__ ddsp = pair.dds.data();
                    scalar_t *__restrict__ dqi = dqp + i * m2, *__restrict__ dkj = dkp + j * m2;
                    scalar_t *__restrict__ dgyi = dgyp + i * d, *__restrict__ dvj = dvp + j * d;
                    scalar_t g = 0, e = 0;
                    _Pragma("omp simd reduction(+ : g, e)")
                    for (int64_t c = 0; c < d; ++c) g += gyi[c] * vj[c], e += gyi[c] * Gvj[c];
                    scalar_t shift[3], delta = 0;
                    for (int x = 0; x < 3; ++x) {
                      shift[x] = Gpp[3 * i + x] - Gpp[3 * j + x];
                      delta += pair.u[x] * shift[x];
                    }
                    // sums over the reals of c = q_i k_j and chat = Gq_i k_j + q_i Gk_j times the sinc terms
                    scalar_t cs = 0, cds = 0, cdds = 0, chats = 0, chatds = 0;
                    _Pragma("omp simd reduction(+ : cs, cds, cdds, chats, chatds)")
                    for (int64_t x = 0; x < m2; ++x) {
                      const scalar_t c = qi[x] * kj[x], chat = Gqi[x] * kj[x] + qi[x] * Gkj[x];
                      cs += c * sp[x];
                      cds += c * dsp[x];
                      chats += chat * sp[x];
                      chatds += chat * dsp[x];
                      cdds += c * ddsp[x];
                      const scalar_t rate = e * sp[x] + g * dsp[x] * delta, gs = g * sp[x];
                      dqi[x] += rate * kj[x] + gs * Gkj[x];
                      dkj[x] += rate * qi[x] + gs * Gqi[x];
                    }
                    const scalar_t a = cs, b = chats + cds * delta;
                    for (int64_t c = 0; c < d; ++c) {
                      dgyi[c] += a * Gvj[c] + b * vj[c];
                      dvj[c] += b * gyi[c];
                    }
                    if (i == j || !position_terms) return;
                    const scalar_t alpha = e * cds + g * chatds + g * cdds * delta, beta = g * cds;
                    for (int x = 0; x < 3; ++x) {
                      const scalar_t t = alpha * pair.u[x] + beta * (shift[x] - delta * pair.u[x]) / pair.r;
                      dpp[3 * i + x] += t;
                      dpp[3 * j + x] -= t;
                    }
                  });
  });
  return {dgy, dpos, dq, dk, dv};
}

Tensor forward_meta(const Tensor &, const Tensor &, const Tensor &, const Tensor &values, const Tensor &,
                    const Tensor &, int64_t, int64_t, double)
{
  return at::empty_like(values);
}

Grads backward_meta(const Tensor &, const Tensor &positions, const Tensor &queries, const Tensor &keys,
                    const Tensor &values, const Tensor &, const Tensor &, int64_t, int64_t)
{
  return {at::empty_like(positions), at::empty_like(queries), at::empty_like(keys), at::empty_like(values)};
}

using ForwardSignature = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                const Tensor &, int64_t, int64_t, double);
using BackwardSignature = Grads(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                const Tensor &, const Tensor &, int64_t, int64_t);

// The derivative of the backward operator: one pass of double_backward_cpu; its outputs may not
// be differentiated again.
struct PairwiseBackward : public torch::autograd::Function<PairwiseBackward> {
  static variable_list forward(AutogradContext *ctx, const Tensor &grad_y, const Tensor &positions,
                               const Tensor &queries, const Tensor &keys, const Tensor &values, const Tensor &omega,
                               const Tensor &slot, int64_t n_structures, int64_t n_max)
  {
    static const auto op = typed_op<BackwardSignature>("efa::pairwise_attention_backward");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({grad_y, positions, queries, keys, values, omega, slot});
    ctx->saved_data["n_structures"] = n_structures;
    ctx->saved_data["n_max"] = n_max;
    auto [gpos, gq, gk, gv] = op.call(grad_y, positions, queries, keys, values, omega, slot, n_structures, n_max);
    return {gpos, gq, gk, gv};
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    const variable_list s = ctx->get_saved_variables();
    variable_list out(9);
    {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      // force training backpropagates to the parameters only: no gradient of the positions then
      const bool positions = ctx->needs_input_grad(1);
      std::tie(out[0], out[1], out[2], out[3], out[4]) =
          double_backward_cpu(s[0], s[1], s[2], s[3], s[4], s[5], s[6], ctx->saved_data["n_structures"].toInt(),
                              ctx->saved_data["n_max"].toInt(), grads[0], grads[1], grads[2], grads[3], positions);
      if (!positions) out[1] = Tensor();
    }
    forbid_double_backward(kNoThirdDerivative, out, {grads[0], grads[1], grads[2], grads[3], s[0], s[1], s[2], s[3],
                                                     s[4]});
    return out;
  }
};

struct PairwiseAttention : public torch::autograd::Function<PairwiseAttention> {
  static Tensor forward(AutogradContext *ctx, const Tensor &positions, const Tensor &queries, const Tensor &keys,
                        const Tensor &values, const Tensor &omega, const Tensor &slot, int64_t n_structures,
                        int64_t n_max, double r_max)
  {
    static const auto op = typed_op<ForwardSignature>("efa::pairwise_attention");
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({positions, queries, keys, values, omega, slot});
    ctx->saved_data["n_structures"] = n_structures;
    ctx->saved_data["n_max"] = n_max;
    return op.call(positions, queries, keys, values, omega, slot, n_structures, n_max, r_max);
  }

  // through the dispatcher's autograd key, so that the gradients are differentiable again
  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    static const auto op = typed_op<BackwardSignature>("efa::pairwise_attention_backward");
    const variable_list s = ctx->get_saved_variables();
    variable_list out(9);
    if (!grads[0].defined()) return out;
    std::tie(out[0], out[1], out[2], out[3]) = op.call(grads[0], s[0], s[1], s[2], s[3], s[4], s[5],
                                                       ctx->saved_data["n_structures"].toInt(),
                                                       ctx->saved_data["n_max"].toInt());
    return out;
  }
};

Tensor forward_autograd(const Tensor &positions, const Tensor &queries, const Tensor &keys, const Tensor &values,
                        const Tensor &omega, const Tensor &slot, int64_t n_structures, int64_t n_max, double r_max)
{
  return PairwiseAttention::apply(positions, queries, keys, values, omega, slot, n_structures, n_max, r_max);
}

Grads backward_autograd(const Tensor &grad_y, const Tensor &positions, const Tensor &queries, const Tensor &keys,
                        const Tensor &values, const Tensor &omega, const Tensor &slot, int64_t n_structures,
                        int64_t n_max)
{
  const variable_list out =
      PairwiseBackward::apply(grad_y, positions, queries, keys, values, omega, slot, n_structures, n_max);
  return {out[0], out[1], out[2], out[3]};
}
}  // namespace

// The forward schema must match efa_deploy/ops.py (pure-torch registration).
TORCH_LIBRARY_FRAGMENT(efa, m)
{
  m.def("pairwise_attention(Tensor positions, Tensor queries, Tensor keys, Tensor values, Tensor omega, Tensor slot, "
        "int n_structures, int n_max, float r_max) -> Tensor");
  m.def("pairwise_attention_backward(Tensor grad_y, Tensor positions, Tensor queries, Tensor keys, Tensor values, "
        "Tensor omega, Tensor slot, int n_structures, int n_max) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(efa, CPU, m)
{
  m.impl("pairwise_attention", forward_cpu);
  m.impl("pairwise_attention_backward", backward_cpu);
}

TORCH_LIBRARY_IMPL(efa, Meta, m)
{
  m.impl("pairwise_attention", forward_meta);
  m.impl("pairwise_attention_backward", backward_meta);
}

TORCH_LIBRARY_IMPL(efa, Autograd, m)
{
  m.impl("pairwise_attention", forward_autograd);
  m.impl("pairwise_attention_backward", backward_autograd);
}

}  // namespace efa
