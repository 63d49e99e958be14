// The grid-stride loops of the optimizer updates, shared by the per-call
// kernels (optim.cu: constants by value) and the engine's kernels
// (engine.cu: constants read from the per-step table): one body, so the two
// paths compile to the same arithmetic and agree bit for bit.
//
// The gradient transform (kernel_math.h GradTransform): each loop has a form
// with a `const GradTransform& t` argument; an empty t runs the plain loop.
// The penalty (t.penalty != null) is finished in two steps, deterministically:
//   1. every block of the loop's launch writes its partial
//      l1 * sum|w| + l2 * sum w^2 (its threads' sums in grid-stride order, then a
//      fixed shuffle tree) to t.work[blockIdx.x];
//   2. penalty_finish<<<1, kPenaltyFinishThreads, 0, stream>>>(t.work, gridDim.x,
//      t.penalty), ordered after the loop by the stream, adds the partials in a
//      fixed order and writes *t.penalty.
// Grid rule: a loop with a penalty is launched with at most kOptimizerMaxBlocks
// blocks (optimizer_work_doubles() = kOptimizerMaxBlocks: one double per block;
// detail::grid_stride_blocks never exceeds it) of a multiple of 32 threads,
// at most 1024 (the block reduction works in whole warps). The partials depend
// on the launch configuration, so the penalty repeats bit for bit for a fixed
// one (the per-call ops and the engine both use grid_stride_blocks(size, 256)).
#pragma once

#include <cstdint>

#include "kernel_math.h"

namespace fastmlp {
namespace cuda {

constexpr int64_t kOptimizerMaxBlocks = 4096;  // == detail::kMaxGridBlocks (launch.h)
constexpr int kPenaltyFinishThreads = 256;

// Step 2 above (defined in optim.cu; a launch from another file needs no -rdc).
__global__ void penalty_finish(const double* __restrict__ work, int64_t blocks,
                               double* __restrict__ penalty);

// The block's sum of v, written by thread 0 to *out: a fixed shuffle tree per
// warp, then the warps in order. Every thread of the block must call it
// (it synchronises); blockDim.x a multiple of 32, at most 1024.
__device__ __forceinline__ void block_sum_to(double v, double* out) {
    __shared__ double warp_sums[32];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        double s = 0.0;
        const int warps = static_cast<int>(blockDim.x >> 5);
        for (int w = 0; w < warps; ++w) s += warp_sums[w];
        *out = s;
    }
    __syncthreads();  // warp_sums may be reused by the next call
}

// The transformed grid-stride loop: update(i, p, g) applies the optimizer's
// rule to element i (p: the parameter, in a register) with the transformed g.
// DP-SGD noise (kNoise: the host launched the kernel for t.noise.std != null):
// element i draws gaussian_noise(t.noise.offset + i, *t.noise.step, key) itself
// (one Philox call per element: the other three lanes are another thread's), the
// same floats as the CPU's chunked generator. A compile-time flag, not a runtime
// test: a kernel gets the registers of its largest branch, and the noise's
// Philox + Box-Muller would cost every plain optimizer kernel half its occupancy
// (sgd 32 -> 56 registers on sm_90).
template <bool kNoise, class Update>
__device__ __forceinline__ bool transformed_loop(float* __restrict__ param,
                                                 const float* __restrict__ grad, int64_t size,
                                                 const GradTransform& t, Update update) {
    const float scale = t.scale ? *t.scale : 1.0f;
    constexpr bool noisy = kNoise;
    const float noise_std = noisy ? *t.noise.std : 0.0f;
    const uint64_t noise_step = noisy ? static_cast<uint64_t>(*t.noise.step) : 0u;
    const bool want_penalty = t.penalty != nullptr;  // the same in every thread
    double abs_sum = 0.0, sq_sum = 0.0;              // w * w of a float is exact in double
    uint32_t bad = 0;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride) {
        float p = param[i];
        if (want_penalty) {
            abs_sum += fabs(static_cast<double>(p));
            sq_sum += static_cast<double>(p) * static_cast<double>(p);
        }
        // ::fastmlp::: the kernel_math.h function, not the gaussian_noise op of this namespace.
        float g = grad[i];
        if (noisy) {
            const float z = ::fastmlp::gaussian_noise(static_cast<uint64_t>(t.noise.offset + i),
                                                      noise_step, t.noise.key0, t.noise.key1);
            g = noise_grad_step(g, noise_std, z);  // transform_grad's first step
        }
        update(i, p, transform_grad_after_noise(g, p, t, scale));
        param[i] = p;
        bad |= nonfinite_bit(p);
    }
    if (want_penalty) {
        const double part = __dadd_rn(__dmul_rn(static_cast<double>(t.l1), abs_sum),
                                      __dmul_rn(static_cast<double>(t.l2), sq_sum));
        block_sum_to(part, t.work + blockIdx.x);
    }
    return bad != 0;
}

