// [issue 16] CPU fused metrics: per-row metric values of one step, summed per
// metric in a fixed order (fastmlp.h metrics_fused; the rules: metric_math.h).
//
// Rows are split over the thread pool; each row's values go to row_scratch
// (metric m's values at m * rows), and the sums then run over r = 0..rows-1 in
// order in double on the calling thread, so they do not depend on the thread
// count.
#include <cmath>
#include <cstdint>
#include <limits>

#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "metric_math.h"

namespace fastmlp {
namespace cpu {
namespace {

// The label of row r as a class index, or -1 when there is none: an integer
// label outside [0, cols) (compared before any narrowing or indexing), or a
// float label row holding a NaN. For float rows, the first maximum.
int64_t metric_label(const void* labels, LabelKind kind, int64_t r, int64_t cols) {
    if (kind == LabelKind::kOneHot) {
        const float* y = static_cast<const float*>(labels) + r * cols;
        float best_v = 0.0f;
        int64_t best_i = kMetricNoIndex;
        for (int64_t c = 0; c < cols; ++c) {
            if (y[c] != y[c]) return -1;
            metric_argmax_visit(y[c], c, best_v, best_i);
        }
        return best_i == kMetricNoIndex ? -1 : best_i;
    }
    const int64_t t = kind == LabelKind::kInt32 ? static_cast<const int32_t*>(labels)[r]
                                                : static_cast<const int64_t*>(labels)[r];
    return t >= 0 && t < cols ? t : -1;
}

// Elements per block of the elementwise pass: its buffers (2 KiB of floats,
// 2 KiB of ints, 2 x 4 KiB of doubles, and the per-row sums) stay in L1.
constexpr int64_t kMetricBlock = 512;

// The elementwise metrics (binary, abs, sq) and probs_out of rows [r0, r1) for
// the elementwise transforms (none, sigmoid) against float label rows. The
// per-element terms are computed in flat loops over blocks of rows (whole rows
// of up to kMetricBlock elements, or column chunks of one wider row), which
// vectorise; the row sums then add the terms in c order, as the per-row loop
// of metric_rows does, so every row's value is the same as there. cols >= 1.
template <OutputTransform T>
void metric_elementwise_rows(const float* pred, const float* labels, float* probs_out,
                             float* scratch, int64_t rows, int64_t cols,
                             const MetricSpec& spec, int64_t r0, int64_t r1) {
    static_assert(T != OutputTransform::kSoftmax, "softmax needs the row scans");
    const float threshold = spec.threshold;
    float pb[kMetricBlock];
    int32_t hit[kMetricBlock];
    double abs_d[kMetricBlock], sq_d[kMetricBlock];
    // Per-row accumulators of the rows of one block (at most kMetricBlock rows).
    int64_t bin_acc[kMetricBlock];
    double abs_acc[kMetricBlock], sq_acc[kMetricBlock];
    const int64_t chunk = cols < kMetricBlock ? cols : kMetricBlock;  // columns per chunk
    for (int64_t r = r0; r < r1;) {
        const int64_t nb = cols <= kMetricBlock
                               ? (r1 - r < kMetricBlock / cols ? r1 - r : kMetricBlock / cols)
                               : 1;
        for (int64_t j = 0; j < nb; ++j) {
            bin_acc[j] = 0;
            abs_acc[j] = 0.0;
            sq_acc[j] = 0.0;
        }
        for (int64_t c0 = 0; c0 < cols; c0 += chunk) {
            const int64_t w = cols - c0 < chunk ? cols - c0 : chunk;  // == cols when nb > 1
            const int64_t n = nb * w;
            // Rows [r, r+nb) x columns [c0, c0+w): contiguous in memory.
            const float* z = pred + r * cols + c0;
            const float* y = labels + r * cols + c0;
            float* o = probs_out ? probs_out + r * cols + c0 : nullptr;
            // The transform alone (a store under "if (o)" in the loop would
            // keep GCC from vectorising it), then probs_out, then the terms.
            for (int64_t i = 0; i < n; ++i) pb[i] = metric_transform<T>(z[i], 0.0f, 1.0f);
            if (o)
                for (int64_t i = 0; i < n; ++i) o[i] = pb[i];
            for (int64_t i = 0; i < n; ++i) {
                const float p = pb[i];
                hit[i] = metric_binary_hit(p, y[i], threshold);
                const double d = static_cast<double>(p) - static_cast<double>(y[i]);
                abs_d[i] = std::fabs(d);
                sq_d[i] = d * d;
            }
            for (int64_t j = 0; j < nb; ++j) {
                int64_t bin = bin_acc[j];
                double a = abs_acc[j], q = sq_acc[j];
                for (int64_t c = j * w; c < (j + 1) * w; ++c) {
                    bin += hit[c];
                    a += abs_d[c];
                    q += sq_d[c];
                }
                bin_acc[j] = bin;
                abs_acc[j] = a;
                sq_acc[j] = q;
            }
        }
        for (int64_t j = 0; j < nb; ++j) {
            if (spec.flags & kMetricBinary)
                scratch[1 * rows + r + j] = metric_row_mean(static_cast<double>(bin_acc[j]), cols);
            if (spec.flags & kMetricAbs) scratch[3 * rows + r + j] = metric_row_mean(abs_acc[j], cols);
            if (spec.flags & kMetricSq) scratch[4 * rows + r + j] = metric_row_mean(sq_acc[j], cols);
        }
        r += nb;
    }
}

// The metric values of rows [r0, r1) into scratch; probs_out (or null) gets p.
// cols >= 1. The row scans (pass 1) run only when argmax / top-k or the softmax
// need them; with an elementwise transform and float label rows, p and the
// elementwise metrics come from metric_elementwise_rows.
template <OutputTransform T>
void metric_rows(const float* pred, const void* labels, LabelKind kind, float* probs_out,
                 float* scratch, int64_t rows, int64_t cols, const MetricSpec& spec,
                 int64_t r0, int64_t r1) {
    const int32_t flags = spec.flags;
    const bool want_p = probs_out != nullptr ||
                        (flags & (kMetricBinary | kMetricAbs | kMetricSq)) != 0;
    const bool need_scan = (flags & (kMetricArgmax | kMetricTopK)) != 0 ||
                           (want_p && T == OutputTransform::kSoftmax);
    if constexpr (T != OutputTransform::kSoftmax) {
        if (want_p && kind == LabelKind::kOneHot)
            metric_elementwise_rows<T>(pred, static_cast<const float*>(labels), probs_out,
                                       scratch, rows, cols, spec, r0, r1);
        if (!need_scan && (!want_p || kind == LabelKind::kOneHot)) return;
    }
    for (int64_t r = r0; r < r1; ++r) {
        const float* z = pred + r * cols;
        // Pass 1: the row max (softmax), the first maximum, any NaN.
        float mx = -std::numeric_limits<float>::infinity();
        float best_v = 0.0f;
        int64_t best_i = kMetricNoIndex;
        bool any_nan = false;
        for (int64_t c = 0; c < cols; ++c) {
            const float x = z[c];
            mx = max_nan(mx, x);
            any_nan |= x != x;
            metric_argmax_visit(x, c, best_v, best_i);
        }
        const int64_t t = metric_label(labels, kind, r, cols);
        if (flags & kMetricArgmax)
            scratch[0 * rows + r] = metric_argmax_value(any_nan, best_i, t);
        if (flags & kMetricTopK) {
            int64_t greater = 0;
            if (t >= 0) {
                const float zt = z[t];
                for (int64_t c = 0; c < cols; ++c) greater += z[c] > zt ? 1 : 0;
            }
            scratch[2 * rows + r] = metric_topk_value(any_nan, t, greater, spec.k);
        }
        if (!want_p) continue;
        if (T != OutputTransform::kSoftmax && kind == LabelKind::kOneHot) continue;  // done above

        // Pass 2 (softmax): the row sum, in c order as softmax_xent's.
        float sum = 1.0f;
        if constexpr (T == OutputTransform::kSoftmax) {
            sum = 0.0f;
            for (int64_t c = 0; c < cols; ++c) sum += metric_softmax_term(z[c], mx);
        }
        // Pass 3: p, and the elementwise metrics against the float label row.
        const float* y = kind == LabelKind::kOneHot
                             ? static_cast<const float*>(labels) + r * cols : nullptr;
        float* o = probs_out ? probs_out + r * cols : nullptr;
        int64_t bin = 0;
        double abs_sum = 0.0, sq_sum = 0.0;
        for (int64_t c = 0; c < cols; ++c) {
            const float p = metric_transform<T>(z[c], mx, sum);
            if (o) o[c] = p;
            if (y) {
                bin += metric_binary_hit(p, y[c], spec.threshold);
                const double d = static_cast<double>(p) - static_cast<double>(y[c]);
                abs_sum += std::fabs(d);
                sq_sum += d * d;
            }
        }
        if (flags & kMetricBinary)
            scratch[1 * rows + r] = metric_row_mean(static_cast<double>(bin), cols);
        if (flags & kMetricAbs) scratch[3 * rows + r] = metric_row_mean(abs_sum, cols);
        if (flags & kMetricSq) scratch[4 * rows + r] = metric_row_mean(sq_sum, cols);
    }
}

}  // namespace

void metrics_fused(const float* pred, const void* labels, LabelKind label_kind,
                   float* probs_out, float* row_scratch, double* sums, int64_t rows,
                   int64_t cols, const MetricSpec& spec) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_metric_args(pred, labels, label_kind, probs_out, row_scratch, sums, rows, cols, spec);

    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        switch (static_cast<OutputTransform>(spec.transform)) {
            case OutputTransform::kNone:
                metric_rows<OutputTransform::kNone>(pred, labels, label_kind, probs_out,
                                                    row_scratch, rows, cols, spec, r0, r1);
                break;
            case OutputTransform::kSigmoid:
                metric_rows<OutputTransform::kSigmoid>(pred, labels, label_kind, probs_out,
                                                       row_scratch, rows, cols, spec, r0, r1);
                break;
            case OutputTransform::kSoftmax:
                metric_rows<OutputTransform::kSoftmax>(pred, labels, label_kind, probs_out,
                                                       row_scratch, rows, cols, spec, r0, r1);
                break;
        }
    });
    for (int m = 0; m < kNumMetricSums; ++m) {
        double s = 0.0;
        if (spec.flags & (1 << m))
            for (int64_t r = 0; r < rows; ++r) s += row_scratch[m * rows + r];
        sums[m] = s;
    }
}

}  // namespace cpu
}  // namespace fastmlp
