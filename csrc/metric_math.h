// [issue 16] Scalar rules of the fused metrics kernel (metrics_fused), shared by
// the CPU and CUDA versions so that the CPU tests cover the rules the GPU runs.
//
// Per row r of pred (rows, cols), with p = transform(pred) and the label t (an
// integer class, or the first maximum of a float label row y):
//   argmax  1 when the row of pred holds no NaN, t is a valid class and the
//           first maximum of pred is t (Keras sparse / categorical accuracy)
//   binary  mean over c of [(p_c > threshold) == (y_c > 0.5)] (Keras
//           binary_accuracy: a NaN p_c is "not above", as Keras' cast does)
//   topk    1 when the row holds no NaN, t is valid and fewer than k classes
//           have pred_c > pred_t (tf.math.in_top_k: ties at the boundary are in)
//   abs     mean over c of |p_c - y_c|;  sq: mean over c of (p_c - y_c)^2
//           (differences and sums in double; NaN propagates)
// argmax and topk compare pred, not p: all transforms are monotone per row, so
// the order is the same, but sigmoid / softmax round distinct values of pred
// to equal p (sigmoid(20) == sigmoid(21) == 1 in float), which would make ties.
// "No NaN" is the rule for a comparison with NaN: a row with a NaN in pred (or,
// for float labels, in y) has no defined arg-max or rank, so it is a miss.
#pragma once

#include <cstdint>
#include <limits>

#include "check.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {

// "No column seen yet" in metric_argmax_visit (larger than any column).
constexpr int64_t kMetricNoIndex = INT64_MAX;

// Folds column c (value x, visited in ascending c) into a running first maximum
// of the non-NaN values: strict >, so on equal values the lower column stays.
// NaN columns are skipped here; the caller tracks them (a NaN row is a miss).
FASTMLP_HOSTDEV void metric_argmax_visit(float x, int64_t c, float& best_v, int64_t& best_i) {
    if (x == x && (best_i == kMetricNoIndex || x > best_v)) {
        best_v = x;
        best_i = c;
    }
}

// One element of p. T is OutputTransform; mx and sum (the row max of pred and
// the sum of exp(pred - mx) over the row, both in float) are used by the
// softmax only. sigmoid is kernel_math.h's sigmoidf, as the activation kernels.
template <OutputTransform T>
FASTMLP_ACT_INLINE float metric_transform(float z, float mx, float sum) {
    if constexpr (T == OutputTransform::kSigmoid) return sigmoidf(z);
    else if constexpr (T == OutputTransform::kSoftmax) return act_expf(z - mx) / sum;
    else return z;
}

// A term of the softmax row sum: z - mx <= 0, so exp never overflows.
FASTMLP_ACT_INLINE float metric_softmax_term(float z, float mx) { return act_expf(z - mx); }

// Keras binary_accuracy of one element: 1 when the thresholded prediction
// equals the thresholded label.
FASTMLP_HOSTDEV int metric_binary_hit(float p, float y, float threshold) {
    return (p > threshold) == (y > 0.5f) ? 1 : 0;
}

// The per-row values of the two hit metrics, from what a scan of the row found:
// any_nan (a NaN in pred or in the float label row), the first maximum of pred,
// the label t (-1: none, e.g. an out-of-range integer label) and the number of
// classes strictly above pred_t.
FASTMLP_HOSTDEV float metric_argmax_value(bool any_nan, int64_t best, int64_t t) {
    return !any_nan && t >= 0 && best == t ? 1.0f : 0.0f;
}
FASTMLP_HOSTDEV float metric_topk_value(bool any_nan, int64_t t, int64_t greater, int32_t k) {
    return !any_nan && t >= 0 && greater < k ? 1.0f : 0.0f;
}

// A mean over the cols of a row as the float stored in row_scratch.
FASTMLP_HOSTDEV float metric_row_mean(double sum, int64_t cols) {
    return static_cast<float>(sum / static_cast<double>(cols));
}

// The argument checks of metrics_fused, one for both devices (host code).
inline void check_metric_args(const float* pred, const void* labels, LabelKind label_kind,
                              const float* probs_out, const float* row_scratch,
                              const double* sums, int64_t rows, int64_t cols,
                              const MetricSpec& spec) {
    const char* op = "metrics_fused";
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be >= 0, got rows=" << rows << " cols=" << cols);
    FASTMLP_CHECK(label_kind == LabelKind::kInt32 || label_kind == LabelKind::kInt64 ||
                      label_kind == LabelKind::kOneHot,
                  op << ": unknown label kind " << static_cast<int>(label_kind));
    FASTMLP_CHECK(spec.flags >= 0 && spec.flags < (1 << kNumMetricSums),
                  op << ": unknown metric flags " << spec.flags);
    FASTMLP_CHECK(spec.transform >= 0 && spec.transform <= 2,
                  op << ": unknown output transform " << spec.transform);
    FASTMLP_CHECK(!(spec.flags & kMetricTopK) || spec.k >= 1,
                  op << ": top-k needs k >= 1, got k=" << spec.k);
    FASTMLP_CHECK(!(spec.flags & (kMetricBinary | kMetricAbs | kMetricSq)) ||
                      label_kind == LabelKind::kOneHot,
                  op << ": the binary / abs / sq metrics need float label rows (rows, cols), "
                        "not integer class labels");
    FASTMLP_CHECK(sums != nullptr, op << ": sums is null");
    FASTMLP_CHECK(cols == 0 || rows <= std::numeric_limits<int64_t>::max() / cols,
                  op << ": rows*cols overflows int64 (rows=" << rows << ", cols=" << cols << ")");
    FASTMLP_CHECK(rows == 0 || cols > 0, op << ": need at least one column");
    if (rows > 0) {
        FASTMLP_CHECK(pred != nullptr && labels != nullptr && row_scratch != nullptr,
                      op << ": pred, labels or row_scratch is null");
        // rows * cols fits int64: checked above.
        const uint64_t n = static_cast<uint64_t>(rows * cols);
        FASTMLP_CHECK(!floats_overlap(probs_out, n, pred, n),
                      op << ": probs_out must not overlap pred");
    }
}

}  // namespace fastmlp
