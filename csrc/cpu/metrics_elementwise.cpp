// [issue 16] CPU fused metrics, the elementwise part: binary / abs / sq and
// probs_out for the elementwise transforms (none, sigmoid) against float label
// rows, in flat vectorised loops (metrics.cpp calls it; its own row scans, for
// argmax / top-k / softmax, compile better without this file's flags).
#include <cmath>
#include <cstdint>

#include "fastmlp.h"
#include "kernel_math.h"
#include "metric_math.h"

namespace fastmlp {
namespace cpu {
namespace {

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

}  // namespace

void metric_elementwise_rows(int transform, const float* pred, const float* labels,
                             float* probs_out, float* scratch, int64_t rows, int64_t cols,
                             const MetricSpec& spec, int64_t r0, int64_t r1) {
    if (transform == static_cast<int>(OutputTransform::kSigmoid))
        metric_elementwise_rows<OutputTransform::kSigmoid>(pred, labels, probs_out, scratch,
                                                           rows, cols, spec, r0, r1);
    else
        metric_elementwise_rows<OutputTransform::kNone>(pred, labels, probs_out, scratch, rows,
                                                        cols, spec, r0, r1);
}

}  // namespace cpu
}  // namespace fastmlp
