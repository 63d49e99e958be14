// CUDA loss_fused (issue 16): every LossKind's loss and gradient in one pass.
//
// Row kernel: one warp per row (rows grid-strided over the warps), running
// loss_math.h's loss_row with WarpLanes: lane-strided, coalesced column
// loads, and the row's partial sums and maximum combined by fixed xor
// butterflies, so every lane holds the same row loss and the result repeats
// bit for bit. Lane 0 writes row_loss(r) = w_r L_r.
// Reduce kernel: one block sums row_loss in a fixed order in double (thread t
// takes rows t, t + kReduceBlock, ...; then warp and block butterflies) and
// writes *loss = float(sum / rows): no floating-point atomics.
//
// Bad labels (cross-entropy kinds with integer labels): as softmax_xent.cu, the
// label is compared, never used as an index; the row's loss is NaN and the
// smallest such row is recorded in *bad_row by an integer atomicMin (order
// independent), after the launcher set it to all ones (-1 as int64).

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "check.h"
#include "fastmlp.h"
#include "launch.h"
#include "warp.h"
#include "loss_math.h"

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

// loss_row's column policy on the GPU: lane l visits columns l, l + 32, ...;
// sum / max are xor butterflies (every lane ends with the same value, in a
// fixed order). All 32 lanes must call them: the row loop is warp-uniform.
// (HOSTDEV only because loss_row is; never called on the host.)
struct WarpLanes {
    int lane;
    FASTMLP_HOSTDEV int64_t first() const { return lane; }
    FASTMLP_HOSTDEV int64_t step() const { return kWarpSize; }
    FASTMLP_HOSTDEV float sum(float v) const {
#ifdef __CUDA_ARCH__
        v = warp_sum(v);
#endif
        return v;
    }
    FASTMLP_HOSTDEV float max(float v) const {
#ifdef __CUDA_ARCH__
        v = warp_max(v);
#endif
        return v;
    }
};

// row_loss(r) = w_r L_r and, with BACKWARD, dpred(r, :) (loss_math.h). dpred
// does not overlap pred (the launcher checks), so both are __restrict__.
template <int KIND, LabelKind LK, bool BACKWARD>
__global__ void __launch_bounds__(kRowBlock)
loss_fused_rows_f32(const float* __restrict__ pred, const void* __restrict__ labels,
                    const float* __restrict__ sample_weight, float* __restrict__ dpred,
                    float* __restrict__ row_loss, unsigned long long* __restrict__ bad_row,
                    int64_t rows, int64_t cols, LossConsts k) {
    const WarpLanes lanes{static_cast<int>(threadIdx.x) % kWarpSize};
    const int64_t warps = static_cast<int64_t>(gridDim.x) * (blockDim.x / kWarpSize);
    // r is warp-uniform, so every shuffle inside loss_row runs with all 32 lanes.
    for (int64_t r = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
         r < rows; r += warps) {
        const float* y = LK == LabelKind::kOneHot
                             ? static_cast<const float*>(labels) + r * cols
                             : nullptr;
        bool bad = false;
        const float scale = loss_row_scale(sample_weight, r, rows);
        const float l = loss_row<KIND, LK, BACKWARD>(pred + r * cols, y, labels, r, cols, k,
                                                     scale, BACKWARD ? dpred + r * cols : nullptr,
                                                     bad, lanes);
        if (lanes.lane == 0) {
            const float w = sample_weight ? sample_weight[r] : 1.0f;
            row_loss[r] = w * l;
            if (bad) atomicMin(bad_row, static_cast<unsigned long long>(r));
        }
    }
}


// *loss = (sum_r row_loss(r)) / rows, summed in double in a fixed order by one
// block. rows > 0.
__global__ void __launch_bounds__(kReduceBlock)
loss_fused_reduce_f32(const float* __restrict__ row_loss, float* __restrict__ loss, int64_t rows) {
    __shared__ double warp_sums[kReduceBlock / kWarpSize];
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
    double s = 0.0;
    for (int64_t r = threadIdx.x; r < rows; r += kReduceBlock) s += row_loss[r];
    s = warp_sum(s);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();  // every warp's sum is in shared memory before warp 0 reads them
    if (warp == 0) {  // warp-uniform: all 32 lanes of warp 0 take part in the shuffles
        double v = lane < kReduceBlock / kWarpSize ? warp_sums[lane] : 0.0;
        v = warp_sum(v);
        if (lane == 0) *loss = static_cast<float>(v / static_cast<double>(rows));
    }
}

}  // namespace

void loss_fused(const float* pred, const void* labels, LabelKind label_kind,
                const float* sample_weight, float* dpred, float* row_loss, float* loss,
                int64_t* bad_row, int64_t rows, int64_t cols, const LossSpec& spec,
                cudaStream_t stream) {
    check_loss_args(pred, labels, label_kind, dpred, row_loss, loss, bad_row, rows, cols, spec);

    // *bad_row = -1 (all bits set): "no bad row", and atomicMin's identity.
    CUDA_CHECK(cudaMemsetAsync(bad_row, 0xFF, sizeof(int64_t), stream));
    if (rows == 0) {
        // The mean over no rows is 0 (all-zero bits are +0.0f).
        CUDA_CHECK(cudaMemsetAsync(loss, 0, sizeof(float), stream));
        return;
    }

    const LossConsts k = loss_consts(spec, cols);
    auto* bad = reinterpret_cast<unsigned long long*>(bad_row);
    const unsigned int blocks = detail::grid_stride_blocks(rows, kWarpsPerBlock);
    with_loss(spec.kind, label_kind, [&](auto kind_tag, auto label_tag) {
        constexpr int KIND = decltype(kind_tag)::value;
        constexpr LabelKind LK = decltype(label_tag)::value;
        if (dpred)
            loss_fused_rows_f32<KIND, LK, true><<<blocks, kRowBlock, 0, stream>>>(
                pred, labels, sample_weight, dpred, row_loss, bad, rows, cols, k);
        else
            loss_fused_rows_f32<KIND, LK, false><<<blocks, kRowBlock, 0, stream>>>(
                pred, labels, sample_weight, dpred, row_loss, bad, rows, cols, k);
    });
    detail::check_launch();
    // Stream order makes row_loss complete before the reduction reads it.
    loss_fused_reduce_f32<<<1, kReduceBlock, 0, stream>>>(row_loss, loss, rows);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
