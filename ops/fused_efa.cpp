// efa::attention_keys and efa::attention_queries: the two stages of the EFA block's linear
// (ERoPE) form, split at the global sum over MPI ranks. efa_deploy/model/erope.py is the
// reference (and these operators' pure-torch registration when this library is not built):
//
//   attention_keys     KV[b] = sum_{owned j of b} A(r_j, k_j)^T (owned_j v_j)   (B, M, G, 2D)
//   (the model: efa::global_sum, then times the grid weights)
//   attention_queries  y_i = A(r_i, q_i) KV[b_i]                                 (N, D)
//
// A(r, c) is one atom's row of 2MG rotation coefficients: for channel m and grid direction g,
// theta = omega_m (u_g . r), (C, S) = (cos, sin) theta and the complex channel c = (c0, c1),
//   A[m, g] = (C c0 - S c1, -(C c1 + S c0)),   i.e. conj(c e^{i theta}) as (re, im).
// The rows of a chunk of atoms are made in a scratch buffer that stays in cache, and each stage
// is then one BLAS product per chunk: nothing per atom x grid outlives its chunk. Rotations:
// when the frequencies are integer multiples of the smallest (omega_m = n_m omega_1, as the
// model's evenly spaced ones are), one sin/cos per atom and direction (and one per pair of
// opposite directions, which Lebedev rules hold) and the angle-addition recurrence; otherwise
// sin/cos per channel. Backward saves only the inputs and recomputes the
// rows. First derivatives only: a double backward raises (training keeps the reference path).
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "attention_checks.h"
#include "frequencies.h"
#include "fused_autograd.h"

