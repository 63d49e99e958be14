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
// elements, fixed by its length alone; each block sums in element order and the
// blocks are added in order, so s_k does not depend on the thread count (and
// the CPU needs no scratch).
constexpr int64_t kClipBlocks = 64;
constexpr int64_t kClipBlockMin = 8192;

double sum_sq_range(const float* __restrict w, const float* __restrict g, int64_t i0, int64_t i1,
                    float l1, float l2) {
    double s = 0.0;
    for (int64_t i = i0; i < i1; ++i) {
        const double r = clip_regularized_grad(g[i], w[i], l1, l2);
        s += square_rn(r);
    }
    return s;
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
