// CPU SGD, Adam/AdamW and RMSprop steps, in place, optionally after the gradient
// transform (kernel_math.h GradTransform: regularizer gradients, clipping, the
// penalty). The update rules live in kernel_math.h and are shared with the CUDA
// kernels.
#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>

#include "cpu/fpenv.h"
#include "check.h"
#include "cpu/noise.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

// The loops over [i0, i1), one range per thread, cloned per SIMD width (the update
// rule has no cross-element dependence, so any vector width gives the same
// floats as the scalar loop, except where the compiler contracts a*b + c into
// an FMA on targets that have one).
// Each returns 1 when an updated parameter is NaN or +-Inf (an integer OR in
// the same loop: it vectorises with the update and costs no extra pass).
FASTMLP_SIMD_CLONES
uint32_t sgd_range(float* __restrict param, const float* __restrict grad, float* __restrict buf,
                   int64_t i0, int64_t i1, SgdHyper h) {
    uint32_t bad = 0;
    if (buf) {
        for (int64_t i = i0; i < i1; ++i) {
            sgd_update(param[i], grad[i], buf + i, h);
            bad |= nonfinite_bit(param[i]);
        }
    } else {
        for (int64_t i = i0; i < i1; ++i) {
            sgd_update(param[i], grad[i], nullptr, h);
            bad |= nonfinite_bit(param[i]);
        }
    }
    return bad;
}

FASTMLP_SIMD_CLONES
uint32_t adam_range(float* __restrict param, const float* __restrict grad, float* __restrict m,
                    float* __restrict v, int64_t i0, int64_t i1, AdamHyper h) {
    uint32_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
        adam_update(param[i], grad[i], m[i], v[i], h);
        bad |= nonfinite_bit(param[i]);
    }
    return bad;
}

// RMSprop's loop, one body per (momentum buffer, centered) pair so that no
// pointer is formed from a null buffer (null + i is undefined behaviour). The
// caller nulls buf exactly when momentum == 0 and gavg exactly when !centered;
// the body's constants say so at compile time (otherwise GCC keeps a trapping
// path for the null dereference it cannot rule out, and the loop stays scalar).
template <bool kBuf, bool kCentered>
FASTMLP_ACT_INLINE RmspropHyper rmsprop_variant(RmspropHyper h) {
    if (!kBuf) h.momentum = 0.0f;
    h.centered = kCentered;
    return h;
}

template <bool kBuf, bool kCentered>
FASTMLP_ACT_INLINE uint32_t rmsprop_body(float* __restrict param, const float* __restrict grad,
                                         float* __restrict sq, float* __restrict buf,
                                         float* __restrict gavg, int64_t i0, int64_t i1,
                                         const RmspropHyper& h0) {
    const RmspropHyper h = rmsprop_variant<kBuf, kCentered>(h0);
    uint32_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
        rmsprop_update(param[i], grad[i], sq[i], kBuf ? buf + i : nullptr,
                       kCentered ? gavg + i : nullptr, h);
        bad |= nonfinite_bit(param[i]);
    }
    return bad;
}

FASTMLP_SIMD_CLONES
uint32_t rmsprop_range(float* __restrict param, const float* __restrict grad, float* __restrict sq,
                       float* __restrict buf, float* __restrict gavg, int64_t i0, int64_t i1,
                       RmspropHyper h) {
    if (buf && gavg) return rmsprop_body<true, true>(param, grad, sq, buf, gavg, i0, i1, h);
    if (buf) return rmsprop_body<true, false>(param, grad, sq, buf, gavg, i0, i1, h);
    if (gavg) return rmsprop_body<false, true>(param, grad, sq, buf, gavg, i0, i1, h);
    return rmsprop_body<false, false>(param, grad, sq, buf, gavg, i0, i1, h);
}