namespace efa {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kScratchBytes = 128 * 1024;  // one chunk's coefficient rows (L2-sized)
constexpr const char *kNoDoubleBackward =
    "efa::attention_keys / efa::attention_queries (the fused EFA block used by exported models) have no second "
    "derivative; train with the reference path: efa_deploy.model.use_fused(model, False)";

using Sizes = AttentionSizes;

// The inputs both stages share: positions (N, 3), a complex channel tensor (N, M, 2), batch
// (N,), omega (M,), directions (G, 3). Returns N, M, G.
Sizes check_rotation_inputs(const char *op, const Tensor &positions, const Tensor &channels, const char *name,
                            const Tensor &batch, const Tensor &omega, const Tensor &directions)
{
  TORCH_CHECK(positions.dim() == 2 && positions.size(1) == 3, op, ": positions must be (N, 3), got ", positions.sizes());
  const int64_t n = positions.size(0);
  TORCH_CHECK(omega.dim() == 1, op, ": omega must be (M,), got ", omega.sizes());
  const int64_t m = omega.size(0);
  TORCH_CHECK(channels.dim() == 3 && channels.size(0) == n && channels.size(1) == m && channels.size(2) == 2, op, ": ",
              name, " must be (N, M, 2) = (", n, ", ", m, ", 2), got ", channels.sizes());
  TORCH_CHECK(directions.dim() == 2 && directions.size(1) == 3, op, ": directions must be (G, 3), got ",
              directions.sizes());
  TORCH_CHECK(batch.dim() == 1 && batch.size(0) == n && batch.scalar_type() == at::kLong, op,
              ": batch must be int64 of shape (N,) = (", n, ",), got ", batch.scalar_type(), " ", batch.sizes());
  TORCH_CHECK(at::isFloatingType(positions.scalar_type()), op, ": positions must be floating point, got ",
              positions.scalar_type());
  TORCH_CHECK(channels.scalar_type() == positions.scalar_type(), op, ": ", name, " must have the dtype of positions (",
              positions.scalar_type(), "), got ", channels.scalar_type());
  return {n, m, directions.size(0), 0, 0};
}

// The CPU kernels' own check: every input on the CPU.
void require_cpu(const char *op, std::initializer_list<const Tensor *> tensors)
{
  for (const Tensor *t : tensors) {
    TORCH_CHECK(t->device().is_cpu(), op, " runs on CPU tensors here; on ", t->device(),
                " the model takes the reference path (efa_deploy/model/erope.py)");
  }
}

// Atoms in chunks of one structure each, for one BLAS product per chunk.
int64_t chunk_rows(const Sizes &z, size_t element)
{
  return std::clamp<int64_t>(kScratchBytes / std::max<int64_t>(1, z.width() * int64_t(element)), 8, 512);
}

// Visits the atoms in order, in chunks of at most `rows` consecutive atoms of one structure,
// leaving out those skip(i) names, as body(structure, atoms).
template <typename Skip, typename Body>
void for_each_chunk(const char *op, const Tensor &batch, int64_t n_structures, int64_t rows, const Skip &skip,
                    const Body &body)
{
  const int64_t *structure = batch.data_ptr<int64_t>();
  std::vector<int64_t> atoms;
  atoms.reserve(rows);
  int64_t current = -1;
  for (int64_t i = 0; i < batch.size(0); ++i) {
    const int64_t b = structure[i];
    TORCH_CHECK(b >= 0 && b < n_structures, op, ": atom ", i, " is in structure ", b, " but there are ", n_structures,
                " structures (batch must hold 0 .. n_structures - 1)");
    if (skip(i)) continue;
    if (!atoms.empty() && (b != current || int64_t(atoms.size()) == rows)) {
      body(current, atoms);
      atoms.clear();
    }
    current = b;
    atoms.push_back(i);
  }
  if (!atoms.empty()) body(current, atoms);
}

// One atom's rotations as a table of cos rows then sin rows (G each) of its distinct angles:
// on a ladder, n * base * (u_g . r) for n = 0 .. top (row n); otherwise omega_m (u_g . r) per
// channel (row m). Channel m reads row row_of[m]. Every loop runs over g, so it vectorises.
template <typename T>
class Rotations {
 public:
  Rotations(const Frequencies &f, const Tensor &directions)
      : f_(f),
        ladder_(!f.multiple.empty()),
        rows_(ladder_ ? f.top + 1 : int64_t(f.omega.size())),
        g_(directions.size(0)),
        axes_(3 * g_),
        p_(g_)
  {
    const Tensor d = directions.contiguous();
    const T *u = d.data_ptr<T>();
    for (int64_t g = 0; g < g_; ++g)
      for (int k = 0; k < 3; ++k) axes_[k * g_ + g] = u[3 * g + k];
    // Lebedev rules hold every direction with its opposite, whose angle is the negative (u . r
    // negates exactly): one sin/cos serves both
    opposite_.assign(g_, -1);
    second_.assign(g_, false);
    std::map<std::array<T, 3>, int64_t> unpaired;
    for (int64_t g = 0; g < g_; ++g) {
      const auto other = unpaired.find({-u[3 * g], -u[3 * g + 1], -u[3 * g + 2]});
      if (other != unpaired.end()) {
        opposite_[other->second] = g;
        second_[g] = true;
        unpaired.erase(other);
      } else {
        unpaired[{u[3 * g], u[3 * g + 1], u[3 * g + 2]}] = g;
      }
    }
    for (size_t m = 0; m < f.omega.size(); ++m) row_of_.push_back(ladder_ ? f.multiple[m] : int64_t(m));
  }

  int64_t table_size() const { return 2 * rows_ * g_; }
  const T *cos_row(const T *table, int64_t m) const { return table + row_of_[m] * g_; }
  const T *sin_row(const T *table, int64_t m) const { return table + (rows_ + row_of_[m]) * g_; }
  const T *axis(int k) const { return axes_.data() + k * g_; }

  void operator()(const T *r, T *table)
  {
    const T *ux = axis(0), *uy = axis(1), *uz = axis(2);
    T *__restrict__ p = p_.data();
    for (int64_t g = 0; g < g_; ++g) p[g] = ux[g] * r[0] + uy[g] * r[1] + uz[g] * r[2];
    T *c = table, *s = table + rows_ * g_;
    if (!ladder_) {
      for (int64_t m = 0; m < rows_; ++m) angles(T(f_.omega[m]), p, c + m * g_, s + m * g_);
      return;
    }
    std::fill(c, c + g_, T(1));
    std::fill(s, s + g_, T(0));
    if (rows_ == 1) return;
    const T *__restrict__ c1 = c + g_;
    const T *__restrict__ s1 = s + g_;
    angles(T(f_.base), p, c + g_, s + g_);
    for (int64_t n = 2; n < rows_; ++n) {  // angle addition: (n - 1) t + t
      const T *__restrict__ cp = c + (n - 1) * g_;
      const T *__restrict__ sp = s + (n - 1) * g_;
      T *__restrict__ cn = c + n * g_;
      T *__restrict__ sn = s + n * g_;
      for (int64_t g = 0; g < g_; ++g) {
        cn[g] = cp[g] * c1[g] - sp[g] * s1[g];
        sn[g] = sp[g] * c1[g] + cp[g] * s1[g];
      }
    }
  }

