// The CUDA engine: runs a bound step plan (engine.h) on one GPU, one CUDA
// Graph per (op list, step rows), replayed with no Python and no per-op host
// work.
//
// Why graphs can replay a whole epoch: nothing that changes from step to step
// is a launch argument. The batch index is EngineState::step in device memory
// (the gather / optimizer / store kernels read it, step_end advances it), the
// optimizer constants of step s are hyper[s] (a table the host writes once
// per pass), and the only per-step launch value, the step's row count n, is
// part of the graph key. So a pass captures at most two training graphs: the
// full batch and the last partial one. (Distributed training splits a step's
// graph at its all-reduce, which runs eagerly between the parts: see Slot.)
//
// Streams: the engine works on its own non-blocking stream. CUDA forbids
// capturing the legacy default stream, which is CuPy's default (Stream.null),
// and a non-blocking stream has no implicit synchronisation with it; the
// caller's stream is ordered with events instead: run() makes the engine
// stream wait for the caller's prior work and the caller's stream wait for
// the engine's.
//
// The device-side kernels of the engine (gather_batch_rows, the optimizer's
// step-table updates, store_batch_rows, step_end_accumulate) are here; the
// plan's math ops are the library's launchers (gemm_ex, relu_backward,
// softmax_xent_fused), called through the one op switch, engine_exec.h.

#include <cuda_runtime.h>
#include <math_constants.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <limits>
#include <new>
#include <vector>

#include "check.h"
#include "engine.h"
#include "engine_exec.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"
#include "optim_loops.cuh"

namespace fastmlp {
namespace engine {
namespace {

constexpr int kCopyBlock = 256;   // threads per row-copy block (gather / store)
constexpr int kOptBlock = 256;    // threads per block of the optimizer update
static_assert(kCopyBlock % cuda::detail::kWarpSize == 0, "whole warps per block");

bool aligned_to(const void* p, uintptr_t bytes) {
    return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// ---- Row copies: gather (dataset -> batch buffers) and store (batch -> output) ----
// One block per row (rows grid-strided over the blocks), the block's threads
// striding over the row's elements: a warp moves 32 consecutive elements, so
// every access is coalesced. T is the copy unit, chosen on the host as the
// widest one every row start is aligned to (float4 for 784-float rows:
// 196 16-byte copies per row, one per thread).
template <class T>
__device__ __forceinline__ void copy_row(T* __restrict__ dst, const T* __restrict__ src,
                                         int64_t count) {
    for (int64_t i = threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i];
}

// Labels: label_bytes per row in units of `unit` bytes (16, 8, 4 or 1; the
// host checked that both bases and label_bytes are multiples of it).
__device__ __forceinline__ void copy_label_row(void* dst, const void* src, int64_t label_bytes,
                                               int unit) {
    switch (unit) {   // block-uniform
        case 16:
            copy_row(static_cast<uint4*>(dst), static_cast<const uint4*>(src), label_bytes / 16);
            break;
        case 8:
            copy_row(static_cast<uint2*>(dst), static_cast<const uint2*>(src), label_bytes / 8);
            break;
        case 4:
            copy_row(static_cast<uint32_t*>(dst), static_cast<const uint32_t*>(src),
                     label_bytes / 4);
            break;
        default:
            copy_row(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), label_bytes);
            break;
    }
}

// Batch row r of step s = state->step is dataset row order[s*batch + r]
// (shuffled) or s*batch + r: x_dst(r, :) = x_src(src, :), y likewise (bytes).
// The step is read here, on the device, so a captured graph replays it for
// every step. VEC4: features % 4 == 0 and both x bases 16-byte aligned.
template <bool VEC4>
__global__ void __launch_bounds__(kCopyBlock)
gather_batch_rows(const float* __restrict__ x_src, const void* __restrict__ y_src,
                  const int64_t* __restrict__ order, float* __restrict__ x_dst,
                  void* __restrict__ y_dst, const EngineState* __restrict__ state, int64_t n,
                  int64_t features, int64_t label_bytes, int64_t batch, int64_t source_rows,
                  int label_unit) {
    const int64_t first = state->step * batch;
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        const int64_t src = order != nullptr ? order[first + r] : first + r;
        // A permutation of the source never leaves it; should a corrupt order
        // ever do so, the row is skipped rather than read out of bounds (a
        // kernel cannot raise; the CPU engine throws on the same input).
        if (src < 0 || src >= source_rows) continue;
        if constexpr (VEC4) {
            copy_row(reinterpret_cast<float4*>(x_dst + r * features),
                     reinterpret_cast<const float4*>(x_src + src * features), features / 4);
        } else {
            copy_row(x_dst + r * features, x_src + src * features, features);
        }
        if (y_dst != nullptr)
            copy_label_row(static_cast<uint8_t*>(y_dst) + r * label_bytes,
                           static_cast<const uint8_t*>(y_src) + src * label_bytes, label_bytes,
                           label_unit);
    }
}

// ---- The gradient all-reduce's scaling (engine.h allreduce) ----
// Before the sum: g[i] *= rows and the slot g[count] = rows; after it: g[i] /=
// g[count], the processes' total rows, read on the device (a graph replays the
// step whatever the other processes' rows were). Grid-stride: at most
// kScaleMaxBlocks blocks of kOptBlock threads.
constexpr int kScaleMaxBlocks = 1024;

__global__ void __launch_bounds__(kOptBlock)
allreduce_prescale(float* __restrict__ g, int64_t count, int64_t rows) {
    const float n = static_cast<float>(rows);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
         i += stride)
        g[i] *= n;
    if (blockIdx.x == 0 && threadIdx.x == 0) g[count] = n;
}

__global__ void __launch_bounds__(kOptBlock)
allreduce_normalize(float* __restrict__ g, int64_t count) {
    const float total = g[count];
    if (!(total > 0.0f)) return;  // no rows anywhere: the gradients are zero
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
         i += stride)
        g[i] /= total;
}

