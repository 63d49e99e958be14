// CUDA kernels of DP-SGD (issue 17): the per-example squared gradient norms of
// the Dense layers ("ghost norms", dp_row_sqnorms) and the per-example clip
// factors (dp_clip_factors). fastmlp.h states the contract; the scalar rules
// are kernel_math.h's dp_* functions, shared with the CPU.
//
// dp_row_sqnorms: one warp per row (grid-stride over rows). Lane l sums the
// squares of columns l, l + 32, ... in order, in double; the lanes are added
// by a __shfl_xor_sync butterfly (a fixed tree, no atomics), so a run repeats
// bit for bit, and the CPU (cpu/dp.cpp, kernel_math.h kDpLanes) adds in the
// same order: both devices give the same floats. The loads of a warp are
// coalesced (32 consecutive floats of the row).
#include <cuda_runtime.h>

#include <cstdint>

#include "check.h"
#include "dp_check.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"
#include "warp.h"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kDpBlock = 256;
constexpr int kDpRowsPerBlock = kDpBlock / detail::kWarpSize;
static_assert(kDpLanes == detail::kWarpSize, "the CPU's lane order is the warp's");
static_assert(kDpBlock % detail::kWarpSize == 0, "whole warps: one row each");

// sum_c v[c]^2 over the n columns of one row, in every lane of the warp.
__device__ __forceinline__ double warp_row_sum_sq(const float* __restrict__ v, int64_t n,
                                                  int lane) {
    double s = 0.0;
    for (int64_t c = lane; c < n; c += detail::kWarpSize) {
        const double t = static_cast<double>(v[c]);
        s = dadd_rn(s, dmul_rn(t, t));
    }
    for (int off = detail::kWarpSize / 2; off > 0; off >>= 1)
        s = dadd_rn(s, __shfl_xor_sync(kFullMask, s, off));
    return s;
}

__global__ void __launch_bounds__(kDpBlock)
dp_row_sqnorms_warp(const float* __restrict__ x, const float* __restrict__ dz,
                    float* __restrict__ acc, int64_t rows, int64_t in, int64_t out, bool bias,
                    bool accumulate) {
    const int lane = threadIdx.x % detail::kWarpSize;
    const int64_t warps = static_cast<int64_t>(gridDim.x) * kDpRowsPerBlock;
    // r is the same in all lanes of a warp: the whole warp takes the shuffles.
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * kDpRowsPerBlock +
                     threadIdx.x / detail::kWarpSize;
         r < rows; r += warps) {
        const double sx = warp_row_sum_sq(x + r * in, in, lane);
        const double sdz = warp_row_sum_sq(dz + r * out, out, lane);
        if (lane == 0) acc[r] = dp_row_sqnorm_value(sx, sdz, bias, accumulate ? acc[r] : 0.0f);
    }
}

__global__ void __launch_bounds__(kDpBlock)
dp_clip_factors_rows(float* __restrict__ acc, int64_t rows, float clip, float noise_multiplier,
                     float grad_scale, float divisor, float* __restrict__ std_out) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t r = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
         r += stride)
        acc[r] = dp_clip_factor_value(acc[r], clip, grad_scale, divisor);
    if (std_out && blockIdx.x == 0 && threadIdx.x == 0)
        std_out[0] = dp_noise_std_value(noise_multiplier, clip, divisor);
}

}  // namespace

void dp_row_sqnorms(const float* x, const float* dz, float* acc, int64_t rows, int64_t in,
                    int64_t out, bool bias, bool accumulate, cudaStream_t stream) {
    check_dp_row_sqnorms_args(x, dz, acc, rows, in, out);  // dp_check.h
    if (rows == 0) return;
    dp_row_sqnorms_warp<<<detail::grid_stride_blocks(rows, kDpRowsPerBlock), kDpBlock, 0,
                          stream>>>(x, dz, acc, rows, in, out, bias, accumulate);
    detail::check_launch();
}

void dp_clip_factors(float* acc, int64_t rows, float clip, float noise_multiplier,
                     float grad_scale, float divisor, float* std_out, cudaStream_t stream) {
    check_dp_clip_factors_args(acc, rows, clip, noise_multiplier, grad_scale, divisor);
    if (rows == 0 && !std_out) return;
    dp_clip_factors_rows<<<detail::grid_stride_blocks(rows, kDpBlock), kDpBlock, 0, stream>>>(
        acc, rows, clip, noise_multiplier, grad_scale, divisor, std_out);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
