// The efa::edge_message CUDA kernels' steps (edge_message_steps.h) run on the CPU, edge after edge,
// in the order the kernels run them: tests/test_cuda_ops.py builds this file with the host C++
// compiler and checks the steps' arithmetic and indexing against the CPU operator on machines
// without a GPU. Not part of any library. float64, plain arrays.
#include <cstdint>
#include <vector>

#include "edge_message_steps.h"

namespace {

using efa::cuda::EdgeMessageArgs;
namespace steps = efa::cuda::steps;

EdgeMessageArgs<double> args_of(const double *filter, const double *vec, const double *d, const double *n_pi,
                                const double *weight, const double *bias, const int64_t *sender,
                                const int64_t *receiver, int64_t atoms, int64_t edges, int64_t features,
                                int64_t radial, double cutoff)
{
  return {filter, vec, d, n_pi, weight, bias, sender, receiver, atoms, edges, features, radial, cutoff};
}

}  // namespace

extern "C" void efa_emulate_edge_message(const double *filter, const double *vec, const double *d,
                                         const double *n_pi, const double *weight, const double *bias,
                                         const int64_t *sender, const int64_t *receiver, int64_t atoms, int64_t edges,
                                         int64_t features, int64_t radial, double cutoff, double *dx, double *dv)
{
  const auto a = args_of(filter, vec, d, n_pi, weight, bias, sender, receiver, atoms, edges, features, radial, cutoff);
  std::vector<double> scratch(steps::scratch_per_edge(features, radial, false));
  for (int64_t e = 0; e < edges; ++e) {
    steps::geometry_of(a, e, scratch.data());
    for (int64_t k = 0; k < radial; ++k) steps::basis_of(a, e, k, scratch.data(), scratch.data() + 5, (double *)nullptr);
    for (int64_t i = 0; i < features; ++i) steps::forward_feature(a, e, i, scratch.data(), scratch.data() + 5, dx, dv);
  }
}

// g_d, g_radial and rbf may be null, as in the kernel
extern "C" void efa_emulate_edge_message_backward(const double *filter, const double *vec, const double *d,
                                                  const double *n_pi, const double *weight, const double *bias,
                                                  const int64_t *sender, const int64_t *receiver, int64_t atoms,
                                                  int64_t edges, int64_t features, int64_t radial, double cutoff,
                                                  const double *grad_dx, const double *grad_dv, double *g_filter,
                                                  double *g_vec, double *g_d, double *g_radial, double *rbf_out)
{
  const auto a = args_of(filter, vec, d, n_pi, weight, bias, sender, receiver, atoms, edges, features, radial, cutoff);
  std::vector<double> scratch(steps::scratch_per_edge(features, radial, true));
  double *geometry = scratch.data(), *rbf = geometry + 5, *g_rad = rbf + radial, *terms = g_rad + 3 * features;
  double *basis_terms = terms + 4 * features;
  for (int64_t e = 0; e < edges; ++e) {
    steps::geometry_of(a, e, geometry);
    for (int64_t k = 0; k < radial; ++k) steps::basis_of(a, e, k, geometry, rbf, rbf_out);
    for (int64_t i = 0; i < features; ++i)
      steps::backward_feature(a, e, i, geometry, rbf, grad_dx, grad_dv, g_filter, g_vec, g_rad, terms, g_radial);
    if (g_d == nullptr) continue;
    for (int64_t k = 0; k < radial; ++k) steps::basis_term(a, k, geometry, rbf, g_rad, basis_terms);
    steps::edge_gradient(a, e, geometry, terms, basis_terms, g_d);
  }
}

// ---- the attention kernels' steps (attention_steps.h) ----

#include "attention_steps.h"

namespace {

efa::cuda::AttentionArgs<double> attention_args(const double *positions, const double *channels, const double *omega,
                                                const double *directions, int64_t channel_count,
                                                int64_t direction_count)
{
  return {positions, channels, omega, directions, channel_count, direction_count};
}

}  // namespace

// rows (count, 2MG) of atoms start .. start + count - 1, entry after entry as the rows kernel's threads
extern "C" void efa_emulate_attention_rows(const double *positions, const double *channels, const double *omega,
                                           const double *directions, int64_t channel_count, int64_t direction_count,
                                           int64_t start, int64_t count, double *rows)
{
  const auto a = attention_args(positions, channels, omega, directions, channel_count, direction_count);
  const int64_t per_atom = channel_count * direction_count;
  for (int64_t idx = 0; idx < count * per_atom; ++idx) {
    const int64_t k = idx / per_atom, mg = idx % per_atom;
    steps::coefficient(a, start + k, mg / direction_count, mg % direction_count, rows + k * 2 * per_atom + 2 * mg);
  }
}

extern "C" void efa_emulate_attention_rows_backward(const double *positions, const double *channels,
                                                    const double *omega, const double *directions,
                                                    int64_t channel_count, int64_t direction_count, int64_t start,
                                                    int64_t count, const double *grad_rows, double *g_channels,
                                                    double *g_positions)
{
  const auto a = attention_args(positions, channels, omega, directions, channel_count, direction_count);
  for (int64_t k = 0; k < count; ++k)
    steps::row_backward(a, start + k, grad_rows + k * 2 * channel_count * direction_count, g_channels, g_positions);
}