// dst(state->step * batch + r, :) = src(r, :) for r < n (predict's output).
template <bool VEC4>
__global__ void __launch_bounds__(kCopyBlock)
store_batch_rows(const float* __restrict__ src, float* __restrict__ dst,
                 const EngineState* __restrict__ state, int64_t n, int64_t cols, int64_t batch) {
    const int64_t first = state->step * batch;
    for (int64_t r = blockIdx.x; r < n; r += gridDim.x) {
        if constexpr (VEC4) {
            copy_row(reinterpret_cast<float4*>(dst + (first + r) * cols),
                     reinterpret_cast<const float4*>(src + r * cols), cols / 4);
        } else {
            copy_row(dst + (first + r) * cols, src + r * cols, cols);
        }
    }
}

// ---- The optimizer: one launch over the flat parameters -------------------------
// The loops of optim_loops.cuh, which optim.cu's sgd_step_f32 / adam_step_f32
// run too, with the constants read from hyper[state->step] instead of a
// by-value argument: the update is bit-identical to fastmlp::cuda::sgd_step /
// adam_step with those constants.
// Every thread loads the (same) step and constants: one broadcast
// transaction per warp, served from L1 after the first warp. A thread that
// left a parameter NaN or +-Inf records the step in
// state->nonfinite_param_step; every writer of one launch writes the same
// value (the step), and launches are ordered by the stream, so the race is
// benign and the result deterministic.
__device__ __forceinline__ void note_nonfinite_param(EngineState* state, int64_t step) {
    if (state->nonfinite_param_step < 0) state->nonfinite_param_step = step;
}

template <bool kNoise>
__global__ void __launch_bounds__(kOptBlock)
sgd_step_table_f32(float* __restrict__ param, const float* __restrict__ grad,
                   float* __restrict__ buf, int64_t size, const StepHyper* __restrict__ hyper,
                   EngineState* state, GradTransform t) {
    const int64_t step = state->step;
    if (cuda::sgd_loop<kNoise>(param, grad, buf, size, hyper[step].sgd, t))
        note_nonfinite_param(state, step);
}

template <bool kNoise>
__global__ void __launch_bounds__(kOptBlock)
adam_step_table_f32(float* __restrict__ param, const float* __restrict__ grad,
                    float* __restrict__ m, float* __restrict__ v, int64_t size,
                    const StepHyper* __restrict__ hyper, EngineState* state, GradTransform t) {
    const int64_t step = state->step;
    if (cuda::adam_loop<kNoise>(param, grad, m, v, size, hyper[step].adam, t))
        note_nonfinite_param(state, step);
}

template <bool kNoise>
__global__ void __launch_bounds__(kOptBlock)
rmsprop_step_table_f32(float* __restrict__ param, const float* __restrict__ grad,
                       float* __restrict__ sq, float* __restrict__ buf, float* __restrict__ gavg,
                       int64_t size, const StepHyper* __restrict__ hyper, EngineState* state,
                       GradTransform t) {
    const int64_t step = state->step;
    if (cuda::rmsprop_loop<kNoise>(param, grad, sq, buf, gavg, size, hyper[step].rmsprop, t))
        note_nonfinite_param(state, step);
}

// ---- End of step: the pass's running sums, then step += 1 -------------------------
// One thread: a handful of scalar updates, ordered after the step's kernels
// by the stream. loss * n is rounded once and then added (__dmul_rn /
// __dadd_rn forbid contracting them into one fma), as the host computes it;
// the product of a float and an integer n < 2^29 is exact in double anyway.
__global__ void __launch_bounds__(1)
step_end_accumulate(EngineState* __restrict__ st, const StepScalars* __restrict__ sc,
                    const double* __restrict__ penalty, int64_t segments, bool metrics,
                    int64_t n) {
    if (penalty != nullptr) {
        double p = 0.0;  // the segments in order, as the CPU
        for (int64_t k = 0; k < segments; ++k) p = __dadd_rn(p, penalty[k]);
        st->penalty_sum = __dadd_rn(st->penalty_sum, __dmul_rn(p, static_cast<double>(n)));
    }
    if (sc != nullptr && metrics)
        for (int i = 0; i < kNumMetricSums; ++i) st->metric[i] = __dadd_rn(st->metric[i], sc->metric[i]);
    if (sc != nullptr) {
        const float loss = sc->loss;
        st->loss_sum = __dadd_rn(st->loss_sum,
                                 __dmul_rn(static_cast<double>(loss), static_cast<double>(n)));
        st->correct += sc->hits;
        if (!isfinite(loss) && st->nonfinite_step < 0) st->nonfinite_step = st->step;
        if (sc->bad_row >= 0 && st->bad_row < 0) st->bad_row = sc->bad_row;
    }
    st->step += 1;
    st->rng_step += 1;
}

