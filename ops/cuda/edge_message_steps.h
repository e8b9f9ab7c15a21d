// The per-thread steps of the efa::edge_message CUDA kernels (edge_message.cu), as functions that
// compile for the device (nvcc) and for the host (any C++ compiler): emulate.cpp runs the same
// steps on the CPU, edge after edge, so that tests/test_cuda_ops.py checks their arithmetic and
// indexing on machines without a GPU. Between steps the kernels synchronise the block; the steps
// of one edge touch only that edge's part of shared memory (its `scratch` here).
//
// Per edge e (E edges, F features, R radial functions), with r = |d_e|, u = d_e / r:
//   geometry[0..4] = r, u, envelope;  rbf[k] = sin(n_pi_k r) / r
//   forward, thread i:  dx[recv, i] += f_s,i w_i en;  dv[recv, c, i] += v_s,c,i w'_i en f_s,F+i + ...
//   backward, thread i: the sender's gradients, the radial-weight gradients g_rad (3F) and the
//     feature terms (4F: envelope, unit x, y, z); then per k the basis term; then thread 0: g_d.
#pragma once

#include <cmath>
#include <cstdint>

#include "edge_message.h"

#if defined(__CUDACC__)
#define EFA_STEP __host__ __device__ inline
#else
#define EFA_STEP inline
#endif

