// CUDA kernels of the adversarial attacks (issue 18): the attack's starting point
// (adv_init) and the FGSM / PGD sign step with its projection and clip
// (adv_step). fastmlp.h states the contracts; the element rules are
// kernel_math.h's (adv_uniform, adv_clamp, adv_step_value), shared with the CPU
// (cpu/adversarial.cpp): exact float32 operation sequences and the same Philox
// bits, so both devices compute the same floats bit for bit (absent denormals:
// the CPU flushes them by default, cpu/fpenv.h). Grid-stride
// elementwise loops; adv_init reads *step from device memory in the kernel, so
// a CUDA Graph replays it with a new step.
#include <cuda_runtime.h>

#include <cstdint>

#include "adversarial_check.h"
#include "check.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kBlock = 256;

// kRandom: the random start (step non-null); else a clipped copy.
template <bool kRandom>
__global__ void __launch_bounds__(kBlock)
adv_init_f32(const float* x, float* adv, int64_t size, float eps, float lo, float hi,
             const int64_t* __restrict__ step, uint32_t key0, uint32_t key1) {
    // (x and adv are not __restrict__: adv may be x itself.)
    const uint64_t s = kRandom ? static_cast<uint64_t>(*step) : 0u;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < size;
         e += stride) {
        if constexpr (kRandom) {
            const float u = adv_uniform(dropout_bits(static_cast<uint64_t>(e), s, key0, key1));
            adv[e] = adv_clamp(x[e] + mul_rn(eps, u), lo, hi);
        } else {
            adv[e] = adv_clamp(x[e], lo, hi);
        }
    }
}

__global__ void __launch_bounds__(kBlock)
adv_step_f32(const float* __restrict__ x, float* __restrict__ adv, const float* __restrict__ grad,
             int64_t size, float eps, float alpha, float lo, float hi, bool project) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < size;
         e += stride)
        adv[e] = adv_step_value(x[e], adv[e], grad[e], eps, alpha, lo, hi, project);
}

}  // namespace

void adv_init(const float* x, float* adv, int64_t rows, int64_t cols, float eps, float lo,
              float hi, const int64_t* step, uint32_t key0, uint32_t key1, cudaStream_t stream) {
    check_adv_init_args(x, adv, rows, cols, eps, lo, hi);  // adversarial_check.h
    const int64_t size = rows * cols;
    if (size == 0) return;
    const unsigned int blocks = detail::grid_stride_blocks(size, kBlock);
    if (step != nullptr)
        adv_init_f32<true><<<blocks, kBlock, 0, stream>>>(x, adv, size, eps, lo, hi, step, key0,
                                                          key1);
    else
        adv_init_f32<false><<<blocks, kBlock, 0, stream>>>(x, adv, size, eps, lo, hi, step,
                                                           key0, key1);
    detail::check_launch();
}

void adv_step(const float* x, float* adv, const float* grad, int64_t rows, int64_t cols,
              float eps, float alpha, float lo, float hi, bool project, cudaStream_t stream) {
    check_adv_step_args(x, adv, grad, rows, cols, eps, alpha, lo, hi);
    const int64_t size = rows * cols;
    if (size == 0) return;
    adv_step_f32<<<detail::grid_stride_blocks(size, kBlock), kBlock, 0, stream>>>(
        x, adv, grad, size, eps, alpha, lo, hi, project);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
