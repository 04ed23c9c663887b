// The statistics group_norm_act's CPU kernels read in one pass over the data: each row's moments
// about one of its own values, combined per group in double precision.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace fastddpm {

// Moments of a row x[0, n) about its pivot p = x[0]: s1 = sum (x - p), s2 = sum (x - p)^2.
// About a value of the row, not about 0, so the variance below does not cancel the way
// sum x^2 - n mean^2 does when the mean is large against the spread.
struct RowMoments {
  double pivot = 0, s1 = 0, s2 = 0;
};

// Mean and 1 / sqrt(var + eps) of the values x_j + t_j over the rows j < D of one group (n values
// a row; t: one value a row, or null for none), from the rows' moments:
//   sum (x + t_j - mu)^2 = s2_j + 2 a_j s1_j + n a_j^2,   a_j = p_j + t_j - mu.
template <typename T>
inline void group_mean_rstd(const RowMoments* m, const T* t, int64_t D, int64_t n, double eps, double& mean,
                            double& rstd) {
  const double count = static_cast<double>(D * n);
  double sum = 0;
  for (int64_t j = 0; j < D; ++j) sum += m[j].s1 + static_cast<double>(n) * (m[j].pivot + (t ? double(t[j]) : 0.0));
  mean = sum / count;
  double sq = 0;
  for (int64_t j = 0; j < D; ++j) {
    const double a = m[j].pivot + (t ? double(t[j]) : 0.0) - mean;
    sq += m[j].s2 + 2.0 * a * m[j].s1 + static_cast<double>(n) * a * a;
  }
  rstd = 1.0 / std::sqrt(std::max(sq, 0.0) / count + eps);  // max: rounding of a constant group
}

}  // namespace fastddpm
