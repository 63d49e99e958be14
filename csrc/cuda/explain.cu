// CUDA kernels of the interpretability methods (issue 18): the gradient seed of
// the explained output (target_seed), integrated gradients' path points
// (ig_interpolate) and their quadrature, which also gives saliency and gradient
// x input (ig_accumulate). fastmlp.h states the contracts; the scalar rules are
// kernel_math.h's, shared with the CPU (cpu/explain.cpp).
//
// target_seed: one warp per row (the softmax needs the row's max and sum; cols
// may be large): lane l takes columns l, l + 32, ..., the max and the sum are
// the warp butterflies of warp.h (fixed order, no atomics). The softmax's sum
// is in lane order, not column order, and expf is CUDA's: the values agree with
// the CPU's to a few ulp, not bit for bit. ig_interpolate / ig_accumulate:
// grid-stride loops over the output elements; their float32 rules are exact
// operation sequences (mul_rn), equal to the CPU's bit for bit (absent denormals:
// the CPU flushes them by default, cpu/fpenv.h). Both read *step
// from device memory in the kernel, so a CUDA Graph replays them with a new step.
#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>

#include "check.h"
#include "explain_check.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"
#include "warp.h"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kBlock = 256;
constexpr int kWarpsPerBlock = kBlock / detail::kWarpSize;
static_assert(kBlock % detail::kWarpSize == 0, "whole warps: one row each");

// Every branch on t and T is warp-uniform (t is the row's target), so the
// reductions run with all 32 lanes.
template <OutputTransform T>
__global__ void __launch_bounds__(kBlock)
target_seed_warp(const float* __restrict__ logits, const int32_t* __restrict__ targets,
                 float* __restrict__ out, int64_t rows, int64_t cols) {
    const int lane = static_cast<int>(threadIdx.x) % detail::kWarpSize;
    for (int64_t r = global_warp(); r < rows; r += grid_warps()) {
        const float* z = logits + r * cols;
        float* o = out + r * cols;
        const int64_t t = targets[r];  // one broadcast load per warp
        if (t < 0 || t >= cols) {      // a bad target: zeros, nothing read
            for (int64_t c = lane; c < cols; c += detail::kWarpSize) o[c] = 0.0f;
            continue;
        }
        if constexpr (T == OutputTransform::kNone) {
            for (int64_t c = lane; c < cols; c += detail::kWarpSize) o[c] = c == t ? 1.0f : 0.0f;
        } else if constexpr (T == OutputTransform::kSigmoid) {
            for (int64_t c = lane; c < cols; c += detail::kWarpSize)
                o[c] = c == t ? sigmoid_seed(z[c]) : 0.0f;
        } else {
            float mx = -CUDART_INF_F;
            for (int64_t c = lane; c < cols; c += detail::kWarpSize) mx = max_nan(mx, z[c]);
            mx = warp_max(mx);
            float sum = 0.0f;
#pragma unroll 1
            for (int64_t c = lane; c < cols; c += detail::kWarpSize) sum += act_expf(z[c] - mx);
            sum = warp_sum(sum);
            const float p_t = act_expf(z[t] - mx) / sum;
            // Not unrolled: each p_j is a correctly rounded division (a possible
            // slow-path call), as metrics.cu's pass 3.
#pragma unroll 1
            for (int64_t c = lane; c < cols; c += detail::kWarpSize)
                o[c] = softmax_seed(p_t, act_expf(z[c] - mx) / sum, c == t);
        }
    }
}

__global__ void __launch_bounds__(kBlock)
ig_interpolate_f32(const float* __restrict__ x, const float* __restrict__ baseline,
                   const float* __restrict__ alphas, const int32_t* __restrict__ targets,
                   float* __restrict__ out, int32_t* __restrict__ targets_out, int64_t images,
                   int64_t cols, int64_t steps, const int64_t* __restrict__ step, int64_t batch,
                   int64_t rows) {
    const int64_t total = images * steps;
    const int64_t v0 = ig_first(*step, batch, total);
    const int64_t n = total - v0 < rows ? total - v0 : rows;  // rows inside [0, total)
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    if (targets != nullptr)
        for (int64_t r = first; r < n; r += stride) targets_out[r] = targets[(v0 + r) / steps];
    const int64_t size = n * cols;
    for (int64_t e = first; e < size; e += stride) {
        const int64_t r = e / cols, c = e - r * cols;
        const int64_t v = v0 + r, i = v / steps;
        const float* bi = baseline ? baseline + i * cols : nullptr;
        out[e] = ig_point(x[i * cols + c], bi, c, alphas[v - i * steps]);
    }
}

