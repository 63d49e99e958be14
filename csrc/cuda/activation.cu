// CUDA activation_fwd / activation_bwd (issue 15): the elementwise activations
// of kernel_math.h, with inverted dropout, over a flat (rows, cols) array.
//
// Grid-stride loops (launch.h) over groups of 4 consecutive elements: the
// dropout bits of elements 4g .. 4g+3 are the four lanes of one Philox4x32-10
// call (kernel_math.h dropout_bits), so each thread draws once per group. One
// kernel per activation code (a template: the switch runs on the host), so a
// kernel holds only its own formula. y may alias x and dx may alias dy: each
// element is read, then written, by the same thread (no __restrict__ on them).
// The step number is read from device memory by the kernel, never passed by
// value: a captured CUDA Graph replays with the engine's current step.

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "check.h"
#include "fastmlp.h"
#include "gemm_epilogue.h"
#include "kernel_math.h"
#include "launch.h"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kBlock = 256;

// The 4 multipliers of group g (threshold != 0).
__device__ __forceinline__ Philox4 group_bits(uint64_t g, uint64_t step, const DropoutSpec& d) {
    return philox4x32_10(Philox4{{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
                                  static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)}},
                         d.key0, d.key1);
}

__device__ __forceinline__ float lane_multiplier(const Philox4& r, int l, const DropoutSpec& d) {
    return r.v[l] < d.threshold ? 0.0f : d.scale;
}

template <int A>
__global__ void __launch_bounds__(kBlock)
activation_fwd_f32(const float* x, float* y, int64_t size, DropoutSpec d) {
    const bool drop = d.threshold != 0;
    const uint64_t step = drop ? static_cast<uint64_t>(*d.step) : 0u;
    const int64_t groups = (size + 3) >> 2;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += stride) {
        Philox4 r{{0u, 0u, 0u, 0u}};
        if (drop) r = group_bits(static_cast<uint64_t>(g), step, d);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const int64_t e = 4 * g + l;
            if (e < size) {
                float t = act_forward<A>(x[e]);
                if (drop) t = t * lane_multiplier(r, l, d);
                y[e] = t;
            }
        }
    }
}

template <int A, bool kFromInput>
__global__ void __launch_bounds__(kBlock)
activation_bwd_f32(const float* dy, const float* saved, float* dx, int64_t size, DropoutSpec d) {
    const bool drop = d.threshold != 0;
    const uint64_t step = drop ? static_cast<uint64_t>(*d.step) : 0u;
    const int64_t groups = (size + 3) >> 2;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += stride) {
        Philox4 r{{0u, 0u, 0u, 0u}};
        if (drop) r = group_bits(static_cast<uint64_t>(g), step, d);
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            const int64_t e = 4 * g + l;
            if (e < size) {
                float t = dy[e];
                if (drop) t = t * lane_multiplier(r, l, d);
                if (A != kActLinear)
                    t = kFromInput ? act_grad_from_input<A>(t, saved[e])
                                   : act_grad_from_output<A>(t, saved[e]);
                dx[e] = t;
            }
        }
    }
}


}  // namespace

void activation_fwd(const float* x, float* y, int64_t rows, int64_t cols, int act,
                    const DropoutSpec& dropout, cudaStream_t stream) {
    check_activation_call("activation_fwd", rows, cols, act, dropout);
    const int64_t size = rows * cols;
    if (size == 0) return;
    FASTMLP_CHECK(x && y, "activation_fwd: null pointer");
    const unsigned int grid = detail::grid_stride_blocks((size + 3) / 4, kBlock);
    with_act(act, [&](auto a) {
        activation_fwd_f32<decltype(a)::value><<<grid, kBlock, 0, stream>>>(x, y, size, dropout);
    });
    detail::check_launch();
}

void activation_bwd(const float* dy, const float* saved, float* dx, int64_t rows, int64_t cols,
                    int act, bool saved_is_input, const DropoutSpec& dropout,
                    cudaStream_t stream) {
    check_activation_call("activation_bwd", rows, cols, act, dropout);
    FASTMLP_CHECK(saved_is_input || !act_needs_input(act),
                  "activation_bwd: the derivative of activation " << act
                      << " needs the input (saved_is_input)");
    const int64_t size = rows * cols;
    if (size == 0) return;
    FASTMLP_CHECK(dy && dx && (saved || act == kActLinear), "activation_bwd: null pointer");
    const unsigned int grid = detail::grid_stride_blocks((size + 3) / 4, kBlock);
    with_act_grad(act, saved_is_input, [&](auto a, auto in) {
        activation_bwd_f32<decltype(a)::value, decltype(in)::value>
            <<<grid, kBlock, 0, stream>>>(dy, saved, dx, size, dropout);
    });
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