// ---- With a gradient transform -------------------------------------------------
// The array is cut into fixed blocks that depend on its size only (at most
// kPenaltyBlocks, at least kPenaltyBlockMin elements each), so the penalty does
// not depend on the thread count. Inside a block the penalty sums are taken in
// a fixed order compiled into the loop, the same for every SIMD width (clone):
// element i0 + k goes to lane k % kPenaltyLanes of kPenaltyLanes double
// accumulators per sum, each lane sums its elements in element order, the
// lanes are added in lane order (0, 1, ..., kPenaltyLanes - 1) into the
// block's sums, and the blocks' sums are added in block order. sum|w| and
// sum w^2 are kept apart and are in double: |w| and w * w of a float are exact
// in double (so an fma contraction changes nothing), and each of the
// <= 2^31 / 16 additions per lane rounds to 2^-53 relative, far below the
// tests' 1e-12 against float64 NumPy (which sums pairwise in yet another order).
// Separate lanes are what lets the loop vectorise: one running double sum is a
// serial chain the compiler may not reorder (without -ffast-math), which kept
// the whole fused loop -- the update's sqrt and division included -- scalar
// (adam + penalty: 5.2 ms instead of 0.2 ms at 2^20 elements).
constexpr int64_t kPenaltyBlocks = 256;
constexpr int64_t kPenaltyBlockMin = 4096;
constexpr int kPenaltyLanes = 16;
// A block is processed in chunks of kPenaltyChunk elements (a multiple of
// kPenaltyLanes, so lane k % kPenaltyLanes continues across chunks): the
// penalty over the chunk's pre-update w, then the update of the chunk, which
// finds w still in L1 (8 KiB). Two simple loops vectorise where one fused loop
// of mixed float / double work did not.
constexpr int64_t kPenaltyChunk = 2048;
static_assert(kPenaltyChunk % kPenaltyLanes == 0, "chunks must keep the lane order");

struct PenaltySums {
    double abs_sum = 0.0, sq_sum = 0.0;
};

// Adds w[0, n) to the lane accumulators, element k to lane k % kPenaltyLanes.
FASTMLP_ACT_INLINE void penalty_lanes(const float* __restrict w, int64_t n,
                                      double* __restrict abs_acc, double* __restrict sq_acc) {
    int64_t k = 0;
    for (; k + kPenaltyLanes <= n; k += kPenaltyLanes) {
        for (int j = 0; j < kPenaltyLanes; ++j) {
            const double x = static_cast<double>(w[k + j]);
            abs_acc[j] += std::fabs(x);
            sq_acc[j] += x * x;
        }
    }
    for (int j = 0; k + j < n; ++j) {  // the last < kPenaltyLanes elements: lanes 0, 1, ...
        const double x = static_cast<double>(w[k + j]);
        abs_acc[j] += std::fabs(x);
        sq_acc[j] += x * x;
    }
}

// update(i, g) applies the optimizer's own rule to element i with the transformed g.
// g0 is the gradient of element i0 (g0[i - i0]: the chunk's noisy gradient buffer
// or the caller's gradient array).
template <bool kL1, bool kL2, bool kClip, class Update>
FASTMLP_ACT_INLINE uint32_t transformed_loop_fixed(float* __restrict param,
                                                   const float* __restrict g0, int64_t i0,
                                                   int64_t i1, const GradTransform& t, float scale,
                                                   Update update) {
    uint32_t bad = 0;
    for (int64_t i = i0; i < i1; ++i) {
        const float w = param[i];
        update(i, transform_grad_fixed<kL1, kL2, kClip>(g0[i - i0], w, t, scale));
        bad |= nonfinite_bit(param[i]);
    }
    return bad;
}

// One loop per set of transform steps (kernel_math.h transform_grad_fixed),
// chosen here once per range.
template <class Update>
FASTMLP_ACT_INLINE uint32_t transformed_loop(float* __restrict param, const float* __restrict g0,
                                             int64_t i0, int64_t i1, const GradTransform& t,
                                             float scale, Update update) {
    const bool l1 = t.l1 != 0.0f, l2 = t.l2 != 0.0f, clip = t.clipvalue > 0.0f;
#define FASTMLP_TRANSFORMED_LOOP(a, b, c) \
    transformed_loop_fixed<a, b, c>(param, g0, i0, i1, t, scale, update)
    if (l1) {
        if (l2) return clip ? FASTMLP_TRANSFORMED_LOOP(true, true, true)
                            : FASTMLP_TRANSFORMED_LOOP(true, true, false);
        return clip ? FASTMLP_TRANSFORMED_LOOP(true, false, true)
                    : FASTMLP_TRANSFORMED_LOOP(true, false, false);
    }
    if (l2) return clip ? FASTMLP_TRANSFORMED_LOOP(false, true, true)
                        : FASTMLP_TRANSFORMED_LOOP(false, true, false);
    return clip ? FASTMLP_TRANSFORMED_LOOP(false, false, true)
                : FASTMLP_TRANSFORMED_LOOP(false, false, false);
#undef FASTMLP_TRANSFORMED_LOOP
}

