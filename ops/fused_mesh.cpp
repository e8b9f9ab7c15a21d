// efa::mesh_spread and efa::mesh_gather: cardinal B-spline spreading onto, and interpolation from,
// a periodic K1 x K2 x K3 mesh (smooth particle-mesh Ewald, Essmann et al., J. Chem. Phys. 103,
// 8577 (1995)): the atom-mesh steps of the periodic EFA stages on the mesh. The reference, and the
// operators' pure-torch registration, are spread_reference / gather_reference in
// efa_deploy/model/mesh.py.
//
//   mesh_spread(u (N, 3), values (N, C), offset (N,), mesh, rows, order) -> Q (rows, C)
//       Q[offset_j + row(k)] += W_j(k) values_j            over the P^3 stencil points k of atom j
//   mesh_gather(u (N, 3), grid (rows, C), offset (N,), mesh, order) -> Z (N, C)
//       Z_j = sum_k W_j(k) grid[offset_j + row(k)]
//
// u_j are mesh coordinates, W_j(k) = prod_a M_P(f_a + i_a) with f = u - floor(u), and the point
// k_a = (floor(u_a) - i_a) mod K_a; row(k) = (k_1 K_2 + k_2) K_3 + k_3. Nothing per atom x
// stencil is stored: backward recomputes the weights (first derivatives only, as the other fused
// operators: training keeps the reference path).
#include <torch/library.h>
#include <torch/torch.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "fused_autograd.h"

// an AVX2 + FMA copy of the stencil loop on x86-64 with GCC, chosen at load time where the CPU has them
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define EFA_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define EFA_VECTOR_CLONES
#endif

namespace efa {
namespace {

using torch::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int kMaxOrder = 12;
constexpr const char *kNoDoubleBackward =
    "efa::mesh_spread / efa::mesh_gather (the fused mesh steps of periodic EFA) have no second derivative; "
    "train with the reference path: efa_deploy.model.use_fused(model, False)";

// One atom's stencil: per axis the B-spline weights, their derivatives and the mesh indices.
template <typename T>
struct Stencil {
  T w[3][kMaxOrder], dw[3][kMaxOrder];
  int64_t index[3][kMaxOrder];