 private:
  void angles(T omega, const T *__restrict__ p, T *__restrict__ c, T *__restrict__ s) const
  {
    for (int64_t g = 0; g < g_; ++g) {
      if (second_[g]) continue;
      const T t = omega * p[g];
      c[g] = std::cos(t);
      s[g] = std::sin(t);
      if (opposite_[g] >= 0) {
        c[opposite_[g]] = c[g];
        s[opposite_[g]] = -s[g];
      }
    }
  }

  const Frequencies &f_;
  const bool ladder_;
  const int64_t rows_, g_;
  std::vector<T> axes_, p_;  // directions as x, y, z rows; u_g . r
  std::vector<int64_t> row_of_, opposite_;  // opposite_[g]: the later direction -u_g, or -1
  std::vector<bool> second_;                // u_g is the opposite of an earlier direction
};

// One atom's coefficient row A (M x G x 2) from its rotation table and channels ch (M x 2).
template <typename T>
void coefficient_row(const Rotations<T> &rot, int64_t m_count, int64_t g_count, const T *table,
                     const T *__restrict__ ch, T *__restrict__ row)
{
  for (int64_t m = 0; m < m_count; ++m) {
    const T a0 = ch[2 * m], a1 = ch[2 * m + 1];
    const T *__restrict__ c = rot.cos_row(table, m);
    const T *__restrict__ s = rot.sin_row(table, m);
    T *__restrict__ out = row + 2 * m * g_count;
    for (int64_t g = 0; g < g_count; ++g) {
      out[2 * g] = c[g] * a0 - s[g] * a1;
      out[2 * g + 1] = -(c[g] * a1 + s[g] * a0);
    }
  }
}

constexpr int64_t kLanes = 8;  // independent partial sums, so the sums over g vectorise

// The gradient of one atom's row (grow, M x G x 2) -> its channels' gradient (gch, M x 2) and
// position gradient (gr, 3). dA/dtheta = (A_im, -A_re); gp (G) is scratch.
template <typename T>
void row_backward(const Rotations<T> &rot, const std::vector<double> &omega, int64_t g_count, const T *table,
                  const T *__restrict__ ch, const T *__restrict__ grow, T *__restrict__ gch, T *__restrict__ gr,
                  T *__restrict__ gp)
{
  std::fill(gp, gp + g_count, T(0));
  const int64_t blocked = g_count - g_count % kLanes;
  for (int64_t m = 0; m < int64_t(omega.size()); ++m) {
    const T a0 = ch[2 * m], a1 = ch[2 * m + 1], w = T(omega[m]);
    const T *__restrict__ c = rot.cos_row(table, m);
    const T *__restrict__ s = rot.sin_row(table, m);
    const T *__restrict__ gm = grow + 2 * m * g_count;
    T g0[kLanes] = {}, g1[kLanes] = {};
    auto term = [&](int64_t g, T &sum0, T &sum1) {
      const T gre = gm[2 * g], gim = gm[2 * g + 1];
      const T are = c[g] * a0 - s[g] * a1, aim = -(c[g] * a1 + s[g] * a0);
      sum0 += gre * c[g] - gim * s[g];
      sum1 -= gre * s[g] + gim * c[g];
      gp[g] += w * (gre * aim - gim * are);
    };
    for (int64_t g = 0; g < blocked; g += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) term(g + l, g0[l], g1[l]);
    for (int64_t g = blocked; g < g_count; ++g) term(g, g0[0], g1[0]);
    T sum0 = 0, sum1 = 0;
    for (int64_t l = 0; l < kLanes; ++l) {
      sum0 += g0[l];
      sum1 += g1[l];
    }
    gch[2 * m] = sum0;
    gch[2 * m + 1] = sum1;
  }
  for (int k = 0; k < 3; ++k) {
    const T *__restrict__ u = rot.axis(k);
    T acc[kLanes] = {};
    for (int64_t g = 0; g < blocked; g += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) acc[l] += gp[g + l] * u[g + l];
    for (int64_t g = blocked; g < g_count; ++g) acc[0] += gp[g] * u[g];
    T sum = 0;
    for (int64_t l = 0; l < kLanes; ++l) sum += acc[l];
    gr[k] = sum;
  }
}

// Per-call state of either stage: the frequencies, rotations and a chunk's scratch rows.
template <typename T>
struct Chunks {
  Chunks(const Sizes &z, const Tensor &omega, const Tensor &directions, const at::TensorOptions &options)
      : z(z),
        f(frequencies_of(omega)),
        rotations(f, directions.to(options.dtype())),
        rows(chunk_rows(z, sizeof(T))),
        a(at::empty({rows, z.width()}, options)),
        tables(at::empty({rows, rotations.table_size()}, options))
  {
  }