// The transformed update of [i0, i1) and, when pen is not null, its penalty
// sums: chunk by chunk, the penalty lanes of the chunk's pre-update w first
// (one copy of the update loops serves both cases). With DP-SGD noise
// (t.noise.std), the chunk's gradient plus its noise -- the transform's first
// step, fma(std, z, g), the same floats as transform_grad's -- is written to a
// stack buffer by the (vectorised) generator first, and the update loop reads
// that: no extra pass over the parameters, and the noise of an element does not
// depend on the chunk or the thread it falls in (cpu/noise.h).
static_assert(kPenaltyChunk == kNoiseChunk, "one chunk size for the penalty and the noise");
template <class Update>
FASTMLP_ACT_INLINE uint32_t transformed_range(float* __restrict param, const float* __restrict grad,
                                              int64_t i0, int64_t i1, const GradTransform& t,
                                              float scale, PenaltySums* pen, Update update) {
    double abs_acc[kPenaltyLanes] = {}, sq_acc[kPenaltyLanes] = {};
    uint32_t bad = 0;
    const bool noisy = t.noise.std != nullptr;
    const float noise_std = noisy ? *t.noise.std : 0.0f;
    const uint64_t noise_step = noisy ? static_cast<uint64_t>(*t.noise.step) : 0u;
    alignas(64) float noisy_grad[kNoiseChunk];
    for (int64_t c0 = i0; c0 < i1; c0 += kPenaltyChunk) {
        const int64_t c1 = std::min(i1, c0 + kPenaltyChunk);
        if (pen) penalty_lanes(param + c0, c1 - c0, abs_acc, sq_acc);
        const float* g0 = grad + c0;
        if (noisy) {
            gaussian_noise_fill(noisy_grad, g0, noise_std,
                                static_cast<uint64_t>(t.noise.offset + c0), c1 - c0, noise_step,
                                t.noise.key0, t.noise.key1);
            g0 = noisy_grad;
        }
        bad |= transformed_loop(param, g0, c0, c1, t, scale, update);
    }
    if (pen) {
        double abs_sum = 0.0, sq_sum = 0.0;
        for (int j = 0; j < kPenaltyLanes; ++j) {
            abs_sum += abs_acc[j];
            sq_sum += sq_acc[j];
        }
        pen->abs_sum = abs_sum;
        pen->sq_sum = sq_sum;
    }
    return bad;
}

FASTMLP_SIMD_CLONES
uint32_t sgd_range_t(float* __restrict param, const float* __restrict grad, float* __restrict buf,
                     int64_t i0, int64_t i1, SgdHyper h, GradTransform t, float scale,
                     PenaltySums* pen) {
    // Momentum known at compile time in each body (a runtime test left in the
    // loop keeps GCC's trapping null path, or the conditional store, and the
    // loop scalar: 15x slower).
    if (buf && h.momentum != 0.0f) {
        const float mu = h.momentum;
        return transformed_range(param, grad, i0, i1, t, scale, pen, [=](int64_t i, float g) {
            SgdHyper hm = h;
            hm.momentum = mu;
            float b = buf[i];
            sgd_update(param[i], g, &b, hm);
            buf[i] = b;
        });
    }
    SgdHyper h0 = h;
    h0.momentum = 0.0f;
    return transformed_range(param, grad, i0, i1, t, scale, pen,
                             [=](int64_t i, float g) { sgd_update(param[i], g, nullptr, h0); });
}

FASTMLP_SIMD_CLONES
uint32_t adam_range_t(float* __restrict param, const float* __restrict grad, float* __restrict m,
                      float* __restrict v, int64_t i0, int64_t i1, AdamHyper h, GradTransform t,
                      float scale, PenaltySums* pen) {
    if (h.decoupled && h.weight_decay != 0.0f) {
        // AdamW's p * (1 - lr wd) first, as an fma with a -0 addend: exactly
        // adam_update's mul_rn(p, decay_factor), rounded on its own as on the GPU;
        // a plain product GCC may contract into the update's final p + step (it
        // did here once the loop vectorised, and does in the plain loop above).
        AdamHyper h0 = h;
        h0.weight_decay = 0.0f;
        return transformed_range(param, grad, i0, i1, t, scale, pen, [=](int64_t i, float g) {
            param[i] = fma_rn(param[i], h.decay_factor, -0.0f);
            adam_update(param[i], g, m[i], v[i], h0);
        });
    }
    return transformed_range(param, grad, i0, i1, t, scale, pen, [=](int64_t i, float g) {
        adam_update(param[i], g, m[i], v[i], h);
    });
}