// The widest copy unit (16, 8, 4 or 1 bytes) that divides the row length and
// both base addresses, so every row start is aligned to it.
int label_copy_unit(const void* src, const void* dst, int64_t label_bytes) {
    for (int unit : {16, 8, 4}) {
        if (label_bytes % unit == 0 && aligned_to(src, unit) && aligned_to(dst, unit)) return unit;
    }
    return 1;
}

// The device functions of the op switch (engine_exec.h), CUDA flavour. Each
// checks what its kernel would otherwise dereference, so a bad plan raises
// on the host (at the eager warm-up step, before any capture) instead of
// faulting on the device.
struct CudaDev {
    using Stream = cudaStream_t;

    static void gemm_ex(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                        float* c, int64_t ldc, const GemmEpilogue& ep, Precision precision,
                        Stream stream) {
        cuda::gemm_ex(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep,
                      precision, stream);
    }

    static void activation_fwd(const float* x, float* y, int64_t rows, int64_t cols, int act,
                               const DropoutSpec& drop, Stream stream) {
        cuda::activation_fwd(x, y, rows, cols, act, drop, stream);
    }

    static void activation_bwd(const float* dy, const float* saved, float* dx, int64_t rows,
                               int64_t cols, int act, bool saved_is_input,
                               const DropoutSpec& drop, Stream stream) {
        cuda::activation_bwd(dy, saved, dx, rows, cols, act, saved_is_input, drop, stream);
    }

    static void batchnorm_fwd(const float* x, const float* gamma, const float* beta, float* y,
                              float* mean, float* invstd, float* moving_mean, float* moving_var,
                              int64_t rows, int64_t cols, float eps, float momentum,
                              bool training, Stream stream) {
        cuda::batchnorm_fwd(x, gamma, beta, y, mean, invstd, moving_mean, moving_var, rows, cols,
                           eps, momentum, training, stream);
    }

    static void batchnorm_bwd(const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* invstd, float* dx, float* dgamma,
                              float* dbeta, int64_t rows, int64_t cols, Stream stream) {
        cuda::batchnorm_bwd(dy, x, gamma, mean, invstd, dx, dgamma, dbeta, rows, cols, stream);
    }

    static void layernorm_fwd(const float* x, const float* gamma, const float* beta, float* y,
                              float* mean, float* invstd, int64_t rows, int64_t cols, float eps,
                              Stream stream) {
        cuda::layernorm_fwd(x, gamma, beta, y, mean, invstd, rows, cols, eps, stream);
    }

    static void layernorm_bwd(const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* invstd, float* dx, float* dgamma,
                              float* dbeta, int64_t rows, int64_t cols, Stream stream) {
        cuda::layernorm_bwd(dy, x, gamma, mean, invstd, dx, dgamma, dbeta, rows, cols, stream);
    }

    static void xent(const float* logits, const void* labels, LabelKind kind, float* out,
                     float* row_loss, int32_t* row_hits, StepScalars* scalars, int64_t rows,
                     int64_t cols, bool backward, Stream stream) {
        FASTMLP_CHECK(scalars != nullptr, "engine xent: the scalars buffer is missing");
        cuda::softmax_xent_fused(logits, labels, kind, out, row_loss, row_hits, &scalars->loss,
                                 &scalars->hits, &scalars->bad_row, rows, cols, backward, stream);
    }

    static void loss(const float* pred, const void* labels, LabelKind kind, const float* weight,
                     float* dpred, float* row_loss, StepScalars* scalars, int64_t rows,
                     int64_t cols, const LossSpec& spec, Stream stream) {
        FASTMLP_CHECK(scalars != nullptr, "engine loss: the scalars buffer is missing");
        cuda::loss_fused(pred, labels, kind, weight, dpred, row_loss, &scalars->loss,
                         &scalars->bad_row, rows, cols, spec, stream);
    }

    static void metrics(const float* pred, const void* labels, LabelKind kind, float* probs_out,
                        float* scratch, StepScalars* scalars, int64_t rows, int64_t cols,
                        const MetricSpec& spec, Stream stream) {
        FASTMLP_CHECK(scalars != nullptr, "engine metrics: the scalars buffer is missing");
        cuda::metrics_fused(pred, labels, kind, probs_out, scratch, scalars->metric, rows, cols,
                            spec, stream);
    }

    static void clip(const float* params, const float* grads, const int64_t* offsets,
                     const float* l1l2, int64_t segments, int mode, float max_norm, float* scale,
                     double* work, Stream stream) {
        cuda::grad_clip_scale(params, grads, offsets, l1l2, segments, mode, max_norm, scale, work,
                              stream);
    }

