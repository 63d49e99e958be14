// CPU kernels of DP-SGD (issue 17): the per-example squared gradient norms of
// the Dense layers ("ghost norms", dp_row_sqnorms) and the per-example clip
// factors made from them (dp_clip_factors). fastmlp.h states the contract;
// the scalar rules are kernel_math.h's dp_* functions, shared with the GPU.
//
// dp_row_sqnorms runs every DP training step over the layer's input (batch x
// 784 for the first MNIST layer), so the row sums are vectorised (32 double
// lanes, kDpLanes) and the rows spread over the pool for large inputs. Each row
// is summed by one thread in a fixed order: the result does not depend on the
// thread count, and equals the CUDA kernel's bit for bit.
#include <cmath>

#include "check.h"
#include "dp_check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

// sum_c v[c]^2 in double, in kDpLanes lanes (column c in lane c % kDpLanes, in
// column order), the lanes added in the CUDA warp's butterfly order (see
// kernel_math.h kDpLanes). (The squares are exact in double: a fused
// multiply-add would round acc + t * t the same way.)
FASTMLP_SIMD_CLONES
double row_sum_sq(const float* __restrict v, int64_t n) {
    double acc[kDpLanes] = {};
    int64_t i = 0;
    for (; i + kDpLanes <= n; i += kDpLanes) {
        for (int j = 0; j < kDpLanes; ++j) {
            const double t = static_cast<double>(v[i + j]);
            acc[j] += t * t;
        }
    }
    for (int j = 0; i + j < n; ++j) {  // the last < kDpLanes columns: lanes 0, 1, ...
        const double t = static_cast<double>(v[i + j]);
        acc[j] += t * t;
    }
    // Unrolled, so that each level has constant bounds and becomes straight-line
    // SIMD code (as a loop it cost short rows -- dz of a 10-class layer -- more
    // than their sums).
#pragma GCC unroll 5
    for (int off = kDpLanes / 2; off > 0; off >>= 1) {
#pragma GCC unroll 16
        for (int j = 0; j < off; ++j) acc[j] += acc[j + off];
    }
    return acc[0];
}

}  // namespace

void dp_row_sqnorms(const float* x, const float* dz, float* acc, int64_t rows, int64_t in,
                    int64_t out, bool bias, bool accumulate) {
    check_dp_row_sqnorms_args(x, dz, acc, rows, in, out);  // dp_check.h
    if (rows == 0) return;
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    // (Measured: this per-row call of the clone is faster than one clone over a
    // range of rows with both sums inlined, 38 vs 93 us for 1024 rows of 128 + 10.)
    auto body = [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const double sx = in ? row_sum_sq(x + r * in, in) : 0.0;
            const double sdz = out ? row_sum_sq(dz + r * out, out) : 0.0;
            acc[r] = dp_row_sqnorm_value(sx, sdz, bias, accumulate ? acc[r] : 0.0f);
        }
    };
    parallel_range(rows, rows * (in + out) >= kParMin, body);
}

void dp_clip_factors(float* acc, int64_t rows, float clip, float noise_multiplier,
                     float grad_scale, float divisor, float* std_out) {
    check_dp_clip_factors_args(acc, rows, clip, noise_multiplier, grad_scale, divisor);
    FlushDenormalScope fp_scope;
    for (int64_t r = 0; r < rows; ++r)
        acc[r] = dp_clip_factor_value(acc[r], clip, grad_scale, divisor);
    if (std_out) std_out[0] = dp_noise_std_value(noise_multiplier, clip, divisor);
}

}  // namespace cpu
}  // namespace fastmlp
