// Optimizer steps on the GPU: SGD (momentum, nesterov, weight decay), Adam /
// AdamW and RMSprop, in place, one element per loop iteration, optionally after
// the gradient transform (kernel_math.h GradTransform; the penalty's
// deterministic two-step reduction is described in optim_loops.cuh).
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
static_assert(kBlock % 32 == 0 && kBlock <= 1024, "optim_loops.cuh's block reduction");
static_assert(detail::kMaxGridBlocks <= kOptimizerMaxBlocks,
              "a penalty needs one work double per block of the loop's grid");

template <bool kNoise>
__global__ void __launch_bounds__(kBlock)
sgd_step_f32(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ buf,
             int64_t size, SgdHyper h, GradTransform t) {
    sgd_loop<kNoise>(param, grad, buf, size, h, t);
}

template <bool kNoise>
__global__ void __launch_bounds__(kBlock)
adam_step_f32(float* __restrict__ param, const float* __restrict__ grad, float* __restrict__ m,
              float* __restrict__ v, int64_t size, AdamHyper h, GradTransform t) {
    adam_loop<kNoise>(param, grad, m, v, size, h, t);
}

template <bool kNoise>
__global__ void __launch_bounds__(kBlock)
rmsprop_step_f32(float* __restrict__ param, const float* __restrict__ grad,
                 float* __restrict__ sq, float* __restrict__ buf, float* __restrict__ gavg,
                 int64_t size, RmspropHyper h, GradTransform t) {
    rmsprop_loop<kNoise>(param, grad, sq, buf, gavg, size, h, t);
}

// The checks shared by the per-call launchers; a penalty of 0 elements is 0.
// Returns whether there is anything to launch.
bool prepare_transform(const char* op, int64_t size, const GradTransform& t,
                       cudaStream_t stream) {
    FASTMLP_CHECK(!t.penalty || t.work, op << ": a penalty needs the work buffer ("
                                           << kOptimizerMaxBlocks << " doubles)");
    FASTMLP_CHECK(!t.noise.std || t.noise.step, op << ": noise needs the step counter");
    FASTMLP_CHECK(t.noise.offset >= 0, op << ": noise offset must be >= 0, got "
                                          << t.noise.offset);
    if (size == 0 && t.penalty) {
        CUDA_CHECK(cudaMemsetAsync(t.penalty, 0, sizeof(double), stream));
    }
    return size > 0;
}

// After a loop launched with `blocks` blocks: step 2 of the penalty.
void finish_transform(const GradTransform& t, unsigned int blocks, cudaStream_t stream) {
    if (!t.penalty) return;
    penalty_finish<<<1, kPenaltyFinishThreads, 0, stream>>>(t.work, blocks, t.penalty);
    detail::check_launch();
}

}  // namespace

// One block: thread j adds partials j, j + 256, ... in order, then the fixed
// tree of block_sum_to; the result does not depend on anything but `blocks`
// and the partials.
__global__ void __launch_bounds__(kPenaltyFinishThreads)
penalty_finish(const double* __restrict__ work, int64_t blocks, double* __restrict__ penalty) {
    double s = 0.0;
    for (int64_t b = threadIdx.x; b < blocks; b += blockDim.x) s += work[b];
    block_sum_to(s, penalty);
}

int64_t optimizer_work_doubles() { return kOptimizerMaxBlocks; }

void sgd_step(float* param, const float* grad, float* buf, int64_t size, float lr, float momentum,
              bool nesterov, float weight_decay, const GradTransform& t, cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "sgd_step: size must be non-negative, got " << size);
    // momentum != 0 (NaN included) is exactly when sgd_update reads buf.
    FASTMLP_CHECK(momentum == 0.0f || buf != nullptr || size == 0,
                  "sgd_step: momentum=" << momentum << " needs a momentum buffer, got null");
    if (!prepare_transform("sgd_step", size, t, stream)) return;
    FASTMLP_CHECK(param != nullptr && grad != nullptr, "sgd_step: param or grad is null");
    SgdHyper h;
    h.lr = lr;
    h.momentum = momentum;
    h.weight_decay = weight_decay;
    h.nesterov = nesterov;
    const unsigned int blocks = detail::grid_stride_blocks(size, kBlock);
    float* b = momentum != 0.0f ? buf : nullptr;
    if (t.noise.std)
        sgd_step_f32<true><<<blocks, kBlock, 0, stream>>>(param, grad, b, size, h, t);
    else
        sgd_step_f32<false><<<blocks, kBlock, 0, stream>>>(param, grad, b, size, h, t);
    detail::check_launch();
    finish_transform(t, blocks, stream);
}

void adam_step(float* param, const float* grad, float* m, float* v, int64_t size, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               int64_t step, const GradTransform& t, cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "adam_step: size must be non-negative, got " << size);
    FASTMLP_CHECK(step >= 1, "adam_step: step counts from 1, got " << step);
    if (!prepare_transform("adam_step", size, t, stream)) return;
    FASTMLP_CHECK(param != nullptr && grad != nullptr && m != nullptr && v != nullptr,
                  "adam_step: param, grad, m or v is null");
    const AdamHyper h = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, step);
    const unsigned int blocks = detail::grid_stride_blocks(size, kBlock);
    if (t.noise.std)
        adam_step_f32<true><<<blocks, kBlock, 0, stream>>>(param, grad, m, v, size, h, t);
    else
        adam_step_f32<false><<<blocks, kBlock, 0, stream>>>(param, grad, m, v, size, h, t);
    detail::check_launch();
    finish_transform(t, blocks, stream);
}

void rmsprop_step(float* param, const float* grad, float* sq, float* buf, float* gavg,
                  int64_t size, double lr, double alpha, double eps, double weight_decay,
                  double momentum, bool centered, const GradTransform& t, cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "rmsprop_step: size must be non-negative, got " << size);
    const RmspropHyper h = rmsprop_hyper(lr, alpha, eps, weight_decay, momentum, centered);
    // The same tests as rmsprop_update's: buf is read exactly when momentum != 0.
    FASTMLP_CHECK(h.momentum == 0.0f || buf != nullptr || size == 0,
                  "rmsprop_step: momentum=" << momentum << " needs a momentum buffer, got null");
    FASTMLP_CHECK(!centered || gavg != nullptr || size == 0,
                  "rmsprop_step: centered needs grad_avg, got null");
    if (!prepare_transform("rmsprop_step", size, t, stream)) return;
    FASTMLP_CHECK(param != nullptr && grad != nullptr && sq != nullptr,
                  "rmsprop_step: param, grad or square_avg is null");
    const unsigned int blocks = detail::grid_stride_blocks(size, kBlock);
    float* b = h.momentum != 0.0f ? buf : nullptr;
    float* a = centered ? gavg : nullptr;
    if (t.noise.std)
        rmsprop_step_f32<true><<<blocks, kBlock, 0, stream>>>(param, grad, sq, b, a, size, h, t);
    else
        rmsprop_step_f32<false><<<blocks, kBlock, 0, stream>>>(param, grad, sq, b, a, size, h, t);
    detail::check_launch();
    finish_transform(t, blocks, stream);
}

}  // namespace cuda
}  // namespace fastmlp
