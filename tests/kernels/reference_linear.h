// The double-precision product every linear kernel is checked against, shared by the op table
// (kernel_test_support.h) and the CUDA micro-benchmarks (kernels/cuda/bench): no test framework.
#pragma once

#include <cmath>
#include <cstdint>

namespace epic::kernel_test {

// y = x w^T; magnitude[r, o] = sum_i |x[r, i] w[o, i]|, the scale of the fp32 summation error.
inline void reference_linear(const float* x, const float* w, int64_t rows, int64_t in_dim, int64_t out_dim,
                             double* y, double* magnitude) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t o = 0; o < out_dim; ++o) {
      double sum = 0.0, abs_sum = 0.0;
      for (int64_t i = 0; i < in_dim; ++i) {
        const double term = static_cast<double>(x[r * in_dim + i]) * w[o * in_dim + i];
        sum += term;
        abs_sum += std::abs(term);
      }
      y[r * out_dim + o] = sum;
      magnitude[r * out_dim + o] = abs_sum;
    }
  }
}

}  // namespace epic::kernel_test