    static void dp_row_sqnorms(const float* x, const float* dz, float* acc, int64_t rows,
                               int64_t in, int64_t out, bool bias, bool accumulate,
                               Stream stream) {
        cuda::dp_row_sqnorms(x, dz, acc, rows, in, out, bias, accumulate, stream);
    }

    static void dp_clip_factors(float* acc, int64_t rows, float clip, float noise_multiplier,
                                float grad_scale, float divisor, float* std_out, Stream stream) {
        cuda::dp_clip_factors(acc, rows, clip, noise_multiplier, grad_scale, divisor, std_out,
                              stream);
    }

    static void target_seed(const float* logits, const int32_t* targets, float* out,
                            int64_t rows, int64_t cols, int32_t transform, Stream stream) {
        cuda::target_seed(logits, targets, out, rows, cols, transform, stream);
    }

    static void ig_interpolate(const float* x, const float* baseline, const float* alphas,
                               const int32_t* targets, float* out, int32_t* targets_out,
                               int64_t images, int64_t cols, int64_t steps, const int64_t* step,
                               int64_t batch, int64_t rows, Stream stream) {
        cuda::ig_interpolate(x, baseline, alphas, targets, out, targets_out, images, cols, steps,
                             step, batch, rows, stream);
    }

    static void ig_accumulate(const float* grads, const float* x, const float* baseline,
                              const float* weights, float* out, int64_t images, int64_t cols,
                              int64_t steps, const int64_t* step, int64_t batch, int64_t rows,
                              bool multiply, bool absolute, Stream stream) {
        cuda::ig_accumulate(grads, x, baseline, weights, out, images, cols, steps, step, batch,
                            rows, multiply, absolute, stream);
    }

    static void adv_init(const float* x, float* adv, int64_t rows, int64_t cols, float eps,
                         float lo, float hi, const int64_t* step, uint32_t key0, uint32_t key1,
                         Stream stream) {
        cuda::adv_init(x, adv, rows, cols, eps, lo, hi, step, key0, key1, stream);
    }

    static void adv_step(const float* x, float* adv, const float* grad, int64_t rows,
                         int64_t cols, float eps, float alpha, float lo, float hi, bool project,
                         Stream stream) {
        cuda::adv_step(x, adv, grad, rows, cols, eps, alpha, lo, hi, project, stream);
    }

    static void gather(const float* x_src, const void* y_src, const int64_t* order, float* x_dst,
                       void* y_dst, const EngineState* state, int64_t n, int64_t features,
                       int64_t label_bytes, int64_t batch, int64_t source_rows, Stream stream) {
        FASTMLP_CHECK(n >= 0 && features >= 0 && label_bytes >= 0 && batch >= n,
                      "engine gather: bad sizes n=" << n << " features=" << features
                                                    << " label_bytes=" << label_bytes
                                                    << " batch=" << batch);
        if (n == 0) return;
        FASTMLP_CHECK(state != nullptr, "engine gather: the state buffer is missing");
        FASTMLP_CHECK(features == 0 || (x_src != nullptr && x_dst != nullptr),
                      "engine gather: x source or batch buffer is missing");
        const bool labels = y_dst != nullptr && label_bytes > 0;
        FASTMLP_CHECK(!labels || y_src != nullptr,
                      "engine gather: a label batch buffer without a label source");
        const bool vec4 = features % 4 == 0 && aligned_to(x_src, 16) && aligned_to(x_dst, 16);
        const int unit = labels ? label_copy_unit(y_src, y_dst, label_bytes) : 1;
        const unsigned int blocks = cuda::detail::grid_stride_blocks(n, 1);
        if (vec4)
            gather_batch_rows<true><<<blocks, kCopyBlock, 0, stream>>>(
                x_src, y_src, order, x_dst, labels ? y_dst : nullptr, state, n, features,
                label_bytes, batch, source_rows, unit);
        else
            gather_batch_rows<false><<<blocks, kCopyBlock, 0, stream>>>(
                x_src, y_src, order, x_dst, labels ? y_dst : nullptr, state, n, features,
                label_bytes, batch, source_rows, unit);
        cuda::detail::check_launch();
    }