  Stencil(const T *u, const std::vector<int64_t> &mesh, int order)
  {
    for (int a = 0; a < 3; ++a) {
      const T base = std::floor(u[a]);
      const T f = u[a] - base;
      // A_1 = [1]; A_k[i] = ((f + i) A_{k-1}[i] + (k - f - i) A_{k-1}[i - 1]) / (k - 1)
      T level[kMaxOrder] = {T(1)};
      for (int k = 2; k <= order; ++k) {
        if (k == order) {  // dM_P(x)/dx = M_{P-1}(x) - M_{P-1}(x - 1)
          for (int i = 0; i < order; ++i)
            dw[a][i] = (i < order - 1 ? level[i] : T(0)) - (i > 0 ? level[i - 1] : T(0));
        }
        T next[kMaxOrder];
        for (int i = 0; i < k; ++i) {
          const T x = f + T(i);
          next[i] = (x * (i < k - 1 ? level[i] : T(0)) + (T(k) - x) * (i > 0 ? level[i - 1] : T(0))) / T(k - 1);
        }
        for (int i = 0; i < k; ++i) level[i] = next[i];
      }
      const int64_t k_a = mesh[a];
      const int64_t first = static_cast<int64_t>(base);
      for (int i = 0; i < order; ++i) {
        w[a][i] = level[i];
        index[a][i] = ((first - i) % k_a + k_a) % k_a;
      }
    }
  }
};

std::vector<int64_t> check_inputs(const char *op, const Tensor &u, const Tensor &rows_by_atom, const Tensor &offset,
                                  at::IntArrayRef mesh, int64_t order)
{
  TORCH_CHECK(u.dim() == 2 && u.size(1) == 3, op, ": u must be (N, 3), got ", u.sizes());
  TORCH_CHECK(rows_by_atom.dim() == 2 && rows_by_atom.size(0) == u.size(0), op, ": values must be (N, C) for ",
              u.size(0), " atoms, got ", rows_by_atom.sizes());
  TORCH_CHECK(offset.dim() == 1 && offset.size(0) == u.size(0) && offset.scalar_type() == at::kLong, op,
              ": offset must be (N,) int64");
  TORCH_CHECK(mesh.size() == 3 && mesh[0] > 0 && mesh[1] > 0 && mesh[2] > 0, op, ": mesh must be 3 positive sizes");
  TORCH_CHECK(order >= 3 && order <= kMaxOrder, op, ": order must be 3 to ", kMaxOrder, ", got ", order);
  TORCH_CHECK(u.scalar_type() == rows_by_atom.scalar_type(), op, ": u and the values must have one dtype");
  TORCH_CHECK(u.device().is_cpu(), op, ": CPU tensors only");
  return {mesh[0], mesh[1], mesh[2]};
}

void check_rows(const char *op, const Tensor &offset, at::IntArrayRef mesh, int64_t rows)
{
  if (offset.numel() == 0) return;
  const int64_t top = offset.max().item<int64_t>() + mesh[0] * mesh[1] * mesh[2];
  TORCH_CHECK(offset.min().item<int64_t>() >= 0 && top <= rows, op, ": offsets + mesh exceed the ", rows, " mesh rows");
}

// Atoms in the order of their first stencil row, so that consecutive atoms share mesh rows in
// cache (3-4x faster than a random order on a 1e5-point mesh); every output row of an atom is its
// own, so only the order of the additions into shared mesh rows changes.
std::vector<int64_t> mesh_order(const Tensor &u, const Tensor &offset, const std::vector<int64_t> &mesh)
{
  const Tensor base = at::floor(u.detach()).to(at::kLong);
  const Tensor k = at::remainder(base, at::tensor(mesh, offset.options()));
  const Tensor key = offset + (k.select(1, 0) * mesh[1] + k.select(1, 1)) * mesh[2] + k.select(1, 2);
  const Tensor sorted = at::argsort(key, /*stable=*/true).contiguous();
  return std::vector<int64_t>(sorted.data_ptr<int64_t>(), sorted.data_ptr<int64_t>() + sorted.numel());
}

#if defined(__GNUC__)
#define EFA_INLINE __attribute__((always_inline)) inline
#else
#define EFA_INLINE inline
#endif

// Packs of channels: GCC/Clang vector types of 32 bytes (one AVX register; two SSE registers in
// the default clone), or a single scalar for the channels left over.
#if defined(__GNUC__)
typedef float FloatPack __attribute__((vector_size(32)));
typedef double DoublePack __attribute__((vector_size(32)));
template <typename T>
struct PackOf;
template <>
struct PackOf<float> {
  using type = FloatPack;
};
template <>
struct PackOf<double> {
  using type = DoublePack;
};
template <typename T>
using Vec = typename PackOf<T>::type;
#endif

template <typename P>
EFA_INLINE P load(const void *p)
{
  P x;
  std::memcpy(&x, p, sizeof(P));
  return x;
}

template <typename P>
EFA_INLINE void store(void *p, const P &x)
{
  std::memcpy(p, &x, sizeof(P));
}

// One atom's stencil for NP packs P of channels from c0 (a compile-time width, so that the sums
// below stay in registers), contracted separably: per (i, j) line of the stencil
//   a = sum_k M_k grid[row],  b = sum_k M'_k grid[row]          (k: the axis-3 points, neighbouring rows)
// and then z += w_i w_j a and, for the position terms, G_1 += w'_i w_j a, G_2 += w_i w'_j a,
// G_3 += w_i w_j b (dW/du_a = w' along axis a times w along the others); gu_a += G_a . x at the end.
//   Gather: z_j += sum_k W grid[row]      Spread: spread[row] += W spread_values_j
//   Dot:    gu_j,a += sum_k dW/du_a (grid[row] . dot_with_j)
template <typename T, typename P, int NP, bool Gather, bool Spread, bool Dot>
EFA_INLINE void stencil_block(const Stencil<T> &s, int64_t k2, int64_t k3, int order, int64_t first_row, int64_t c,
                              int64_t c0, const T *grid, T *z, const T *spread_values, T *spread, const T *x, T *gu)
{
  constexpr int W = sizeof(P) / sizeof(T);
  P zs[NP], g1[NP], g2[NP], g3[NP], sv[NP];
  for (int p = 0; p < NP; ++p) {
    zs[p] = g1[p] = g2[p] = g3[p] = P{};
    if constexpr (Spread) sv[p] = load<P>(spread_values + c0 + p * W);
  }
  for (int i = 0; i < order; ++i) {
    const int64_t r1 = first_row + s.index[0][i] * k2 * k3;
    for (int j = 0; j < order; ++j) {
      const int64_t r12 = r1 + s.index[1][j] * k3;
      const T w12 = s.w[0][i] * s.w[1][j];
      P a[NP], b[NP];
      for (int p = 0; p < NP; ++p) a[p] = b[p] = P{};
      for (int k = 0; k < order; ++k) {
        const int64_t row = (r12 + s.index[2][k]) * c + c0;
        if constexpr (Gather || Dot) {
          const T w = s.w[2][k], dw = s.dw[2][k];
          for (int p = 0; p < NP; ++p) {
            const P in = load<P>(grid + row + p * W);
            a[p] += w * in;
            if constexpr (Dot) b[p] += dw * in;
          }
        }
        if constexpr (Spread) {
          const T w = w12 * s.w[2][k];
          for (int p = 0; p < NP; ++p) {
            T *target = spread + row + p * W;
            store<P>(target, load<P>(target) + w * sv[p]);
          }
        }
      }
      if constexpr (Gather)
        for (int p = 0; p < NP; ++p) zs[p] += w12 * a[p];
      if constexpr (Dot) {
        const T d1 = s.dw[0][i] * s.w[1][j], d2 = s.w[0][i] * s.dw[1][j];
        for (int p = 0; p < NP; ++p) {
          g1[p] += d1 * a[p];
          g2[p] += d2 * a[p];
          g3[p] += w12 * b[p];
        }
      }
    }
  }
  if constexpr (Gather)
    for (int p = 0; p < NP; ++p) store<P>(z + c0 + p * W, load<P>(z + c0 + p * W) + zs[p]);
  if constexpr (Dot) {
    P d[3] = {P{}, P{}, P{}};
    for (int p = 0; p < NP; ++p) {
      const P xp = load<P>(x + c0 + p * W);
      d[0] += g1[p] * xp;
      d[1] += g2[p] * xp;
      d[2] += g3[p] * xp;
    }
    for (int a = 0; a < 3; ++a) {
      T sum = 0;
      for (int l = 0; l < W; ++l) sum += reinterpret_cast<const T *>(&d[a])[l];
      gu[a] += sum;
    }
  }
}

// The channels in blocks of 4 vectors (128 bytes), then one vector, then one channel at a time
// (two vectors at a time for the spread with position terms was 1.4x slower at 256 channels).
template <typename T, bool Gather, bool Spread, bool Dot>
EFA_INLINE void stencil_blocks(const Stencil<T> &s, int64_t k2, int64_t k3, int order, int64_t first_row, int64_t c,
                               const T *grid, T *z, const T *spread_values, T *spread, const T *x, T *gu)
{
  int64_t c0 = 0;
#if defined(__GNUC__)
  constexpr int W = sizeof(Vec<T>) / sizeof(T);
  for (; c0 + 4 * W <= c; c0 += 4 * W)
    stencil_block<T, Vec<T>, 4, Gather, Spread, Dot>(s, k2, k3, order, first_row, c, c0, grid, z, spread_values,
                                                     spread, x, gu);
  for (; c0 + W <= c; c0 += W)
    stencil_block<T, Vec<T>, 1, Gather, Spread, Dot>(s, k2, k3, order, first_row, c, c0, grid, z, spread_values,
                                                     spread, x, gu);
#endif
  for (; c0 < c; ++c0)
    stencil_block<T, T, 1, Gather, Spread, Dot>(s, k2, k3, order, first_row, c, c0, grid, z, spread_values, spread, x,
                                                gu);
}

// One pass over every atom's stencil for both forward steps and both backward steps:
//   z      (N, C):    z_j += sum_k W grid[row]                               (Gather)
//   spread (rows, C): spread[row] += W spread_values_j                       (Spread)
//   gu     (N, 3):    gu_j,a = sum_k dW/du_a (grid[row] . dot_with_j)        (Dot)
// (which of the three is a template argument, so each use is its own branch-free loop; channel
// blocks of 128 bytes; the AVX2 + FMA clone is the faster one where the CPU has it)
template <typename T, bool Gather, bool Spread, bool Dot>
EFA_VECTOR_CLONES void stencil_pass(const T *u, const T *grid, const int64_t *offset, const std::vector<int64_t> &atoms,
                                    int64_t c, const std::vector<int64_t> &mesh, int order, T *z,
                                    const T *spread_values, T *spread, const T *dot_with, T *gu)
{
  for (const int64_t j : atoms) {
    const Stencil<T> s(u + 3 * j, mesh, order);
    stencil_blocks<T, Gather, Spread, Dot>(s, mesh[1], mesh[2], order, offset[j], c, grid, Gather ? z + j * c : nullptr,
                                           Spread ? spread_values + j * c : nullptr, spread,
                                           Dot ? dot_with + j * c : nullptr, Dot ? gu + 3 * j : nullptr);
  }
}

Tensor spread_cpu(const Tensor &u_in, const Tensor &values_in, const Tensor &offset_in, at::IntArrayRef mesh_in,
                  int64_t rows, int64_t order)
{
  const auto mesh = check_inputs("efa::mesh_spread", u_in, values_in, offset_in, mesh_in, order);
  check_rows("efa::mesh_spread", offset_in, mesh_in, rows);
  const Tensor u = u_in.contiguous(), values = values_in.contiguous(), offset = offset_in.contiguous();
  Tensor q = at::zeros({rows, values.size(1)}, values.options());
  AT_DISPATCH_FLOATING_TYPES(values.scalar_type(), "efa::mesh_spread", [&] {
    stencil_pass<scalar_t, false, true, false>(u.data_ptr<scalar_t>(), nullptr, offset.data_ptr<int64_t>(),
                                               mesh_order(u, offset, mesh), values.size(1), mesh, int(order), nullptr,
                                               values.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), nullptr, nullptr);
  });
  return q;
}

Tensor gather_cpu(const Tensor &u_in, const Tensor &grid_in, const Tensor &offset_in, at::IntArrayRef mesh_in,
                  int64_t order)
{
  TORCH_CHECK(grid_in.dim() == 2, "efa::mesh_gather: grid must be (rows, C), got ", grid_in.sizes());
  const auto mesh = check_inputs("efa::mesh_gather", u_in, at::empty({u_in.size(0), 0}, grid_in.options()), offset_in,
                                 mesh_in, order);
  check_rows("efa::mesh_gather", offset_in, mesh_in, grid_in.size(0));
  const Tensor u = u_in.contiguous(), grid = grid_in.contiguous(), offset = offset_in.contiguous();
  Tensor z = at::zeros({u.size(0), grid.size(1)}, grid.options());
  AT_DISPATCH_FLOATING_TYPES(grid.scalar_type(), "efa::mesh_gather", [&] {
    stencil_pass<scalar_t, true, false, false>(u.data_ptr<scalar_t>(), grid.data_ptr<scalar_t>(),
                                               offset.data_ptr<int64_t>(), mesh_order(u, offset, mesh), grid.size(1),
                                               mesh, int(order), z.data_ptr<scalar_t>(), nullptr, nullptr, nullptr,
                                               nullptr);
  });
  return z;
}

// d/d(u, values) of sum(spread(u, values) * grad): (gather of grad, the position terms)
std::tuple<Tensor, Tensor> spread_backward(const Tensor &grad, const Tensor &u, const Tensor &values,
                                           const Tensor &offset, const std::vector<int64_t> &mesh, int order)
{
  const Tensor g = grad.contiguous(), uc = u.contiguous(), v = values.contiguous(), off = offset.contiguous();
  Tensor g_values = at::zeros_like(v), g_u = at::zeros_like(uc);
  AT_DISPATCH_FLOATING_TYPES(v.scalar_type(), "efa::mesh_spread backward", [&] {
    stencil_pass<scalar_t, true, false, true>(uc.data_ptr<scalar_t>(), g.data_ptr<scalar_t>(), off.data_ptr<int64_t>(),
                                              mesh_order(uc, off, mesh), v.size(1), mesh, order,
                                              g_values.data_ptr<scalar_t>(), nullptr, nullptr, v.data_ptr<scalar_t>(),
                                              g_u.data_ptr<scalar_t>());
  });
  return {g_u, g_values};
}

// d/d(u, grid) of sum(gather(u, grid) * grad): (the position terms, spread of grad)
std::tuple<Tensor, Tensor> gather_backward(const Tensor &grad, const Tensor &u, const Tensor &grid,
                                           const Tensor &offset, const std::vector<int64_t> &mesh, int order)
{
  const Tensor g = grad.contiguous(), uc = u.contiguous(), gr = grid.contiguous(), off = offset.contiguous();
  Tensor g_grid = at::zeros_like(gr), g_u = at::zeros_like(uc);
  AT_DISPATCH_FLOATING_TYPES(gr.scalar_type(), "efa::mesh_gather backward", [&] {
    stencil_pass<scalar_t, false, true, true>(uc.data_ptr<scalar_t>(), gr.data_ptr<scalar_t>(), off.data_ptr<int64_t>(),
                                              mesh_order(uc, off, mesh), gr.size(1), mesh, order, nullptr,
                                              g.data_ptr<scalar_t>(), g_grid.data_ptr<scalar_t>(),
                                              g.data_ptr<scalar_t>(), g_u.data_ptr<scalar_t>());
  });
  return {g_u, g_grid};
}

// Both steps save (u, their second input, offset), the mesh and the order, and differentiate u
// and the second input (with `backward`, which may not be differentiated again).
void save_step(AutogradContext *ctx, const Tensor &u, const Tensor &second, const Tensor &offset, at::IntArrayRef mesh,
               int64_t order)
{
  ctx->save_for_backward({u, second, offset});
  ctx->saved_data["mesh"] = mesh.vec();
  ctx->saved_data["order"] = order;
}

template <typename Backward>
variable_list step_backward(AutogradContext *ctx, const Tensor &grad, size_t inputs, Backward backward)
{
  const variable_list s = ctx->get_saved_variables();
  variable_list out(inputs);
  if (!grad.defined()) return out;
  variable_list differentiable(2);
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    std::tie(differentiable[0], differentiable[1]) =
        backward(grad, s[0], s[1], s[2], ctx->saved_data["mesh"].toIntVector(), int(ctx->saved_data["order"].toInt()));
  }
  forbid_double_backward(kNoDoubleBackward, differentiable, {grad, s[0], s[1]});
  out[0] = differentiable[0];
  out[1] = differentiable[1];
  return out;
}

