// [issue 16] Fused metrics on the GPU (fastmlp.h metrics_fused; the per-row
// rules: metric_math.h, shared with the CPU).
//
// As softmax_xent.cu: one warp per row (rows grid-strided over the warps), the
// row read with lane-strided coalesced loads, warp reductions by fixed xor
// butterflies. Each row's metric values go to row_scratch (metric m at
// m * rows); a second kernel then sums each metric in double, one block per
// metric, in a fixed order (thread t takes rows t, t + kReduceBlock, ...; then
// the warps, then warp 0): the sums repeat bit for bit (no floating-point
// atomics).

#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>
#include <limits>

#include "check.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"
#include "warp.h"
#include "metric_math.h"

namespace fastmlp {
namespace cuda {
namespace {

using detail::kWarpSize;

constexpr int kRowBlock = 256;                          // threads per block of the row kernel
constexpr int kWarpsPerBlock = kRowBlock / kWarpSize;   // rows in flight per block
static_assert(kRowBlock % kWarpSize == 0, "one row per warp needs whole warps");

constexpr int kReduceBlock = 1024;
static_assert(kReduceBlock % kWarpSize == 0 && kReduceBlock / kWarpSize <= kWarpSize,
              "the per-warp sums must fit in one warp for the final reduction");


// The metric values of every row into scratch (metric_math.h), p into
// probs_out unless null. KIND: the label kind (binary / abs / sq exist only
// for kOneHot: the launcher refuses them otherwise). cols >= 1. probs_out does
// not overlap pred (the launcher checks). Every branch on flags, on the label
// and on r is warp-uniform, so the shuffles run with all 32 lanes.
template <LabelKind KIND, OutputTransform T>
__global__ void __launch_bounds__(kRowBlock)
metrics_rows_f32(const float* __restrict__ pred, const void* __restrict__ labels,
                 float* __restrict__ probs_out, float* __restrict__ scratch, int64_t rows,
                 int64_t cols, MetricSpec spec) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int32_t flags = spec.flags;
    constexpr bool kFloatLabels = KIND == LabelKind::kOneHot;
    const bool want_p = probs_out != nullptr ||
                        (kFloatLabels && (flags & (kMetricBinary | kMetricAbs | kMetricSq)) != 0);
    for (int64_t r = global_warp(); r < rows; r += grid_warps()) {
        const float* z = pred + r * cols;

        // Pass 1: row max (softmax), first maximum and NaN of pred.
        float mx = -CUDART_INF_F;
        float best_v = 0.0f;
        int64_t best_i = kMetricNoIndex;
        bool nan = false;
        for (int64_t c = lane; c < cols; c += kWarpSize) {
            const float x = z[c];
            if constexpr (T == OutputTransform::kSoftmax) mx = fastmlp::max_nan(mx, x);
            nan |= x != x;
            metric_argmax_visit(x, c, best_v, best_i);
        }
        if constexpr (T == OutputTransform::kSoftmax) mx = warp_max(mx);
        const bool any_nan = __any_sync(kFullMask, nan);
        const int64_t best = warp_first_argmax<kMetricNoIndex>(best_v, best_i);
        int64_t t = -1;
        if constexpr (kFloatLabels) {
            // The float label row's first maximum, when a hit metric needs it
            // (its own loop: folded into pass 1, ptxas spilled on sm_90).
            if (flags & (kMetricArgmax | kMetricTopK)) {
                const float* y = static_cast<const float*>(labels) + r * cols;
                float y_best_v = 0.0f;
                int64_t y_best_i = kMetricNoIndex;
                bool y_nan = false;
                for (int64_t c = lane; c < cols; c += kWarpSize) {
                    const float yc = y[c];
                    y_nan |= yc != yc;
                    metric_argmax_visit(yc, c, y_best_v, y_best_i);
                }
                const int64_t yb = warp_first_argmax<kMetricNoIndex>(y_best_v, y_best_i);
                t = __any_sync(kFullMask, y_nan) || yb == kMetricNoIndex ? -1 : yb;
            }
        } else {
            // Every lane reads the same label (one broadcast transaction).
            const int64_t label = KIND == LabelKind::kInt32
                                      ? static_cast<int64_t>(static_cast<const int32_t*>(labels)[r])
                                      : static_cast<const int64_t*>(labels)[r];
            t = label >= 0 && label < cols ? label : -1;   // compared, never used out of range
        }
        if ((flags & kMetricArgmax) && lane == 0)
            scratch[0 * rows + r] = metric_argmax_value(any_nan, best, t);
        if (flags & kMetricTopK) {
            int64_t greater = 0;
            if (t >= 0) {
                const float zt = z[t];
                for (int64_t c = lane; c < cols; c += kWarpSize) greater += z[c] > zt ? 1 : 0;
                greater = warp_sum(greater);
            }
            if (lane == 0) scratch[2 * rows + r] = metric_topk_value(any_nan, t, greater, spec.k);
        }
        if (!want_p) continue;

        // Pass 2 (softmax): the row sum of exp(z - max).
        float sum = 1.0f;
        if constexpr (T == OutputTransform::kSoftmax) {
            sum = 0.0f;
            for (int64_t c = lane; c < cols; c += kWarpSize) sum += metric_softmax_term(z[c], mx);
            sum = warp_sum(sum);
        }

        // Pass 3: p, and the elementwise metrics against the float label row.
        int32_t bin = 0;
        double abs_sum = 0.0, sq_sum = 0.0;
        // Not unrolled: each p is a correctly rounded division (a possible
        // slow-path call), and ptxas spilled around those calls (sm_90) when
        // it unrolled this loop.
#pragma unroll 1
        for (int64_t c = lane; c < cols; c += kWarpSize) {
            const float p = metric_transform<T>(z[c], mx, sum);
            if (probs_out != nullptr) probs_out[r * cols + c] = p;
            if constexpr (kFloatLabels) {
                const float yc = static_cast<const float*>(labels)[r * cols + c];
                bin += metric_binary_hit(p, yc, spec.threshold);
                const double d = static_cast<double>(p) - static_cast<double>(yc);
                abs_sum += fabs(d);
                sq_sum += d * d;
            }
        }
        if constexpr (kFloatLabels) {
            if (flags & kMetricBinary) {
                bin = warp_sum(bin);
                if (lane == 0)
                    scratch[1 * rows + r] = metric_row_mean(static_cast<double>(bin), cols);
            }
            if (flags & kMetricAbs) {
                abs_sum = warp_sum(abs_sum);
                if (lane == 0) scratch[3 * rows + r] = metric_row_mean(abs_sum, cols);
            }
            if (flags & kMetricSq) {
                sq_sum = warp_sum(sq_sum);
                if (lane == 0) scratch[4 * rows + r] = metric_row_mean(sq_sum, cols);
            }
        }
    }
}

// sums[m] for m = blockIdx.x: the sum in double of scratch[m * rows + r] over
// the rows in a fixed order, or 0 when metric m is not in flags. rows > 0.
__global__ void __launch_bounds__(kReduceBlock)
metrics_sum_f64(const float* __restrict__ scratch, double* __restrict__ sums, int64_t rows,
                int32_t flags) {
    __shared__ double warp_sums[kReduceBlock / kWarpSize];
    const int m = static_cast<int>(blockIdx.x);
    if (!(flags & (1 << m))) {   // block-uniform: the whole block leaves together
        if (threadIdx.x == 0) sums[m] = 0.0;
        return;
    }
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    const float* v = scratch + m * rows;

    double s = 0.0;
    for (int64_t r = threadIdx.x; r < rows; r += kReduceBlock) s += v[r];
    s = warp_sum(s);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();   // every warp's sum is in shared memory before warp 0 reads them
    if (warp == 0) {   // warp-uniform: all 32 lanes of warp 0 take part in the shuffles
        double w = lane < kReduceBlock / kWarpSize ? warp_sums[lane] : 0.0;
        w = warp_sum(w);
        if (lane == 0) sums[m] = w;
    }
}

template <LabelKind KIND>
void launch_metric_rows(const float* pred, const void* labels, float* probs_out, float* scratch,
                        int64_t rows, int64_t cols, const MetricSpec& spec,
                        cudaStream_t stream) {
    const unsigned int blocks = detail::grid_stride_blocks(rows, kWarpsPerBlock);
    switch (static_cast<OutputTransform>(spec.transform)) {
        case OutputTransform::kNone:
            metrics_rows_f32<KIND, OutputTransform::kNone><<<blocks, kRowBlock, 0, stream>>>(
                pred, labels, probs_out, scratch, rows, cols, spec);
            break;
        case OutputTransform::kSigmoid:
            metrics_rows_f32<KIND, OutputTransform::kSigmoid><<<blocks, kRowBlock, 0, stream>>>(
                pred, labels, probs_out, scratch, rows, cols, spec);
            break;
        case OutputTransform::kSoftmax:
            metrics_rows_f32<KIND, OutputTransform::kSoftmax><<<blocks, kRowBlock, 0, stream>>>(
                pred, labels, probs_out, scratch, rows, cols, spec);
            break;
    }
    detail::check_launch();
}

}  // namespace

void metrics_fused(const float* pred, const void* labels, LabelKind label_kind,
                   float* probs_out, float* row_scratch, double* sums, int64_t rows,
                   int64_t cols, const MetricSpec& spec, cudaStream_t stream) {
    check_metric_args(pred, labels, label_kind, probs_out, row_scratch, sums, rows, cols, spec);

    if (rows == 0) {
        // No rows: every sum is 0 (all-zero bits are +0.0).
        CUDA_CHECK(cudaMemsetAsync(sums, 0, kNumMetricSums * sizeof(double), stream));
        return;
    }
    switch (label_kind) {
        case LabelKind::kInt32:
            launch_metric_rows<LabelKind::kInt32>(pred, labels, probs_out, row_scratch, rows,
                                                  cols, spec, stream);
            break;
        case LabelKind::kInt64:
            launch_metric_rows<LabelKind::kInt64>(pred, labels, probs_out, row_scratch, rows,
                                                  cols, spec, stream);
            break;
        case LabelKind::kOneHot:
            launch_metric_rows<LabelKind::kOneHot>(pred, labels, probs_out, row_scratch, rows,
                                                   cols, spec, stream);
            break;
    }
    // Stream order makes row_scratch complete before the sums read it.
    metrics_sum_f64<<<kNumMetricSums, kReduceBlock, 0, stream>>>(row_scratch, sums, rows,
                                                                 spec.flags);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