    static void optimizer(int64_t kind, float* params, const float* grads, float* s0, float* s1,
                          float* s2, int64_t size, const StepHyper* hyper, EngineState* state,
                          const GradTransform& t, Stream stream) {
        FASTMLP_CHECK(kind == kSgd || kind == kAdam || kind == kRmsprop,
                      "engine optimizer: unknown kind " << kind);
        FASTMLP_CHECK(size >= 0, "engine optimizer: size must be >= 0, got " << size);
        if (size == 0) return;
        FASTMLP_CHECK(params != nullptr && grads != nullptr && hyper != nullptr &&
                          state != nullptr,
                      "engine optimizer: params, grads, hyper or state buffer is missing");
        FASTMLP_CHECK(t.penalty == nullptr || t.work != nullptr,
                      "engine optimizer: a penalty needs the work buffer");
        const unsigned int blocks = cuda::detail::grid_stride_blocks(size, kOptBlock);
        FASTMLP_CHECK(t.noise.std == nullptr || t.noise.step != nullptr,
                      "engine optimizer: noise needs the step counter");
        // The noisy kernels are separate instantiations (optim_loops.cuh transformed_loop).
        const bool noisy = t.noise.std != nullptr;
        if (kind == kSgd) {
            // s0 may be null: momentum 0 (checked per step on the device).
            if (noisy)
                sgd_step_table_f32<true><<<blocks, kOptBlock, 0, stream>>>(params, grads, s0,
                                                                           size, hyper, state, t);
            else
                sgd_step_table_f32<false><<<blocks, kOptBlock, 0, stream>>>(params, grads, s0,
                                                                            size, hyper, state, t);
        } else if (kind == kAdam) {
            FASTMLP_CHECK(s0 != nullptr && s1 != nullptr,
                          "engine optimizer: Adam needs the m and v buffers");
            if (noisy)
                adam_step_table_f32<true><<<blocks, kOptBlock, 0, stream>>>(
                    params, grads, s0, s1, size, hyper, state, t);
            else
                adam_step_table_f32<false><<<blocks, kOptBlock, 0, stream>>>(
                    params, grads, s0, s1, size, hyper, state, t);
        } else {
            FASTMLP_CHECK(s0 != nullptr, "engine optimizer: RMSprop needs its square_avg buffer");
            if (noisy)
                rmsprop_step_table_f32<true><<<blocks, kOptBlock, 0, stream>>>(
                    params, grads, s0, s1, s2, size, hyper, state, t);
            else
                rmsprop_step_table_f32<false><<<blocks, kOptBlock, 0, stream>>>(
                    params, grads, s0, s1, s2, size, hyper, state, t);
        }
        cuda::detail::check_launch();
        if (t.penalty != nullptr) {  // the blocks' partial penalties, summed in order
            cuda::penalty_finish<<<1, cuda::kPenaltyFinishThreads, 0, stream>>>(
                t.work, static_cast<int64_t>(blocks), t.penalty);
            cuda::detail::check_launch();
        }
    }

    static void store(const float* src, float* dst, const EngineState* state, int64_t n,
                      int64_t cols, int64_t batch, Stream stream) {
        FASTMLP_CHECK(n >= 0 && cols >= 0 && batch >= n,
                      "engine store: bad sizes n=" << n << " cols=" << cols << " batch=" << batch);
        if (n == 0 || cols == 0) return;
        FASTMLP_CHECK(src != nullptr && dst != nullptr && state != nullptr,
                      "engine store: src, dst or state buffer is missing");
        const bool vec4 = cols % 4 == 0 && aligned_to(src, 16) && aligned_to(dst, 16);
        const unsigned int blocks = cuda::detail::grid_stride_blocks(n, 1);
        if (vec4)
            store_batch_rows<true><<<blocks, kCopyBlock, 0, stream>>>(src, dst, state, n, cols,
                                                                      batch);
        else
            store_batch_rows<false><<<blocks, kCopyBlock, 0, stream>>>(src, dst, state, n, cols,
                                                                       batch);
        cuda::detail::check_launch();
    }

    // engine.h's allreduce: the hook (CuPy's NCCL) enqueues the all-reduce on
    // the engine's stream between the two scaling kernels. Never captured: the
    // engine runs allreduce ops eagerly between a step's graphs (see Slot).
    static void allreduce(float* grads, int64_t count, int64_t rows, const AllreduceHook& hook,
                          Stream stream) {
        const int blocks = static_cast<int>(
            std::min<int64_t>(kScaleMaxBlocks, cuda::detail::ceil_div(count + 1, kOptBlock)));
        allreduce_prescale<<<blocks, kOptBlock, 0, stream>>>(grads, count, rows);
        cuda::detail::check_launch();
        hook(reinterpret_cast<std::uintptr_t>(grads), count + 1,
             reinterpret_cast<std::uintptr_t>(stream));
        allreduce_normalize<<<blocks, kOptBlock, 0, stream>>>(grads, count);
        cuda::detail::check_launch();
    }

    static void step_end(EngineState* state, const StepScalars* scalars, const double* penalty,
                         int64_t segments, bool metrics, int64_t n, Stream stream) {
        FASTMLP_CHECK(state != nullptr, "engine step_end: the state buffer is missing");
        step_end_accumulate<<<1, 1, 0, stream>>>(state, scalars, penalty, segments, metrics, n);
        cuda::detail::check_launch();
    }
};

// Makes `device` current for a scope and restores the caller's device: the
// engine's calls work whatever device CuPy (or the user) made current.
class DeviceGuard {
public:
    explicit DeviceGuard(int device) {
        CUDA_CHECK(cudaGetDevice(&previous_));
        if (previous_ != device) {
            CUDA_CHECK(cudaSetDevice(device));
            switched_ = true;
        }
    }
    // For destructors: never throws; a failure leaves the current device as is.
    DeviceGuard(int device, std::nothrow_t) {
        if (cudaGetDevice(&previous_) != cudaSuccess) return;
        if (previous_ != device) switched_ = cudaSetDevice(device) == cudaSuccess;
    }
    ~DeviceGuard() {
        if (switched_) cudaSetDevice(previous_);
    }
    DeviceGuard(const DeviceGuard&) = delete;
    DeviceGuard& operator=(const DeviceGuard&) = delete;

private:
    int previous_ = 0;
    bool switched_ = false;
};

