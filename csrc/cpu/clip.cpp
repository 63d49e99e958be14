// CPU gradient clipping by norm: the scales grad_clip_scale computes for the
// optimizer's gradient transform (fastmlp.h; kernel_math.h clip_scale_value).
#include <algorithm>
#include <array>
#include <cmath>

#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

// A segment is cut into at most kClipBlocks blocks of at least kClipBlockMin
// elements, fixed by its length alone, so s_k does not depend on the thread
// count (and the CPU needs no scratch). Inside a block the order is fixed in
// the loop, the same for every SIMD width (clone): element i0 + k goes to lane
// k % kClipLanes of kClipLanes double accumulators, each lane sums its squares
// in element order, the lanes are added in lane order into the block's sum, and
// the blocks' sums in block order. All in double, as before (each addition
// rounds to 2^-53 relative); the separate lanes are what lets the loop
// vectorise (one running double sum is a serial chain the compiler may not
// reorder).
constexpr int64_t kClipBlocks = 64;
constexpr int64_t kClipBlockMin = 8192;
constexpr int kClipLanes = 16;

template <bool kL1, bool kL2>
FASTMLP_ACT_INLINE double sum_sq_lanes(const float* __restrict w, const float* __restrict g,
                                       int64_t i0, int64_t i1, float l1, float l2) {
    double acc[kClipLanes] = {};
    int64_t i = i0;
    for (; i + kClipLanes <= i1; i += kClipLanes) {
        for (int j = 0; j < kClipLanes; ++j) {
            const double r = clip_regularized_grad_fixed<kL1, kL2>(g[i + j], w[i + j], l1, l2);
            acc[j] += square_rn(r);
        }
    }
    for (int j = 0; i + j < i1; ++j) {  // the last < kClipLanes elements: lanes 0, 1, ...
        const double r = clip_regularized_grad_fixed<kL1, kL2>(g[i + j], w[i + j], l1, l2);
        acc[j] += square_rn(r);
    }
    double s = 0.0;
    for (int j = 0; j < kClipLanes; ++j) s += acc[j];
    return s;
}

// One loop per (l1 != 0, l2 != 0), chosen once per block. Not cloned for wider
// SIMD: the x86-64-v3/v4 clones would contract acc + r * r into an fma (another
// rounding than square_rn promises, and than the GPU's); the baseline (SSE2)
// loop has no fma to contract into.
double sum_sq_range(const float* __restrict w, const float* __restrict g, int64_t i0, int64_t i1,
                    float l1, float l2) {
    if (l1 != 0.0f) {
        return l2 != 0.0f ? sum_sq_lanes<true, true>(w, g, i0, i1, l1, l2)
                          : sum_sq_lanes<true, false>(w, g, i0, i1, l1, l2);
    }
    return l2 != 0.0f ? sum_sq_lanes<false, true>(w, g, i0, i1, l1, l2)
                      : sum_sq_lanes<false, false>(w, g, i0, i1, l1, l2);
}

double segment_sum_sq(const float* w, const float* g, int64_t n, float l1, float l2) {
    const int64_t nblocks =
        std::min(kClipBlocks, std::max<int64_t>(1, (n + kClipBlockMin - 1) / kClipBlockMin));
    std::array<double, kClipBlocks> part;
    auto block = [&](int64_t b) {
        part[b] = sum_sq_range(w, g, n * b / nblocks, n * (b + 1) / nblocks, l1, l2);
    };
    parallel_chunks(nblocks, n >= kParMin ? pool_threads() : 1, block);
    double s = 0.0;
    for (int64_t b = 0; b < nblocks; ++b) s += part[b];
    return s;
}

}  // namespace

int64_t grad_clip_work_doubles(int64_t, int64_t) { return 0; }

void grad_clip_scale(const float* params, const float* grads, const int64_t* offsets,
                     const float* l1l2, int64_t nseg, int mode, float max_norm, float* scale,
                     double* /*work: not needed on the CPU*/) {
    FASTMLP_CHECK(nseg >= 0, "grad_clip_scale: nseg must be >= 0, got " << nseg);
    FASTMLP_CHECK(mode == 0 || mode == 1,
                  "grad_clip_scale: mode must be 0 (per tensor) or 1 (global), got " << mode);
    if (nseg == 0) return;
    FASTMLP_CHECK(offsets && scale, "grad_clip_scale: offsets or scale is null");
    for (int64_t k = 0; k < nseg; ++k)
        FASTMLP_CHECK(offsets[k] >= 0 && offsets[k + 1] >= offsets[k],
                      "grad_clip_scale: offsets must be non-decreasing from 0, got offsets["
                          << k << "]=" << offsets[k] << ", offsets[" << k + 1
                          << "]=" << offsets[k + 1]);
    FASTMLP_CHECK(offsets[nseg] == offsets[0] || (params && grads),
                  "grad_clip_scale: params or grads is null");
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    double total = 0.0;
    for (int64_t k = 0; k < nseg; ++k) {
        const int64_t i0 = offsets[k], n = offsets[k + 1] - i0;
        const float l1 = l1l2 ? l1l2[2 * k] : 0.0f, l2 = l1l2 ? l1l2[2 * k + 1] : 0.0f;
        const double s = n ? segment_sum_sq(params + i0, grads + i0, n, l1, l2) : 0.0;
        if (mode == 0) scale[k] = clip_scale_value(s, max_norm);
        total += s;
    }
    if (mode == 1) {
        const float g = clip_scale_value(total, max_norm);
        for (int64_t k = 0; k < nseg; ++k) scale[k] = g;
    }
}

}  // namespace cpu
}  // namespace fastmlp