  // rotation tables (kept for backward) and coefficient rows of `atoms`
  void make_rows(const std::vector<int64_t> &atoms, const T *pos, const T *channels)
  {
    T *row = a.data_ptr<T>(), *table = tables.data_ptr<T>();
    const int64_t size = rotations.table_size();
    for (size_t k = 0; k < atoms.size(); ++k) {
      const int64_t i = atoms[k];
      rotations(pos + 3 * i, table + k * size);
      coefficient_row(rotations, z.channels, z.directions, table + k * size, channels + 2 * z.channels * i,
                      row + k * z.width());
    }
  }

  // channel and position gradients of `atoms` from their rows' gradient (rows x width)
  void rows_backward(const std::vector<int64_t> &atoms, const T *channels, const T *grad_rows, T *g_channels,
                     T *g_positions)
  {
    const T *table = tables.data_ptr<T>();
    const int64_t size = rotations.table_size();
    std::vector<T> gp(z.directions);
    for (size_t k = 0; k < atoms.size(); ++k) {
      const int64_t i = atoms[k];
      row_backward(rotations, f.omega, z.directions, table + k * size, channels + 2 * z.channels * i,
                   grad_rows + k * z.width(), g_channels + 2 * z.channels * i, g_positions + 3 * i, gp.data());
    }
  }

  Tensor rows_of(size_t count) const { return a.narrow(0, 0, int64_t(count)); }