namespace efa {
namespace cuda {
namespace steps {

// shared values per edge: geometry (5), basis (R) [, backward: g_rad (3F), terms (4F), basis terms (R)]
EFA_STEP int64_t scratch_per_edge(int64_t features, int64_t radial, bool backward)
{
  return 5 + radial + (backward ? 7 * features + radial : 0);
}

template <typename T>
EFA_STEP void add_to(T *target, T value)
{
#if defined(__CUDA_ARCH__)
  atomicAdd(target, value);
#else
  *target += value;
#endif
}

// r, unit (3) and envelope of edge e into geometry[0..4]
template <typename T>
EFA_STEP void geometry_of(const EdgeMessageArgs<T> &a, int64_t e, T *geometry)
{
  using std::cos;
  using std::sqrt;
  const T x = a.d[3 * e], y = a.d[3 * e + 1], z = a.d[3 * e + 2];
  const T r = sqrt(x * x + y * y + z * z);
  geometry[0] = r;
  geometry[1] = x / r;
  geometry[2] = y / r;
  geometry[3] = z / r;
  geometry[4] = r < a.cutoff ? T(0.5) * (cos(T(M_PI) * r / a.cutoff) + T(1)) : T(0);
}

// basis function k of edge e (after geometry_of), also into rbf_out (E, R) if not null
template <typename T>
EFA_STEP void basis_of(const EdgeMessageArgs<T> &a, int64_t e, int64_t k, const T *geometry, T *rbf, T *rbf_out)
{
  using std::sin;
  rbf[k] = sin(a.n_pi[k] * geometry[0]) / geometry[0];
  if (rbf_out != nullptr) rbf_out[e * a.radial + k] = rbf[k];
}

// the three radial weights of feature i: rows i, F + i, 2F + i of W rbf + b
template <typename T>
EFA_STEP void radial_weights(const EdgeMessageArgs<T> &a, const T *rbf, int64_t i, T *w)
{
  for (int q = 0; q < 3; ++q) {
    const int64_t row = q * a.features + i;
    T acc = a.bias[row];
    for (int64_t k = 0; k < a.radial; ++k) acc += a.weight[row * a.radial + k] * rbf[k];
    w[q] = acc;
  }
}

// forward, feature i of edge e: its messages into the receiver's rows of dx (N, F), dv (N, 3, F)
template <typename T>
EFA_STEP void forward_feature(const EdgeMessageArgs<T> &a, int64_t e, int64_t i, const T *geometry, const T *rbf,
                              T *dx, T *dv)
{
  const int64_t f = a.features, s = a.sender[e], r = a.receiver[e];
  T w[3];
  radial_weights(a, rbf, i, w);
  const T en = geometry[4];
  const T *fs = a.filter + s * 3 * f, *vs = a.vec + s * 3 * f;
  add_to(dx + r * f + i, fs[i] * w[0] * en);
  const T along = fs[f + i] * w[1] * en, across = fs[2 * f + i] * w[2] * en;
  for (int c = 0; c < 3; ++c) add_to(dv + r * 3 * f + c * f + i, vs[c * f + i] * along + across * geometry[1 + c]);
}

// backward, feature i of edge e: the sender's gradients (g_filter, g_vec), and into the edge's
// scratch g_rad (3F) and terms (4F); g_radial (E, 3F) too if not null
template <typename T>
EFA_STEP void backward_feature(const EdgeMessageArgs<T> &a, int64_t e, int64_t i, const T *geometry, const T *rbf,
                               const T *grad_dx, const T *grad_dv, T *g_filter, T *g_vec, T *g_rad, T *terms,
                               T *g_radial)
{
  const int64_t f = a.features, s = a.sender[e], r = a.receiver[e];
  T w[3];
  radial_weights(a, rbf, i, w);
  const T en = geometry[4], u[3] = {geometry[1], geometry[2], geometry[3]};
  const T *fs = a.filter + s * 3 * f, *vs = a.vec + s * 3 * f;
  const T g_ds = grad_dx[r * f + i];
  const T g[3] = {grad_dv[r * 3 * f + i], grad_dv[r * 3 * f + f + i], grad_dv[r * 3 * f + 2 * f + i]};
  const T g_dvv = g[0] * vs[i] + g[1] * vs[f + i] + g[2] * vs[2 * f + i];
  const T g_dvs = g[0] * u[0] + g[1] * u[1] + g[2] * u[2];
  const T fw_s = fs[i] * w[0], fw_v = fs[f + i] * w[1], fw_u = fs[2 * f + i] * w[2];
  const T dvv = fw_v * en, dvs = fw_u * en;
  for (int c = 0; c < 3; ++c) add_to(g_vec + s * 3 * f + c * f + i, g[c] * dvv);
  add_to(g_filter + s * 3 * f + i, g_ds * w[0] * en);
  add_to(g_filter + s * 3 * f + f + i, g_dvv * w[1] * en);
  add_to(g_filter + s * 3 * f + 2 * f + i, g_dvs * w[2] * en);
  const T gr[3] = {g_ds * fs[i] * en, g_dvv * fs[f + i] * en, g_dvs * fs[2 * f + i] * en};
  for (int q = 0; q < 3; ++q) {
    g_rad[q * f + i] = gr[q];
    if (g_radial != nullptr) g_radial[e * 3 * f + q * f + i] = gr[q];
  }
  terms[i] = g_ds * fw_s + g_dvv * fw_v + g_dvs * fw_u;              // d / d envelope
  for (int c = 0; c < 3; ++c) terms[(1 + c) * f + i] = g[c] * dvs;  // d / d unit_c
}

// basis function k's share of d / dr: (sum_j g_rad_j W_jk) d rbf_k / dr, d rbf_k / dr = (n cos(n r) - rbf_k) / r
template <typename T>
EFA_STEP void basis_term(const EdgeMessageArgs<T> &a, int64_t k, const T *geometry, const T *rbf, const T *g_rad,
                         T *basis_terms)
{
  using std::cos;
  T g_basis = 0;
  for (int64_t j = 0; j < 3 * a.features; ++j) g_basis += g_rad[j] * a.weight[j * a.radial + k];
  const T r = geometry[0], n = a.n_pi[k];
  basis_terms[k] = g_basis * (n * cos(n * r) - rbf[k]) / r;
}

// g_d of edge e from its geometry, feature terms and basis terms (one thread)
template <typename T>
EFA_STEP void edge_gradient(const EdgeMessageArgs<T> &a, int64_t e, const T *geometry, const T *terms,
                            const T *basis_terms, T *g_d)
{
  using std::sin;
  const int64_t f = a.features;
  T sums[4] = {0, 0, 0, 0};
  for (int q = 0; q < 4; ++q)
    for (int64_t j = 0; j < f; ++j) sums[q] += terms[q * f + j];
  const T r = geometry[0], u[3] = {geometry[1], geometry[2], geometry[3]};
  T g_r = 0;
  for (int64_t k = 0; k < a.radial; ++k) g_r += basis_terms[k];
  if (r < a.cutoff) g_r += sums[0] * (-T(0.5) * T(M_PI) / a.cutoff) * sin(T(M_PI) * r / a.cutoff);
  const T along = sums[1] * u[0] + sums[2] * u[1] + sums[3] * u[2];
  // unit = d / r, r = |d|: d unit / d d = (I - u u^T) / r, d r / d d = u
  for (int c = 0; c < 3; ++c) g_d[3 * e + c] = (sums[1 + c] - along * u[c]) / r + g_r * u[c];
}

}  // namespace steps
}  // namespace cuda
}  // namespace efa
