// Optimizer steps on the GPU: SGD (momentum, nesterov, weight decay) and
// Adam / AdamW, in place, one element per loop iteration.
//
// The update rules are kernel_math.h's sgd_update / adam_update, the same functions
// the CPU kernels call, so the CPU tests cover the arithmetic the GPU runs.
// The Adam bias corrections are computed once on the host in double, as
// torch does in Python floats (adam_hyper), and passed to the kernel by value.
// Each element is owned by one thread: no races, no reductions.

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "check.h"
#include "fastmlp.h"
#include "launch.h"
#include "kernel_math.h"
#include "optim_loops.cuh"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kBlock = 256;

__global__ void __launch_bounds__(kBlock)
sgd_step_f32(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ buf,
             int64_t size, SgdHyper h) {
    sgd_loop(param, grad, buf, size, h);
}

__global__ void __launch_bounds__(kBlock)
adam_step_f32(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
              float* __restrict__ v, int64_t size, AdamHyper h) {
    adam_loop(param, grad, m, v, size, h);
}

}  // namespace

void sgd_step(float* param, const float* grad, float* buf, int64_t size, float lr, float momentum,
              bool nesterov, float weight_decay, cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "sgd_step: size must be non-negative, got " << size);
    // momentum != 0 (NaN included) is exactly when sgd_update reads buf.
    FASTMLP_CHECK(momentum == 0.0f || buf != nullptr || size == 0,
                  "sgd_step: momentum=" << momentum << " needs a momentum buffer, got null");
    if (size == 0) return;
    FASTMLP_CHECK(param != nullptr && grad != nullptr, "sgd_step: param or grad is null");
    SgdHyper h;
    h.lr = lr;
    h.momentum = momentum;
    h.weight_decay = weight_decay;
    h.nesterov = nesterov;
    sgd_step_f32<<<detail::grid_stride_blocks(size, kBlock), kBlock, 0, stream>>>(
        param, grad, momentum != 0.0f ? buf : nullptr, size, h);
    detail::check_launch();
}

void adam_step(float* param, const float* grad, float* m, float* v, int64_t size, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               int64_t step, cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "adam_step: size must be non-negative, got " << size);
    FASTMLP_CHECK(step >= 1, "adam_step: step counts from 1, got " << step);
    if (size == 0) return;
    FASTMLP_CHECK(param != nullptr && grad != nullptr && m != nullptr && v != nullptr,
                  "adam_step: param, grad, m or v is null");
    const AdamHyper h = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, step);
    adam_step_f32<<<detail::grid_stride_blocks(size, kBlock), kBlock, 0, stream>>>(
        param, grad, m, v, size, h);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