  const Sizes z;
  const Frequencies f;
  Rotations<T> rotations;
  const int64_t rows;
  Tensor a, tables;
};

// KV[b] as a (2MG, D) matrix
Tensor structure_matrix(const Tensor &kv, int64_t b, const Sizes &z)
{
  return kv.select(0, b).view({z.width(), z.columns});
}

// The rows owned_i v_i of `atoms`, packed (stage 1's values).
template <typename T>
void owned_values(const std::vector<int64_t> &atoms, const T *values, const T *owned, int64_t d_count, T *out)
{
  for (size_t k = 0; k < atoms.size(); ++k) {
    const int64_t i = atoms[k];
    for (int64_t d = 0; d < d_count; ++d) out[k * d_count + d] = values[i * d_count + d] * owned[i];
  }
}

Tensor keys_cpu(const Tensor &positions_in, const Tensor &keys_in, const Tensor &values_in, const Tensor &owned_in,
                const Tensor &batch_in, int64_t n_structures, const Tensor &omega, const Tensor &directions)
{
  const Sizes z = check_keys(positions_in, keys_in, values_in, owned_in, batch_in, n_structures, omega, directions);
  require_cpu("efa::attention_keys", {&positions_in, &keys_in, &values_in, &owned_in, &batch_in, &omega, &directions});
  const Tensor positions = positions_in.contiguous(), keys = keys_in.contiguous(), values = values_in.contiguous();
  const Tensor owned = owned_in.contiguous(), batch = batch_in.contiguous();
  Tensor kv = at::zeros({z.structures, z.channels, z.directions, 2 * z.columns}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "efa::attention_keys", [&] {
    using T = scalar_t;
    Chunks<T> chunks(z, omega, directions, values.options());
    Tensor masked = at::empty({chunks.rows, z.columns}, values.options());
    const T *pos = positions.data_ptr<T>(), *key = keys.data_ptr<T>(), *val = values.data_ptr<T>();
    const T *own = owned.data_ptr<T>();
    for_each_chunk("efa::attention_keys", batch, z.structures, chunks.rows, [&](int64_t i) { return own[i] == T(0); },
                   [&](int64_t b, const std::vector<int64_t> &atoms) {
                     chunks.make_rows(atoms, pos, key);
                     owned_values(atoms, val, own, z.columns, masked.data_ptr<T>());
                     structure_matrix(kv, b, z).addmm_(chunks.rows_of(atoms.size()).t(),
                                                       masked.narrow(0, 0, int64_t(atoms.size())));
                   });
  });
  return kv;
}

Tensor queries_cpu(const Tensor &positions_in, const Tensor &queries_in, const Tensor &kv_in, const Tensor &batch_in,
                   const Tensor &omega, const Tensor &directions)
{
  const Sizes z = check_queries(positions_in, queries_in, kv_in, batch_in, omega, directions);
  require_cpu("efa::attention_queries", {&positions_in, &queries_in, &kv_in, &batch_in, &omega, &directions});
  const Tensor positions = positions_in.contiguous(), queries = queries_in.contiguous(), kv = kv_in.contiguous();
  const Tensor batch = batch_in.contiguous();
  Tensor y = at::zeros({z.atoms, z.columns}, kv.options());
  AT_DISPATCH_FLOATING_TYPES(kv.scalar_type(), "efa::attention_queries", [&] {
    using T = scalar_t;
    Chunks<T> chunks(z, omega, directions, kv.options());
    Tensor out = at::empty({chunks.rows, z.columns}, kv.options());
    const T *pos = positions.data_ptr<T>(), *query = queries.data_ptr<T>();
    T *dst = y.data_ptr<T>();
    for_each_chunk("efa::attention_queries", batch, z.structures, chunks.rows, [](int64_t) { return false; },
                   [&](int64_t b, const std::vector<int64_t> &atoms) {
                     chunks.make_rows(atoms, pos, query);
                     Tensor part = out.narrow(0, 0, int64_t(atoms.size()));
                     at::mm_out(part, chunks.rows_of(atoms.size()), structure_matrix(kv, b, z));
                     const T *src = out.data_ptr<T>();
                     for (size_t k = 0; k < atoms.size(); ++k)
                       std::copy(src + k * z.columns, src + (k + 1) * z.columns, dst + atoms[k] * z.columns);
                   });
  });
  return y;
}

using Grads = std::tuple<Tensor, Tensor, Tensor>;

// Gradients of (positions, keys, values).
Grads keys_backward_cpu(const Tensor &grad_kv_in, const Tensor &positions_in, const Tensor &keys_in,
                        const Tensor &values_in, const Tensor &owned_in, const Tensor &batch_in, const Tensor &omega,
                        const Tensor &directions)
{
  const Sizes z = check_keys(positions_in, keys_in, values_in, owned_in, batch_in, grad_kv_in.size(0), omega, directions);
  require_cpu("efa::attention_keys_backward", {&grad_kv_in, &positions_in, &keys_in, &values_in, &owned_in, &batch_in,
                                               &omega, &directions});
  TORCH_CHECK(grad_kv_in.sizes() == at::IntArrayRef({z.structures, z.channels, z.directions, 2 * z.columns}),
              "efa::attention_keys_backward: grad_kv has shape ", grad_kv_in.sizes(), ", not KV's");
  const Tensor grad_kv = grad_kv_in.contiguous(), positions = positions_in.contiguous(), keys = keys_in.contiguous();
  const Tensor values = values_in.contiguous(), owned = owned_in.contiguous(), batch = batch_in.contiguous();
  Tensor g_positions = at::zeros_like(positions), g_keys = at::zeros_like(keys), g_values = at::zeros_like(values);
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "efa::attention_keys_backward", [&] {
    using T = scalar_t;
    Chunks<T> chunks(z, omega, directions, values.options());
    Tensor masked = at::empty({chunks.rows, z.columns}, values.options());
    Tensor g_masked = at::empty({chunks.rows, z.columns}, values.options());
    Tensor g_rows = at::empty({chunks.rows, z.width()}, values.options());
    const T *pos = positions.data_ptr<T>(), *key = keys.data_ptr<T>(), *val = values.data_ptr<T>();
    const T *own = owned.data_ptr<T>();
    T *gk = g_keys.data_ptr<T>(), *gr = g_positions.data_ptr<T>(), *gv = g_values.data_ptr<T>();
    for_each_chunk("efa::attention_keys_backward", batch, z.structures, chunks.rows,
                   [&](int64_t i) { return own[i] == T(0); },
                   [&](int64_t b, const std::vector<int64_t> &atoms) {
                     const int64_t count = int64_t(atoms.size());
                     chunks.make_rows(atoms, pos, key);
                     owned_values(atoms, val, own, z.columns, masked.data_ptr<T>());
                     const Tensor g_kv_b = structure_matrix(grad_kv, b, z);
                     Tensor gm = g_masked.narrow(0, 0, count), gro = g_rows.narrow(0, 0, count);
                     at::mm_out(gm, chunks.rows_of(count), g_kv_b);
                     at::mm_out(gro, masked.narrow(0, 0, count), g_kv_b.t());
                     const T *gmv = g_masked.data_ptr<T>();
                     for (int64_t k = 0; k < count; ++k) {
                       const int64_t i = atoms[k];
                       for (int64_t d = 0; d < z.columns; ++d) gv[i * z.columns + d] = gmv[k * z.columns + d] * own[i];
                     }
                     chunks.rows_backward(atoms, key, g_rows.data_ptr<T>(), gk, gr);
                   });
  });
  return {g_positions, g_keys, g_values};
}

