// The warp-level building blocks of the row kernels (softmax_xent.cu,
// losses.cu, metrics.cu, normalization.cu): one row per warp, reduced by fixed
// xor butterflies, so every lane ends with the same value and the order of the
// operations never depends on scheduling (deterministic results, no atomics).
// All 32 lanes must call the reductions: the callers' row loops are
// warp-uniform.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cuda {

constexpr unsigned int kFullMask = 0xffffffffu;

template <typename V>
__device__ __forceinline__ V warp_sum(V v) {
#pragma unroll
    for (int offset = detail::kWarpSize / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

// The maximum, NaN if any lane holds NaN (kernel_math.h max_nan).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = detail::kWarpSize / 2; offset > 0; offset /= 2)
        v = fastmlp::max_nan(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
}

// The warp's first maximum of the lanes' candidates (best_v at column best_i;
// kNone: no candidate), in every lane: the larger value wins, equal values go to
// the lower column -- a strict total order, so the result does not depend on
// the pairing. kNone when no lane has a candidate.
template <int64_t kNone>
__device__ __forceinline__ int64_t warp_first_argmax(float best_v, int64_t best_i) {
#pragma unroll
    for (int offset = detail::kWarpSize / 2; offset > 0; offset /= 2) {
        const float other_v = __shfl_xor_sync(kFullMask, best_v, offset);
        const int64_t other_i = __shfl_xor_sync(kFullMask, best_i, offset);
        const bool take = other_i != kNone &&
                          (best_i == kNone || other_v > best_v ||
                           (other_v == best_v && other_i < best_i));
        if (take) {
            best_v = other_v;
            best_i = other_i;
        }
    }
    return best_i;
}

// The warp's row index and the number of warps in the grid, 64-bit.
__device__ __forceinline__ int64_t global_warp() {
    return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / detail::kWarpSize;
}
__device__ __forceinline__ int64_t grid_warps() {
    return static_cast<int64_t>(gridDim.x) * blockDim.x / detail::kWarpSize;
}

}  // namespace cuda
}  // namespace fastmlp