// buf is null when h.momentum == 0; sgd_update then never touches it, and no
// pointer is formed from it here (null + i would be undefined behaviour).
// With momentum but no buffer (a plan/optimizer mismatch the host missed),
// the parameters are poisoned with NaN -- the next loss is NaN and fit stops
// -- rather than null being dereferenced or momentum silently dropped.
// Each loop returns true in a thread that left one of its parameters NaN or
// +-Inf (the engine records the step; the per-call kernels ignore it).
__device__ __forceinline__ bool sgd_loop(float* __restrict__ param,
                                         const float* __restrict__ grad,
                                         float* __restrict__ buf, int64_t size,
                                         const SgdHyper& h) {
    const bool uses_buf = h.momentum != 0.0f;   // the same test as sgd_update's
    uint32_t bad = 0;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride) {
        if (uses_buf && buf == nullptr) {
            param[i] = __int_as_float(0x7fc00000);  // quiet NaN
            bad = 1;
            continue;
        }
        float p = param[i];
        sgd_update(p, grad[i], uses_buf ? buf + i : nullptr, h);
        param[i] = p;
        bad |= nonfinite_bit(p);
    }
    return bad != 0;
}

__device__ __forceinline__ bool adam_loop(float* __restrict__ param,
                                          const float* __restrict__ grad,
                                          float* __restrict__ m, float* __restrict__ v,
                                          int64_t size, const AdamHyper& h) {
    uint32_t bad = 0;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride) {
        float p = param[i], mi = m[i], vi = v[i];
        adam_update(p, grad[i], mi, vi, h);
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
        bad |= nonfinite_bit(p);
    }
    return bad != 0;
}

// With a transform (empty: exactly the loops above); kNoise: t.noise.std is set
// (the launcher's choice, see transformed_loop).
template <bool kNoise = false>
__device__ __forceinline__ bool sgd_loop(float* __restrict__ param,
                                         const float* __restrict__ grad,
                                         float* __restrict__ buf, int64_t size,
                                         const SgdHyper& h, const GradTransform& t) {
    if (!t.any()) return sgd_loop(param, grad, buf, size, h);
    const bool uses_buf = h.momentum != 0.0f;
    return transformed_loop<kNoise>(param, grad, size, t, [&](int64_t i, float& p, float g) {
        if (uses_buf && buf == nullptr) p = __int_as_float(0x7fc00000);  // as sgd_loop
        else sgd_update(p, g, uses_buf ? buf + i : nullptr, h);
    });
}

template <bool kNoise = false>
__device__ __forceinline__ bool adam_loop(float* __restrict__ param,
                                          const float* __restrict__ grad,
                                          float* __restrict__ m, float* __restrict__ v,
                                          int64_t size, const AdamHyper& h,
                                          const GradTransform& t) {
    if (!t.any()) return adam_loop(param, grad, m, v, size, h);
    return transformed_loop<kNoise>(param, grad, size, t, [&](int64_t i, float& p, float g) {
        float mi = m[i], vi = v[i];
        adam_update(p, g, mi, vi, h);
        m[i] = mi;
        v[i] = vi;
    });
}

// RMSprop: buf is read only when h.momentum != 0, gavg only when h.centered; a
// missing one poisons the parameters with NaN, as sgd_loop does.
__device__ __forceinline__ void rmsprop_element(int64_t i, float& p, float g,
                                                float* __restrict__ sq, float* __restrict__ buf,
                                                float* __restrict__ gavg,
                                                const RmspropHyper& h) {
    const bool uses_buf = h.momentum != 0.0f;
    if ((uses_buf && buf == nullptr) || (h.centered && gavg == nullptr)) {
        p = __int_as_float(0x7fc00000);
        return;
    }
    float s = sq[i], b = uses_buf ? buf[i] : 0.0f, a = h.centered ? gavg[i] : 0.0f;
    rmsprop_update(p, g, s, &b, &a, h);
    sq[i] = s;
    if (uses_buf) buf[i] = b;
    if (h.centered) gavg[i] = a;
}

template <bool kNoise = false>
__device__ __forceinline__ bool rmsprop_loop(float* __restrict__ param,
                                             const float* __restrict__ grad,
                                             float* __restrict__ sq, float* __restrict__ buf,
                                             float* __restrict__ gavg, int64_t size,
                                             const RmspropHyper& h,
                                             const GradTransform& t = GradTransform()) {
    if (t.any()) {
        return transformed_loop<kNoise>(param, grad, size, t, [&](int64_t i, float& p, float g) {
            rmsprop_element(i, p, g, sq, buf, gavg, h);
        });
    }
    uint32_t bad = 0;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride) {
        float p = param[i];
        rmsprop_element(i, p, grad[i], sq, buf, gavg, h);
        param[i] = p;
        bad |= nonfinite_bit(p);
    }
    return bad != 0;
}

}  // namespace cuda
}  // namespace fastmlp