// Gradients of (positions, queries, kv).
Grads queries_backward_cpu(const Tensor &grad_y_in, const Tensor &positions_in, const Tensor &queries_in,
                           const Tensor &kv_in, const Tensor &batch_in, const Tensor &omega, const Tensor &directions)
{
  const Sizes z = check_queries(positions_in, queries_in, kv_in, batch_in, omega, directions);
  require_cpu("efa::attention_queries_backward", {&grad_y_in, &positions_in, &queries_in, &kv_in, &batch_in, &omega,
                                                  &directions});
  TORCH_CHECK(grad_y_in.sizes() == at::IntArrayRef({z.atoms, z.columns}),
              "efa::attention_queries_backward: grad_y has shape ", grad_y_in.sizes(), ", not y's (", z.atoms, ", ",
              z.columns, ")");
  const Tensor grad_y = grad_y_in.contiguous(), positions = positions_in.contiguous();
  const Tensor queries = queries_in.contiguous(), kv = kv_in.contiguous(), batch = batch_in.contiguous();
  Tensor g_positions = at::zeros_like(positions), g_queries = at::zeros_like(queries), g_kv = at::zeros_like(kv);
  AT_DISPATCH_FLOATING_TYPES(kv.scalar_type(), "efa::attention_queries_backward", [&] {
    using T = scalar_t;
    Chunks<T> chunks(z, omega, directions, kv.options());
    Tensor g_out = at::empty({chunks.rows, z.columns}, kv.options());
    Tensor g_rows = at::empty({chunks.rows, z.width()}, kv.options());
    const T *pos = positions.data_ptr<T>(), *query = queries.data_ptr<T>(), *gy = grad_y.data_ptr<T>();
    T *gq = g_queries.data_ptr<T>(), *gr = g_positions.data_ptr<T>();
    for_each_chunk("efa::attention_queries_backward", batch, z.structures, chunks.rows, [](int64_t) { return false; },
                   [&](int64_t b, const std::vector<int64_t> &atoms) {
                     const int64_t count = int64_t(atoms.size());
                     chunks.make_rows(atoms, pos, query);
                     T *go = g_out.data_ptr<T>();
                     for (int64_t k = 0; k < count; ++k)
                       std::copy(gy + atoms[k] * z.columns, gy + (atoms[k] + 1) * z.columns, go + k * z.columns);
                     const Tensor go_k = g_out.narrow(0, 0, count);
                     Tensor gro = g_rows.narrow(0, 0, count);
                     structure_matrix(g_kv, b, z).addmm_(chunks.rows_of(count).t(), go_k);
                     at::mm_out(gro, go_k, structure_matrix(kv, b, z).t());
                     chunks.rows_backward(atoms, query, g_rows.data_ptr<T>(), gq, gr);
                   });
  });
  return {g_positions, g_queries, g_kv};
}

