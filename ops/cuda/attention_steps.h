// The per-thread steps of the attention kernels (attention.cu), for the device and the host:
// emulate.cpp runs them on the CPU, so that tests/test_cuda_ops.py checks their arithmetic on
// machines without a GPU (as edge_message_steps.h for the message passing).
#pragma once

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "edge_message_steps.h"  // EFA_STEP

namespace efa {
namespace cuda {
namespace steps {

// conj(ch e^{i theta}) from c = cos(theta), s = sin(theta) and the channel ch = (re, im)
template <typename T>
EFA_STEP void conj_rotated(T c, T s, const T *ch, T &re, T &im)
{
  re = c * ch[0] - s * ch[1];
  im = -(c * ch[1] + s * ch[0]);
}

// Row entry (m, g) of atom i, (re, im) into out[0..1]: conj(c_m e^{i theta}), theta = omega_m (u_g . r_i)
template <typename T>
EFA_STEP void coefficient(const AttentionArgs<T> &a, int64_t i, int64_t m, int64_t g, T *out)
{
  using std::cos;
  using std::sin;
  const T *r = a.positions + 3 * i, *u = a.directions + 3 * g;
  const T theta = a.omega[m] * (u[0] * r[0] + u[1] * r[1] + u[2] * r[2]);
  conj_rotated(cos(theta), sin(theta), a.channels + 2 * (i * a.channel_count + m), out[0], out[1]);
}

// Atom i's channel and position gradients from its row's gradient grow (2MG): per channel
// sum_g dA/dc . grow, and sum_{m, g} omega_m (grow . dA/dtheta) u_g with dA/dtheta = (A_im, -A_re).
template <typename T>
EFA_STEP void row_backward(const AttentionArgs<T> &a, int64_t i, const T *grow, T *g_channels, T *g_positions)
{
  using std::cos;
  using std::sin;
  const int64_t mc = a.channel_count, gc = a.direction_count;
  const T *r = a.positions + 3 * i;
  T sums[2 * kMaxChannels];
  for (int64_t q = 0; q < 2 * mc; ++q) sums[q] = 0;
  T gr[3] = {0, 0, 0};
  for (int64_t g = 0; g < gc; ++g) {
    const T *u = a.directions + 3 * g;
    const T p = u[0] * r[0] + u[1] * r[1] + u[2] * r[2];
    T gp = 0;
    for (int64_t m = 0; m < mc; ++m) {
      const T theta = a.omega[m] * p, c = cos(theta), s = sin(theta);
      const T *ch = a.channels + 2 * (i * mc + m);
      const T gre = grow[2 * (m * gc + g)], gim = grow[2 * (m * gc + g) + 1];
      T are, aim;
      conj_rotated(c, s, ch, are, aim);
      sums[2 * m] += gre * c - gim * s;
      sums[2 * m + 1] -= gre * s + gim * c;
      gp += a.omega[m] * (gre * aim - gim * are);
    }
    for (int k = 0; k < 3; ++k) gr[k] += gp * u[k];
  }
  for (int64_t q = 0; q < 2 * mc; ++q) g_channels[2 * i * mc + q] = sums[q];
  for (int k = 0; k < 3; ++k) g_positions[3 * i + k] = gr[k];
}

}  // namespace steps
}  // namespace cuda
}  // namespace efa