// Stream capture with a guaranteed end: if anything throws between begin and
// finish(), the destructor ends the capture and destroys the partial graph,
// so the stream is usable again (a stream left capturing would turn every
// later launch on it into an error) and nothing leaks. The idea of
// tiny-cuda-nn's capture guard, for one capture that is then replayed.
//
// Capture mode ThreadLocal: while this thread captures, this thread's
// "unsafe" calls (a synchronous cudaMemcpy or cudaMalloc, which cannot be
// recorded into a graph) fail loudly instead of being silently left out of
// the graph, but other threads (CuPy's allocator on another Python thread)
// are not affected, as they would be by the Global mode.
class CaptureGuard {
public:
    explicit CaptureGuard(cudaStream_t stream) : stream_(stream) {
        CUDA_CHECK(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal));
        active_ = true;
    }
    // Ends the capture and returns the recorded graph (the caller owns it).
    cudaGraph_t finish() {
        cudaGraph_t graph = nullptr;
        active_ = false;
        CUDA_CHECK(cudaStreamEndCapture(stream_, &graph));
        return graph;
    }
    ~CaptureGuard() {
        if (!active_) return;
        cudaGraph_t graph = nullptr;
        // An invalidated capture returns an error and no graph; either way
        // the stream leaves capture mode.
        if (cudaStreamEndCapture(stream_, &graph) == cudaSuccess && graph != nullptr)
            cudaGraphDestroy(graph);
        cudaGetLastError();   // clear the capture error so the rethrown one is what is reported
    }
    CaptureGuard(const CaptureGuard&) = delete;
    CaptureGuard& operator=(const CaptureGuard&) = delete;

private:
    cudaStream_t stream_;
    bool active_ = false;
};

class CudaEngine final : public Engine {
public:
    explicit CudaEngine(int device) : device_(device) {
        DeviceGuard guard(device_);
        // FASTMLP_CUDA_GRAPHS=0 runs every step eagerly (for tests comparing
        // graphs on and off, and for profiling op by op).
        const char* env = std::getenv("FASTMLP_CUDA_GRAPHS");
        use_graphs_ = !(env != nullptr && std::strcmp(env, "0") == 0);
        try {
            CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
            // Timing off: these only order streams, and untimed events are cheaper.
            CUDA_CHECK(cudaEventCreateWithFlags(&caller_ready_, cudaEventDisableTiming));
            CUDA_CHECK(cudaEventCreateWithFlags(&engine_done_, cudaEventDisableTiming));
            CUDA_CHECK(cudaEventCreateWithFlags(&legacy_ready_, cudaEventDisableTiming));
        } catch (...) {
            release();
            throw;
        }
        // A plan has three lists and a handful of row counts (full batch,
        // last batch, evaluation batch): no reallocation in steady state. DP-SGD's
        // Poisson sampling is the exception: one graph per distinct batch size
        // (~100 at an expected batch of 256), each captured once.
        slots_.reserve(16);
    }

    CudaEngine(const CudaEngine&) = delete;   // owns a stream, events and graphs
    CudaEngine& operator=(const CudaEngine&) = delete;

    ~CudaEngine() override {
        DeviceGuard guard(device_, std::nothrow);
        // Let in-flight steps finish before their graphs, events and stream
        // go (CUDA would defer those frees anyway, but the plan's buffers
        // belong to CuPy, which may reuse them as soon as the engine is gone).
        // Errors are ignored: a destructor must not throw.
        if (stream_ != nullptr) cudaStreamSynchronize(stream_);
        destroy_graphs(-1);
        release();
    }

    int64_t run(int list, int64_t rows, int64_t batch, int64_t first, int64_t count,
                std::uintptr_t stream) override {
        FASTMLP_CHECK(list >= 0 && list < kNumLists, "engine run: unknown op list " << list);
        FASTMLP_CHECK(rows >= 0 && batch >= 1 && first >= 0 && count >= 0,
                      "engine run: bad arguments rows=" << rows << " batch=" << batch
                                                        << " first=" << first
                                                        << " count=" << count);
        if (count == 0) return 0;
        // The last step must start inside the data: (first + count - 1) * batch < rows,
        // computed without overflow; or one step that starts at the end of the data,
        // an empty batch (DP-SGD's Poisson sampling draws some: their update is noise).
        const int64_t steps_total = cuda::detail::ceil_div(rows, batch) +
                                    (count == 1 && rows % batch == 0 && first == rows / batch);
        FASTMLP_CHECK(first < steps_total && count <= steps_total - first,
                      "engine run: steps " << first << ".." << first + count - 1 << " of "
                                           << rows << " rows in batches of " << batch
                                           << " (only " << steps_total << " steps)");
        check_run(list, first, count);   // buffers bound, steps within the optimizer table

        DeviceGuard guard(device_);
        cudaStream_t caller = reinterpret_cast<cudaStream_t>(stream);
        // The engine's work starts after everything already queued on the
        // caller's stream (e.g. CuPy filling the dataset or the parameters).
        CUDA_CHECK(cudaEventRecord(caller_ready_, caller));
        CUDA_CHECK(cudaStreamWaitEvent(stream_, caller_ready_, 0));
        try {
            for (int64_t s = first; s < first + count; ++s) {
                const int64_t n = batch < rows - s * batch ? batch : rows - s * batch;
                run_step(list, n);
            }
        } catch (...) {
            join_caller_nothrow(caller);
            throw;
        }
        // The caller's later work (CuPy reading parameters or outputs, freeing
        // buffers back to its pool) waits for the engine's.
        CUDA_CHECK(cudaEventRecord(engine_done_, stream_));
        CUDA_CHECK(cudaStreamWaitEvent(caller, engine_done_, 0));
        return count;
    }

