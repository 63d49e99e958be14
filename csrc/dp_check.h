// The argument checks of DP-SGD's norm ops (issue 17), shared by cpu/dp.cpp and
// cuda/dp.cu so that both backends accept and refuse the same calls (the CPU
// and the CUDA engine, and the per-call ops, reach them alike).
#pragma once

#include <cstdint>

#include "check.h"

namespace fastmlp {

// dp_row_sqnorms: sizes >= 0, and the pointers a non-empty call reads.
inline void check_dp_row_sqnorms_args(const float* x, const float* dz, const float* acc,
                                      int64_t rows, int64_t in, int64_t out) {
    FASTMLP_CHECK(rows >= 0 && in >= 0 && out >= 0,
                  "dp_row_sqnorms: sizes must be >= 0, got rows=" << rows << ", in=" << in
                                                                 << ", out=" << out);
    FASTMLP_CHECK(rows == 0 || (acc && (in == 0 || x) && (out == 0 || dz)),
                  "dp_row_sqnorms: x, dz or acc is null");
}

// dp_clip_factors: a NaN fails these comparisons, so it is refused too.
inline void check_dp_clip_factors_args(const float* acc, int64_t rows, float clip,
                                       float noise_multiplier, float grad_scale,
                                       float divisor) {
    FASTMLP_CHECK(rows >= 0, "dp_clip_factors: rows must be >= 0, got " << rows);
    FASTMLP_CHECK(clip > 0.0f, "dp_clip_factors: clip must be > 0, got " << clip);
    FASTMLP_CHECK(noise_multiplier >= 0.0f,
                  "dp_clip_factors: noise_multiplier must be >= 0, got " << noise_multiplier);
    FASTMLP_CHECK(grad_scale > 0.0f,
                  "dp_clip_factors: grad_scale must be > 0, got " << grad_scale);
    FASTMLP_CHECK(divisor > 0.0f, "dp_clip_factors: divisor must be > 0, got " << divisor);
    FASTMLP_CHECK(rows == 0 || acc, "dp_clip_factors: acc is null");
}

}  // namespace fastmlp