// Shape-only kernels for meta/fake tensors (torch.export, torch.compile).
Tensor keys_meta(const Tensor &positions, const Tensor &keys, const Tensor &values, const Tensor &owned,
                 const Tensor &batch, int64_t n_structures, const Tensor &omega, const Tensor &directions)
{
  TORCH_CHECK(keys.dim() == 3 && values.dim() == 2 && directions.dim() == 2, "efa::attention_keys: keys must be (N, M, 2), "
              "values (N, D) and directions (G, 3)");
  return at::empty({n_structures, keys.size(1), directions.size(0), 2 * values.size(1)}, values.options());
}

Tensor queries_meta(const Tensor &positions, const Tensor &, const Tensor &kv, const Tensor &, const Tensor &,
                    const Tensor &)
{
  TORCH_CHECK(kv.dim() == 4, "efa::attention_queries: kv must be (B, M, G, 2D), got ", kv.sizes());
  return at::empty({positions.size(0), kv.size(3) / 2}, kv.options());
}

Grads keys_backward_meta(const Tensor &, const Tensor &positions, const Tensor &keys, const Tensor &values,
                         const Tensor &, const Tensor &, const Tensor &, const Tensor &)
{
  return {at::empty_like(positions), at::empty_like(keys), at::empty_like(values)};
}

Grads queries_backward_meta(const Tensor &, const Tensor &positions, const Tensor &queries, const Tensor &kv,
                            const Tensor &, const Tensor &, const Tensor &)
{
  return {at::empty_like(positions), at::empty_like(queries), at::empty_like(kv)};
}

using KeysSignature = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &, int64_t,
                             const Tensor &, const Tensor &);
using KeysBackwardSignature = Grads(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                    const Tensor &, const Tensor &, const Tensor &);
using QueriesSignature = Tensor(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                const Tensor &);
using QueriesBackwardSignature = Grads(const Tensor &, const Tensor &, const Tensor &, const Tensor &, const Tensor &,
                                       const Tensor &, const Tensor &);

void check_constants(const char *op, const Tensor &omega, const Tensor &directions)
{
  TORCH_CHECK(!omega.requires_grad() && !directions.requires_grad(), op,
              ": omega and directions are the model's constant buffers and must not require grad");
}

// A stage's backward: its backward operator on (grad, the saved inputs...) gives the gradients
// of the first three inputs (of `inputs`), which may not be differentiated again.
template <typename Signature, size_t... Saved>
variable_list stage_backward(const char *name, AutogradContext *ctx, const Tensor &grad, size_t inputs,
                             std::index_sequence<Saved...>)
{
  const variable_list s = ctx->get_saved_variables();
  variable_list out(inputs);
  if (!grad.defined()) return out;
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(out[0], out[1], out[2]) = typed_op<Signature>(name).call(grad, s[Saved]...);
  }
  forbid_double_backward(kNoDoubleBackward, out, {grad, s[0], s[1], s[2], s[3]});
  return out;
}

struct AttentionKeys : public torch::autograd::Function<AttentionKeys> {
  static Tensor forward(AutogradContext *ctx, const Tensor &positions, const Tensor &keys, const Tensor &values,
                        const Tensor &owned, const Tensor &batch, int64_t n_structures, const Tensor &omega,
                        const Tensor &directions)
  {
    static const auto op = typed_op<KeysSignature>("efa::attention_keys");
    check_constants("efa::attention_keys", omega, directions);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({positions, keys, values, owned, batch, omega, directions});
    return op.call(positions, keys, values, owned, batch, n_structures, omega, directions);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    return stage_backward<KeysBackwardSignature>("efa::attention_keys_backward", ctx, grads[0], 8,
                                                 std::make_index_sequence<7>{});
  }
};

struct AttentionQueries : public torch::autograd::Function<AttentionQueries> {
  static Tensor forward(AutogradContext *ctx, const Tensor &positions, const Tensor &queries, const Tensor &kv,
                        const Tensor &batch, const Tensor &omega, const Tensor &directions)
  {
    static const auto op = typed_op<QueriesSignature>("efa::attention_queries");
    check_constants("efa::attention_queries", omega, directions);
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    ctx->save_for_backward({positions, queries, kv, batch, omega, directions});
    return op.call(positions, queries, kv, batch, omega, directions);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    return stage_backward<QueriesBackwardSignature>("efa::attention_queries_backward", ctx, grads[0], 6,
                                                    std::make_index_sequence<6>{});
  }
};