template <bool kBuf, bool kCentered>
FASTMLP_ACT_INLINE uint32_t rmsprop_body_t(float* __restrict param, const float* __restrict grad,
                                           float* __restrict sq, float* __restrict buf,
                                           float* __restrict gavg, int64_t i0, int64_t i1,
                                           const RmspropHyper& h0, const GradTransform& t,
                                           float scale, PenaltySums* pen) {
    const RmspropHyper h = rmsprop_variant<kBuf, kCentered>(h0);
    return transformed_range(param, grad, i0, i1, t, scale, pen, [=](int64_t i, float g) {
        rmsprop_update(param[i], g, sq[i], kBuf ? buf + i : nullptr,
                       kCentered ? gavg + i : nullptr, h);
    });
}

FASTMLP_SIMD_CLONES
uint32_t rmsprop_range_t(float* __restrict param, const float* __restrict grad,
                         float* __restrict sq, float* __restrict buf, float* __restrict gavg,
                         int64_t i0, int64_t i1, RmspropHyper h, GradTransform t, float scale,
                         PenaltySums* pen) {
    if (buf && gavg)
        return rmsprop_body_t<true, true>(param, grad, sq, buf, gavg, i0, i1, h, t, scale, pen);
    if (buf)
        return rmsprop_body_t<true, false>(param, grad, sq, buf, gavg, i0, i1, h, t, scale, pen);
    if (gavg)
        return rmsprop_body_t<false, true>(param, grad, sq, buf, gavg, i0, i1, h, t, scale, pen);
    return rmsprop_body_t<false, false>(param, grad, sq, buf, gavg, i0, i1, h, t, scale, pen);
}

// Runs range(i0, i1, pen) over the fixed blocks of [0, size) and writes the
// penalty when t asks for it. Returns whether an updated parameter is not finite.
template <class Range>
bool run_transformed(int64_t size, const GradTransform& t, Range range) {
    FASTMLP_CHECK(!t.noise.std || t.noise.step, "optimizer step: noise needs the step counter");
    FASTMLP_CHECK(t.noise.offset >= 0, "optimizer step: noise offset must be >= 0, got "
                                           << t.noise.offset);
    // The noise loop's instruction set is chosen (FASTMLP_CPU_NOISE read and
    // checked) here, on the calling thread, not first in a worker.
    if (t.noise.std) (void)noise_isa();
    const int64_t want = (size + kPenaltyBlockMin - 1) / kPenaltyBlockMin;
    const int64_t nblocks = std::min(kPenaltyBlocks, std::max<int64_t>(1, want));
    std::array<PenaltySums, kPenaltyBlocks> sums;
    std::atomic<uint32_t> bad{0};
    auto block = [&](int64_t b) {
        const int64_t i0 = size * b / nblocks, i1 = size * (b + 1) / nblocks;
        if (range(i0, i1, t.penalty ? &sums[b] : nullptr)) bad.store(1, std::memory_order_relaxed);
    };
    parallel_chunks(nblocks, size >= kParMin ? pool_threads() : 1, block);
    if (t.penalty) {
        double abs_sum = 0.0, sq_sum = 0.0;
        for (int64_t b = 0; b < nblocks; ++b) {
            abs_sum += sums[b].abs_sum;
            sq_sum += sums[b].sq_sum;
        }
        *t.penalty = static_cast<double>(t.l1) * abs_sum + static_cast<double>(t.l2) * sq_sum;
    }
    return bad.load() != 0;
}

float transform_scale(const GradTransform& t) { return t.scale ? *t.scale : 1.0f; }

}  // namespace

int64_t optimizer_work_doubles() { return 0; }