__global__ void __launch_bounds__(kBlock)
ig_accumulate_f32(const float* __restrict__ grads, const float* __restrict__ x,
                  const float* __restrict__ baseline, const float* __restrict__ weights,
                  float* __restrict__ out, int64_t images, int64_t cols, int64_t steps,
                  const int64_t* __restrict__ step, int64_t batch, int64_t rows, bool multiply,
                  bool absolute) {
    const int64_t i0 = ig_first(*step, batch / steps, images);
    const int64_t per_call = rows / steps;
    const int64_t n = images - i0 < per_call ? images - i0 : per_call;
    const int64_t size = n * cols;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < size;
         e += stride) {
        const int64_t k = e / cols, c = e - k * cols;
        // Neighbouring threads read neighbouring columns of each path point's row.
        const float* g = grads + k * steps * cols + c;
        float s = 0.0f;
        for (int64_t m = 0; m < steps; ++m) s = s + mul_rn(weights[m], g[m * cols]);
        const int64_t i = i0 + k;
        const float* bi = baseline ? baseline + i * cols : nullptr;
        out[i * cols + c] =
            ig_attribution(s, multiply ? x[i * cols + c] : 0.0f, bi, c, multiply, absolute);
    }
}

}  // namespace

void target_seed(const float* logits, const int32_t* targets, float* out, int64_t rows,
                 int64_t cols, int32_t transform, cudaStream_t stream) {
    check_target_seed_args(logits, targets, out, rows, cols, transform);  // explain_check.h
    if (rows == 0 || cols == 0) return;
    const unsigned int blocks = detail::grid_stride_blocks(rows, kWarpsPerBlock);
    switch (static_cast<OutputTransform>(transform)) {
        case OutputTransform::kNone:
            target_seed_warp<OutputTransform::kNone>
                <<<blocks, kBlock, 0, stream>>>(logits, targets, out, rows, cols);
            break;
        case OutputTransform::kSigmoid:
            target_seed_warp<OutputTransform::kSigmoid>
                <<<blocks, kBlock, 0, stream>>>(logits, targets, out, rows, cols);
            break;
        default:
            target_seed_warp<OutputTransform::kSoftmax>
                <<<blocks, kBlock, 0, stream>>>(logits, targets, out, rows, cols);
            break;
    }
    detail::check_launch();
}

void ig_interpolate(const float* x, const float* baseline, const float* alphas,
                    const int32_t* targets, float* out, int32_t* targets_out, int64_t images,
                    int64_t cols, int64_t steps, const int64_t* step, int64_t batch, int64_t rows,
                    cudaStream_t stream) {
    check_ig_interpolate_args(x, baseline, alphas, targets, out, targets_out, images, cols,
                              steps, step, batch, rows);
    if (rows == 0) return;
    // Sized for the most the call may write (*step is not known on the host).
    const int64_t work = rows * cols > rows ? rows * cols : rows;
    ig_interpolate_f32<<<detail::grid_stride_blocks(work, kBlock), kBlock, 0, stream>>>(
        x, baseline, alphas, targets, out, targets_out, images, cols, steps, step, batch, rows);
    detail::check_launch();
}

void ig_accumulate(const float* grads, const float* x, const float* baseline,
                   const float* weights, float* out, int64_t images, int64_t cols, int64_t steps,
                   const int64_t* step, int64_t batch, int64_t rows, bool multiply, bool absolute,
                   cudaStream_t stream) {
    check_ig_accumulate_args(grads, x, baseline, weights, out, images, cols, steps, step, batch,
                             rows, multiply);
    if (rows == 0 || cols == 0) return;
    ig_accumulate_f32<<<detail::grid_stride_blocks((rows / steps) * cols, kBlock), kBlock, 0,
                        stream>>>(grads, x, baseline, weights, out, images, cols, steps, step,
                                  batch, rows, multiply, absolute);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