Tensor keys_autograd(const Tensor &positions, const Tensor &keys, const Tensor &values, const Tensor &owned,
                     const Tensor &batch, int64_t n_structures, const Tensor &omega, const Tensor &directions)
{
  return AttentionKeys::apply(positions, keys, values, owned, batch, n_structures, omega, directions);
}

Tensor queries_autograd(const Tensor &positions, const Tensor &queries, const Tensor &kv, const Tensor &batch,
                        const Tensor &omega, const Tensor &directions)
{
  return AttentionQueries::apply(positions, queries, kv, batch, omega, directions);
}
}  // namespace

AttentionSizes check_keys(const Tensor &positions, const Tensor &keys, const Tensor &values, const Tensor &owned,
                 const Tensor &batch, int64_t n_structures, const Tensor &omega, const Tensor &directions)
{
  const char *op = "efa::attention_keys";
  AttentionSizes z = check_rotation_inputs(op, positions, keys, "keys", batch, omega, directions);
  TORCH_CHECK(values.dim() == 2 && values.size(0) == z.atoms, op, ": values must be (N, D) with N = ", z.atoms,
              ", got ", values.sizes());
  TORCH_CHECK(owned.dim() == 1 && owned.size(0) == z.atoms, op, ": owned must be (N,) = (", z.atoms, ",), got ",
              owned.sizes());
  for (const Tensor *t : {&values, &owned}) {
    TORCH_CHECK(t->scalar_type() == positions.scalar_type(), op, ": values and owned must have the dtype of positions (",
                positions.scalar_type(), "), got ", t->scalar_type());
  }
  TORCH_CHECK(n_structures >= 0, op, ": n_structures must be 0 or more, got ", n_structures);
  z.columns = values.size(1);
  z.structures = n_structures;
  return z;
}

AttentionSizes check_queries(const Tensor &positions, const Tensor &queries, const Tensor &kv, const Tensor &batch,
                    const Tensor &omega, const Tensor &directions)
{
  const char *op = "efa::attention_queries";
  AttentionSizes z = check_rotation_inputs(op, positions, queries, "queries", batch, omega, directions);
  TORCH_CHECK(kv.dim() == 4 && kv.size(1) == z.channels && kv.size(2) == z.directions && kv.size(3) % 2 == 0, op,
              ": kv must be (B, M, G, 2D) with M = ", z.channels, ", G = ", z.directions, ", got ", kv.sizes());
  TORCH_CHECK(kv.scalar_type() == positions.scalar_type(), op, ": kv must have the dtype of positions (",
              positions.scalar_type(), "), got ", kv.scalar_type());
  z.columns = kv.size(3) / 2;
  z.structures = kv.size(0);
  return z;
}

// The forward schemas must match efa_deploy/ops.py (pure-torch registration, efa_deploy/model/erope.py).
TORCH_LIBRARY_FRAGMENT(efa, m)
{
  m.def("attention_keys(Tensor positions, Tensor keys, Tensor values, Tensor owned, Tensor batch, int n_structures, "
        "Tensor omega, Tensor directions) -> Tensor");
  m.def("attention_keys_backward(Tensor grad_kv, Tensor positions, Tensor keys, Tensor values, Tensor owned, "
        "Tensor batch, Tensor omega, Tensor directions) -> (Tensor, Tensor, Tensor)");
  m.def("attention_queries(Tensor positions, Tensor queries, Tensor kv, Tensor batch, Tensor omega, "
        "Tensor directions) -> Tensor");
  m.def("attention_queries_backward(Tensor grad_y, Tensor positions, Tensor queries, Tensor kv, Tensor batch, "
        "Tensor omega, Tensor directions) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(efa, CPU, m)
{
  m.impl("attention_keys", keys_cpu);
  m.impl("attention_keys_backward", keys_backward_cpu);
  m.impl("attention_queries", queries_cpu);
  m.impl("attention_queries_backward", queries_backward_cpu);
}

TORCH_LIBRARY_IMPL(efa, Meta, m)
{
  m.impl("attention_keys", keys_meta);
  m.impl("attention_keys_backward", keys_backward_meta);
  m.impl("attention_queries", queries_meta);
  m.impl("attention_queries_backward", queries_backward_meta);
}

TORCH_LIBRARY_IMPL(efa, Autograd, m)
{
  m.impl("attention_keys", keys_autograd);
  m.impl("attention_queries", queries_autograd);
}

}  // namespace efa