    void synchronize() override {
        DeviceGuard guard(device_);
        CUDA_CHECK(cudaStreamSynchronize(stream_));
    }

    int64_t graphs_captured() const override { return graphs_captured_; }

protected:
    void write(void* dst, const void* src, size_t bytes) override {
        if (bytes == 0) return;
        DeviceGuard guard(device_);
        // Engine buffers are CuPy allocations, possibly just initialised by
        // CuPy on its stream. write() has no caller stream, so it orders
        // itself after the legacy default stream: CuPy's default stream is
        // that stream, and CuPy's other streams are blocking streams, whose
        // work the legacy stream waits for. (A non-blocking caller stream is
        // ordered by run()'s events only.) No host wait: an event, not a sync.
        CUDA_CHECK(cudaEventRecord(legacy_ready_, cudaStreamLegacy));
        CUDA_CHECK(cudaStreamWaitEvent(stream_, legacy_ready_, 0));
        // From pageable host memory the call returns once the source has been
        // staged (or copied), so the caller may reuse `src` at once; the copy
        // is ordered before the engine's later steps by the stream.
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    }

    void read(void* dst, const void* src, size_t bytes) override {
        if (bytes == 0) return;
        DeviceGuard guard(device_);
        CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
        // Into pageable memory the async copy may return before the bytes
        // land; the sync makes `dst` valid (and waits for the steps before it).
        CUDA_CHECK(cudaStreamSynchronize(stream_));
    }

    void on_plan_changed() override {
        // Graphs hold the pointers and ops they were captured with. A new
        // buffer table invalidates all of them; a new op list only its own
        // (fit sets the evaluation list after the training graphs exist, and
        // they stay valid). The warm-up marks go with the graphs: a changed
        // key warms up again before it is captured.
        DeviceGuard guard(device_, std::nothrow);
        if (bufs_ != seen_bufs_) {
            destroy_graphs(-1);
            seen_bufs_ = bufs_;
        }
        for (int l = 0; l < kNumLists; ++l) {
            if (!same_ops(ops_[l], seen_ops_[l])) {
                destroy_graphs(l);
                seen_ops_[l] = ops_[l];
            }
        }
    }

private:
    // One (list, rows) key: warmed after its first (eager) step, captured at
    // its second, replayed from the third on. A step is one graph, or, in a
    // list with allreduce ops (distributed training), one graph per run of ops
    // between them: the all-reduce itself always runs eagerly between the
    // graphs. NCCL could be captured, but it requires every process to
    // capture or replay the same collectives together, and the processes'
    // row counts -- hence their graph keys -- differ in an epoch's last step;
    // eager, the all-reduce is the same call on every process (and no Python
    // runs inside a capture). graphs[k] / execs[k]: segment k (null: empty).
    struct Slot {
        int list;
        int64_t rows;
        bool captured;
        std::vector<cudaGraph_t> graphs;
        std::vector<cudaGraphExec_t> execs;
    };

    void run_step(int list, int64_t n) {
        Slot* slot = find_slot(list, n);
        if (slot != nullptr && slot->captured) {
            replay(*slot, list, n);
            return;
        }
        if (slot == nullptr || !use_graphs_) {
            // First time for this key (or graphs off): a real step, run op by
            // op. It also performs any lazy one-time host setup of the kernels
            // (e.g. a GEMM configuration's shared-memory attribute), which
            // must not happen for the first time inside a capture.
            run_ops(list, n);
            if (slot == nullptr && use_graphs_) slots_.push_back(Slot{list, n, false, {}, {}});
            return;
        }
        capture(*slot, list, n);
        replay(*slot, list, n);
    }

    void run_ops(int list, int64_t n) {
        void* const* table = bufs_.data();
        for (const PlanOp& op : ops_[list]) run_op<CudaDev>(op, table, n, stream_, allreduce_);
    }