void sgd_step(float* param, const float* grad, float* buf, int64_t size, float lr,
              float momentum, bool nesterov, float weight_decay, const GradTransform& t) {
    FASTMLP_CHECK(size >= 0, "sgd_step: size must be >= 0, got " << size);
    FASTMLP_CHECK(momentum == 0.0f || buf || size == 0,
                  "sgd_step: momentum != 0 needs a momentum buffer");
    if (size == 0) {
        if (t.penalty) *t.penalty = 0.0;
        return;
    }
    FASTMLP_CHECK(param && grad, "sgd_step: null pointer");
    sgd_step_hyper(param, grad, buf, size, SgdHyper{lr, momentum, weight_decay, nesterov}, t);
}

bool sgd_step_hyper(float* param, const float* grad, float* buf, int64_t size,
                    const SgdHyper& h, const GradTransform& t) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    if (t.any()) {
        const float scale = transform_scale(t);
        return run_transformed(size, t, [&](int64_t i0, int64_t i1, PenaltySums* pen) {
            return sgd_range_t(param, grad, buf, i0, i1, h, t, scale, pen);
        });
    }
    if (size == 0) return false;
    std::atomic<uint32_t> bad{0};
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        if (sgd_range(param, grad, buf, i0, i1, h)) bad.store(1, std::memory_order_relaxed);
    });
    return bad.load() != 0;
}

void adam_step(float* param, const float* grad, float* m, float* v, int64_t size, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               int64_t step, const GradTransform& t) {
    FASTMLP_CHECK(size >= 0, "adam_step: size must be >= 0, got " << size);
    FASTMLP_CHECK(step >= 1, "adam_step: step counts from 1, got " << step);
    if (size == 0) {
        if (t.penalty) *t.penalty = 0.0;
        return;
    }
    FASTMLP_CHECK(param && grad && m && v, "adam_step: null pointer");
    adam_step_hyper(param, grad, m, v, size,
                    adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, step), t);
}

bool adam_step_hyper(float* param, const float* grad, float* m, float* v, int64_t size,
                     const AdamHyper& h, const GradTransform& t) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    if (t.any()) {
        const float scale = transform_scale(t);
        return run_transformed(size, t, [&](int64_t i0, int64_t i1, PenaltySums* pen) {
            return adam_range_t(param, grad, m, v, i0, i1, h, t, scale, pen);
        });
    }
    if (size == 0) return false;
    std::atomic<uint32_t> bad{0};
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        if (adam_range(param, grad, m, v, i0, i1, h)) bad.store(1, std::memory_order_relaxed);
    });
    return bad.load() != 0;
}


void rmsprop_step(float* param, const float* grad, float* sq, float* buf, float* gavg,
                  int64_t size, double lr, double alpha, double eps, double weight_decay,
                  double momentum, bool centered, const GradTransform& t) {
    FASTMLP_CHECK(size >= 0, "rmsprop_step: size must be >= 0, got " << size);
    if (size == 0) {
        if (t.penalty) *t.penalty = 0.0;
        return;
    }
    FASTMLP_CHECK(param && grad && sq, "rmsprop_step: null pointer");
    rmsprop_step_hyper(param, grad, sq, buf, gavg, size,
                       rmsprop_hyper(lr, alpha, eps, weight_decay, momentum, centered), t);
}

bool rmsprop_step_hyper(float* param, const float* grad, float* sq, float* buf, float* gavg,
                        int64_t size, const RmspropHyper& h, const GradTransform& t) {
    // The same tests as rmsprop_update's: it reads buf exactly when momentum != 0
    // and gavg exactly when centered.
    FASTMLP_CHECK(h.momentum == 0.0f || buf || size == 0,
                  "rmsprop_step: momentum != 0 needs a momentum buffer");
    FASTMLP_CHECK(!h.centered || gavg || size == 0, "rmsprop_step: centered needs grad_avg");
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    if (h.momentum == 0.0f) buf = nullptr;
    if (!h.centered) gavg = nullptr;
    if (t.any()) {
        const float scale = transform_scale(t);
        return run_transformed(size, t, [&](int64_t i0, int64_t i1, PenaltySums* pen) {
            return rmsprop_range_t(param, grad, sq, buf, gavg, i0, i1, h, t, scale, pen);
        });
    }
    if (size == 0) return false;
    std::atomic<uint32_t> bad{0};
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        if (rmsprop_range(param, grad, sq, buf, gavg, i0, i1, h))
            bad.store(1, std::memory_order_relaxed);
    });
    return bad.load() != 0;
}

}  // namespace cpu
}  // namespace fastmlp
