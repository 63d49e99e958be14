// CPU SGD and Adam/AdamW steps, in place. The update rules live in kernel_math.h and
// are shared with the CUDA kernels.
#include <atomic>

#include "cpu/fpenv.h"
#include "check.h"
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

}  // namespace

void sgd_step(float* param, const float* grad, float* buf, int64_t size, float lr,
              float momentum, bool nesterov, float weight_decay) {
    FASTMLP_CHECK(size >= 0, "sgd_step: size must be >= 0, got " << size);
    FASTMLP_CHECK(momentum == 0.0f || buf || size == 0,
                  "sgd_step: momentum != 0 needs a momentum buffer");
    if (size == 0) return;
    FASTMLP_CHECK(param && grad, "sgd_step: null pointer");
    sgd_step_hyper(param, grad, buf, size, SgdHyper{lr, momentum, weight_decay, nesterov});
}

bool sgd_step_hyper(float* param, const float* grad, float* buf, int64_t size,
                    const SgdHyper& h) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    if (size == 0) return false;
    std::atomic<uint32_t> bad{0};
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        if (sgd_range(param, grad, buf, i0, i1, h)) bad.store(1, std::memory_order_relaxed);
    });
    return bad.load() != 0;
}

void adam_step(float* param, const float* grad, float* m, float* v, int64_t size, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               int64_t step) {
    FASTMLP_CHECK(size >= 0, "adam_step: size must be >= 0, got " << size);
    FASTMLP_CHECK(step >= 1, "adam_step: step counts from 1, got " << step);
    if (size == 0) return;
    FASTMLP_CHECK(param && grad && m && v, "adam_step: null pointer");
    adam_step_hyper(param, grad, m, v, size,
                    adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, step));
}

bool adam_step_hyper(float* param, const float* grad, float* m, float* v, int64_t size,
                     const AdamHyper& h) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    if (size == 0) return false;
    std::atomic<uint32_t> bad{0};
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        if (adam_range(param, grad, m, v, i0, i1, h)) bad.store(1, std::memory_order_relaxed);
    });
    return bad.load() != 0;
}

}  // namespace cpu
}  // namespace fastmlp