    // The segments' graphs, with the allreduce ops between them run eagerly.
    void replay(const Slot& slot, int list, int64_t n) {
        const std::vector<PlanOp>& ops = ops_[list];
        size_t seg = 0;
        for (size_t i = 0; i <= ops.size(); ++i) {
            if (i < ops.size() && ops[i].code != OpCode::allreduce) continue;
            if (slot.execs[seg] != nullptr) CUDA_CHECK(cudaGraphLaunch(slot.execs[seg], stream_));
            ++seg;
            if (i < ops.size()) run_op<CudaDev>(ops[i], bufs_.data(), n, stream_, allreduce_);
        }
    }

    // Captures each segment of the list's ops (runs of ops between allreduce
    // ops); nothing runs: replay() then launches them.
    void capture(Slot& slot, int list, int64_t n) {
        const std::vector<PlanOp>& ops = ops_[list];
        std::vector<cudaGraph_t> graphs;
        std::vector<cudaGraphExec_t> execs;
        try {
            size_t begin = 0;
            for (size_t i = 0; i <= ops.size(); ++i) {
                if (i < ops.size() && ops[i].code != OpCode::allreduce) continue;
                graphs.push_back(nullptr);
                execs.push_back(nullptr);
                if (i > begin) {
                    {
                        CaptureGuard capture(stream_);
                        for (size_t k = begin; k < i; ++k)
                            run_op<CudaDev>(ops[k], bufs_.data(), n, stream_, allreduce_);
                        graphs.back() = capture.finish();
                    }
                    CUDA_CHECK(cudaGraphInstantiate(&execs.back(), graphs.back(), 0));
                }
                begin = i + 1;
            }
        } catch (...) {
            for (cudaGraphExec_t e : execs)
                if (e != nullptr) cudaGraphExecDestroy(e);
            for (cudaGraph_t g : graphs)
                if (g != nullptr) cudaGraphDestroy(g);
            throw;
        }
        slot.graphs = std::move(graphs);
        slot.execs = std::move(execs);
        slot.captured = true;
        ++graphs_captured_;
    }

    Slot* find_slot(int list, int64_t n) {
        for (Slot& s : slots_)
            if (s.list == list && s.rows == n) return &s;
        return nullptr;
    }

    // Best effort, for the error path: the caller's stream still waits for
    // whatever the engine queued before the failure.
    void join_caller_nothrow(cudaStream_t caller) {
        if (cudaEventRecord(engine_done_, stream_) == cudaSuccess)
            cudaStreamWaitEvent(caller, engine_done_, 0);
    }

    // Destroys the graphs (and forgets the warm-up) of op list `list`, or of
    // every list when list < 0. An exec still in flight is freed by CUDA when
    // its launch completes.
    void destroy_graphs(int list) noexcept {
        size_t kept = 0;
        for (size_t i = 0; i < slots_.size(); ++i) {
            Slot& s = slots_[i];
            if (list >= 0 && s.list != list) {
                slots_[kept++] = s;
                continue;
            }
            for (cudaGraphExec_t e : s.execs)
                if (e != nullptr) cudaGraphExecDestroy(e);
            for (cudaGraph_t g : s.graphs)
                if (g != nullptr) cudaGraphDestroy(g);
        }
        slots_.resize(kept);
    }

    // Field by field: PlanOp has padding, which memcmp would compare too.
    static bool same_ops(const std::vector<PlanOp>& a, const std::vector<PlanOp>& b) {
        if (a.size() != b.size()) return false;
        for (size_t i = 0; i < a.size(); ++i) {
            if (a[i].code != b[i].code) return false;
            for (int k = 0; k < kMaxBufs; ++k)
                if (a[i].buf[k] != b[i].buf[k]) return false;
            for (int k = 0; k < kMaxDims; ++k)
                if (a[i].dim[k] != b[i].dim[k]) return false;
        }
        return true;
    }

    void release() noexcept {
        if (legacy_ready_ != nullptr) cudaEventDestroy(legacy_ready_);
        if (engine_done_ != nullptr) cudaEventDestroy(engine_done_);
        if (caller_ready_ != nullptr) cudaEventDestroy(caller_ready_);
        if (stream_ != nullptr) cudaStreamDestroy(stream_);
        legacy_ready_ = engine_done_ = caller_ready_ = nullptr;
        stream_ = nullptr;
    }

    int device_;
    bool use_graphs_ = true;
    cudaStream_t stream_ = nullptr;
    cudaEvent_t caller_ready_ = nullptr;   // caller's stream -> engine stream (run)
    cudaEvent_t engine_done_ = nullptr;    // engine stream -> caller's stream (run)
    cudaEvent_t legacy_ready_ = nullptr;   // legacy stream -> engine stream (write)
    std::vector<Slot> slots_;
    // The table and lists the current graphs were captured with
    // (on_plan_changed compares against them).
    std::vector<void*> seen_bufs_;
    std::vector<PlanOp> seen_ops_[kNumLists];
    int64_t graphs_captured_ = 0;
};

}  // namespace

Engine* new_cuda_engine(int device) {
    int count = 0;
    CUDA_CHECK(cudaGetDeviceCount(&count));
    FASTMLP_CHECK(device >= 0 && device < count,
                  "new_cuda_engine: device " << device << " does not exist (" << count
                                             << " CUDA devices)");
    return new CudaEngine(device);
}

}  // namespace engine
}  // namespace fastmlp