struct MeshSpread : public torch::autograd::Function<MeshSpread> {
  static Tensor forward(AutogradContext *ctx, const Tensor &u, const Tensor &values, const Tensor &offset,
                        at::IntArrayRef mesh, int64_t rows, int64_t order)
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    save_step(ctx, u, values, offset, mesh, order);
    return spread_cpu(u, values, offset, mesh, rows, order);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    return step_backward(ctx, grads[0], 6, spread_backward);
  }
};

struct MeshGather : public torch::autograd::Function<MeshGather> {
  static Tensor forward(AutogradContext *ctx, const Tensor &u, const Tensor &grid, const Tensor &offset,
                        at::IntArrayRef mesh, int64_t order)
  {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    save_step(ctx, u, grid, offset, mesh, order);
    return gather_cpu(u, grid, offset, mesh, order);
  }

  static variable_list backward(AutogradContext *ctx, variable_list grads)
  {
    return step_backward(ctx, grads[0], 5, gather_backward);
  }
};

Tensor spread_autograd(const Tensor &u, const Tensor &values, const Tensor &offset, at::IntArrayRef mesh, int64_t rows,
                       int64_t order)
{
  return MeshSpread::apply(u, values, offset, mesh, rows, order);
}

Tensor gather_autograd(const Tensor &u, const Tensor &grid, const Tensor &offset, at::IntArrayRef mesh, int64_t order)
{
  return MeshGather::apply(u, grid, offset, mesh, order);
}

