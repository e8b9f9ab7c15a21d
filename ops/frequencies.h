// The frequencies of the EFA channels, shared by the fused EFA operators (fused_efa.cpp,
// fused_pairwise.cpp): when they are integer multiples of the smallest (omega_m = n_m omega_1, as
// the model's evenly spaced ones are), sin and cos of every channel's angle follow from one
// sin/cos by the angle-addition recurrence.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

namespace efa {

constexpr int64_t kLongestLadder = 256;  // more multiples than this: sin/cos per channel

// The channels' frequencies and, when they form one, the ladder omega_m = multiple[m] * base.
struct Frequencies {
  std::vector<double> omega;
  std::vector<int64_t> multiple;  // empty: no ladder
  double base = 0.0;
  int64_t top = 0;  // largest multiple
};

inline Frequencies frequencies_of(const torch::Tensor &omega_in)
{
  const torch::Tensor omega = omega_in.detach().to(at::kDouble).contiguous();
  Frequencies f;
  f.omega.assign(omega.data_ptr<double>(), omega.data_ptr<double>() + omega.numel());
  double base = 0.0;
  for (double w : f.omega) {
    if (w > 0.0 && (base == 0.0 || w < base)) base = w;
  }
  // a few units in the last place of omega's dtype: the model's k * omega_1, rounded
  const double tolerance = omega_in.scalar_type() == at::kDouble ? 1e-12 : 1e-6;
  std::vector<int64_t> multiple;
  int64_t top = 0;
  for (double w : f.omega) {
    const double ratio = base > 0.0 ? w / base : w;  // no positive frequency: all must be 0
    const int64_t n = std::llround(std::clamp(ratio, -1.0, double(kLongestLadder + 1)));
    if (!(std::abs(ratio - double(n)) <= tolerance * std::max(1.0, ratio)) || n < 0 || n > kLongestLadder) return f;
    multiple.push_back(n);
    top = std::max(top, n);
  }
  f.multiple = std::move(multiple);
  f.base = base;
  f.top = top;
  return f;
}

}  // namespace efa
