// The argument checks of the adversarial-example kernels (issue 18: adv_init,
// adv_step), shared by cpu/adversarial.cpp and cuda/adversarial.cu so that both
// backends accept and refuse the same calls.
#pragma once

#include <cmath>
#include <cstdint>

#include "check.h"

namespace fastmlp {

// Sizes, eps (>= 0, finite; a NaN fails the compare) and the clip range (lo <= hi:
// adv_clamp's selects are torch.clamp only then; +-inf allowed, NaN refused).
inline void check_adv_common(const char* op, int64_t rows, int64_t cols, float eps, float lo,
                             float hi) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be >= 0, got rows=" << rows << ", cols=" << cols);
    FASTMLP_CHECK(eps >= 0.0f && std::isfinite(eps),
                  op << ": eps must be a finite number >= 0, got " << eps);
    FASTMLP_CHECK(lo <= hi, op << ": the clip range needs lo <= hi, got lo=" << lo
                                  << ", hi=" << hi);
}

inline void check_adv_init_args(const float* x, const float* adv, int64_t rows, int64_t cols,
                                float eps, float lo, float hi) {
    check_adv_common("adv_init", rows, cols, eps, lo, hi);
    const uint64_t n = static_cast<uint64_t>(rows) * static_cast<uint64_t>(cols);
    if (n == 0) return;
    FASTMLP_CHECK(x && adv, "adv_init: x or adv is null");
    // Elementwise: adv may be x itself (each element read before it is written).
    FASTMLP_CHECK(adv == x || !floats_overlap(adv, n, x, n),
                  "adv_init: adv partially overlaps x");
}

inline void check_adv_step_args(const float* x, const float* adv, const float* grad,
                                int64_t rows, int64_t cols, float eps, float alpha, float lo,
                                float hi) {
    check_adv_common("adv_step", rows, cols, eps, lo, hi);
    FASTMLP_CHECK(alpha >= 0.0f && std::isfinite(alpha),
                  "adv_step: alpha must be a finite number >= 0, got " << alpha);
    const uint64_t n = static_cast<uint64_t>(rows) * static_cast<uint64_t>(cols);
    if (n == 0) return;
    FASTMLP_CHECK(x && adv && grad, "adv_step: x, adv or grad is null");
    FASTMLP_CHECK(!floats_overlap(adv, n, x, n) && !floats_overlap(adv, n, grad, n),
                  "adv_step: adv overlaps x or grad");
}

}  // namespace fastmlp