Tensor spread_meta(const Tensor &, const Tensor &values, const Tensor &, at::IntArrayRef, int64_t rows, int64_t)
{
  return at::empty({rows, values.size(1)}, values.options());
}

Tensor gather_meta(const Tensor &u, const Tensor &grid, const Tensor &, at::IntArrayRef, int64_t)
{
  return at::empty({u.size(0), grid.size(1)}, grid.options());
}

}  // namespace

// The schemas must match efa_deploy/ops.py (pure-torch registration: efa_deploy/model/mesh.py).
TORCH_LIBRARY_FRAGMENT(efa, m)
{
  m.def("mesh_spread(Tensor u, Tensor values, Tensor offset, int[] mesh, int rows, int order) -> Tensor");
  m.def("mesh_gather(Tensor u, Tensor grid, Tensor offset, int[] mesh, int order) -> Tensor");
}

TORCH_LIBRARY_IMPL(efa, CPU, m)
{
  m.impl("mesh_spread", spread_cpu);
  m.impl("mesh_gather", gather_cpu);
}

TORCH_LIBRARY_IMPL(efa, Meta, m)
{
  m.impl("mesh_spread", spread_meta);
  m.impl("mesh_gather", gather_meta);
}

TORCH_LIBRARY_IMPL(efa, Autograd, m)
{
  m.impl("mesh_spread", spread_autograd);
  m.impl("mesh_gather", gather_autograd);
}

}  // namespace efa
