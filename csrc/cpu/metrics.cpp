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

// metrics_elementwise.cpp (compiled with the vector-math flags; the row scans
// here are faster without -fno-trapping-math).
void metric_elementwise_rows(int transform, const float* pred, const float* labels,
                             float* probs_out, float* scratch, int64_t rows, int64_t cols,
                             const MetricSpec& spec, int64_t r0, int64_t r1);

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
            metric_elementwise_rows(static_cast<int>(T), pred,
                                    static_cast<const float*>(labels), probs_out, scratch, rows,
                                    cols, spec, r0, r1);
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
