// Softmax cross-entropy on the GPU, forward and backward, for the three label
// kinds (int32 / int64 class indices, float32 one-hot or soft rows).
//
// Forward: one warp per row (rows grid-strided over the warps). A row is read
// with lane-strided, coalesced loads; the row max and the sum of exp(z - max)
// are warp-shuffle reductions, so every exponent is <= 0 and logits of +-1000
// neither overflow nor turn the loss into inf (kernel_math.h: log_softmax_entry).
// row_loss goes to a caller-provided (rows,) buffer, and a second kernel of
// one block sums it in a fixed order: the mean loss repeats bit for bit (no
// floating-point atomics).
//
// Bad labels: an integer label outside [0, cols) is never used as an index.
// Its row gets row_loss = NaN (so the mean is NaN too) and the smallest such
// row is recorded in *bad_row with an integer atomicMin, whose result does not
// depend on the order the warps run in. The launcher first sets *bad_row to
// all ones (-1 as int64, UINT64_MAX as unsigned, larger than any row index).

#include <cuda_runtime.h>
#include <math_constants.h>

#include <cstdint>
#include <limits>

#include "check.h"
#include "fastmlp.h"
#include "launch.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cuda {
namespace {

using detail::kWarpSize;

constexpr int kRowBlock = 256;                          // threads per block of the row kernels
constexpr int kWarpsPerBlock = kRowBlock / kWarpSize;   // rows in flight per block
static_assert(kRowBlock % kWarpSize == 0, "one row per warp needs whole warps");
constexpr unsigned int kFullMask = 0xffffffffu;

// Fixed xor butterflies: every lane ends with the same value, and the order of
// the operations is fixed, so the result is deterministic. All 32 lanes must
// call these (the callers' loops are warp-uniform).
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
        v = fmaxf(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
        v += __shfl_xor_sync(kFullMask, v, offset);
    return v;
}

template <LabelKind KIND>
__device__ __forceinline__ int64_t load_class_label(const void* labels, int64_t row) {
    static_assert(KIND == LabelKind::kInt32 || KIND == LabelKind::kInt64, "integer labels only");
    if constexpr (KIND == LabelKind::kInt32) return static_cast<const int32_t*>(labels)[row];
    else return static_cast<const int64_t*>(labels)[row];
}

__device__ __forceinline__ bool label_in_range(int64_t label, int64_t cols) {
    return label >= 0 && label < cols;
}

// The warp's row index and the number of warps in the grid, 64-bit.
__device__ __forceinline__ int64_t global_warp() {
    return (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarpSize;
}
__device__ __forceinline__ int64_t grid_warps() {
    return static_cast<int64_t>(gridDim.x) * blockDim.x / kWarpSize;
}

// probs(r, :) = softmax(logits(r, :)); row_loss(r) = -sum_c label(r, c) * log_softmax(r, c).
template <LabelKind KIND>
__global__ void __launch_bounds__(kRowBlock)
softmax_xent_fwd_f32(const float* __restrict__ logits, const void* __restrict__ labels,
                     float* __restrict__ probs, float* __restrict__ row_loss,
                     unsigned long long* __restrict__ bad_row, int64_t rows, int64_t cols) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    // r is the same for all lanes of a warp, so the loop (and every shuffle
    // inside it) is executed by all 32 lanes together.
    for (int64_t r = global_warp(); r < rows; r += grid_warps()) {
        const float* z = logits + r * cols;
        float* p = probs + r * cols;

        // fmaxf drops a NaN operand; a NaN logit still poisons the sum below
        // (exp(NaN - max) = NaN), so probs and the loss come out NaN.
        float row_max = -CUDART_INF_F;
        for (int64_t c = lane; c < cols; c += kWarpSize) row_max = fmaxf(row_max, z[c]);
        row_max = warp_max(row_max);

        float sum = 0.0f;
        for (int64_t c = lane; c < cols; c += kWarpSize) sum += expf(z[c] - row_max);
        sum = warp_sum(sum);
        const float log_sum = logf(sum);

        // One-hot labels: accumulate -sum_c y(r,c) * log p(r,c) in the same
        // pass that writes the probabilities.
        float dot = 0.0f;
        for (int64_t c = lane; c < cols; c += kWarpSize) {
            const float zc = z[c];
            p[c] = expf(zc - row_max) / sum;
            if constexpr (KIND == LabelKind::kOneHot) {
                const float* y = static_cast<const float*>(labels) + r * cols;
                dot += y[c] * log_softmax_entry(zc, row_max, log_sum);
            }
        }

        float loss;
        if constexpr (KIND == LabelKind::kOneHot) {
            loss = -warp_sum(dot);
        } else {
            // Every lane reads the same label (a single broadcast transaction),
            // so the branch below is warp-uniform.
            const int64_t label = load_class_label<KIND>(labels, r);
            if (label_in_range(label, cols)) {
                loss = -log_softmax_entry(z[label], row_max, log_sum);
            } else {
                loss = CUDART_NAN_F;
                if (lane == 0) atomicMin(bad_row, static_cast<unsigned long long>(r));
            }
        }
        if (lane == 0) row_loss[r] = loss;
    }
}

// *loss = sum_r row_loss(r) / rows, by one block in a fixed order: thread t
// sums rows t, t + kReduceBlock, ... in increasing order, then the warps
// reduce with shuffles and warp 0 reduces the per-warp sums. rows > 0.
constexpr int kReduceBlock = 1024;
static_assert(kReduceBlock % kWarpSize == 0 && kReduceBlock / kWarpSize <= kWarpSize,
              "the per-warp sums must fit in one warp for the final reduction");

__global__ void __launch_bounds__(kReduceBlock)
softmax_xent_mean_loss_f32(const float* __restrict__ row_loss, float* __restrict__ loss,
                           int64_t rows) {
    __shared__ float warp_sums[kReduceBlock / kWarpSize];
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;

    float s = 0.0f;
    for (int64_t r = threadIdx.x; r < rows; r += kReduceBlock) s += row_loss[r];
    s = warp_sum(s);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();   // every warp's sum is in shared memory before warp 0 reads them

    if (warp == 0) {   // warp-uniform: all 32 lanes of warp 0 take part in the shuffles
        float v = lane < kReduceBlock / kWarpSize ? warp_sums[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) *loss = v / static_cast<float>(rows);
    }
}

// dlogits(r, c) = (probs(r, c) - onehot(r, c)) / rows.
// Divided by float(rows) rather than multiplied by 1/rows: IEEE division is
// correctly rounded (nvcc's default -prec-div=true), so this matches NumPy's
// float32 `(probs - onehot) / n` bit for bit, and 1/rows would round twice.
// dlogits may alias probs: each element is read, then written, by the same
// thread, so neither pointer is __restrict__.
template <LabelKind KIND>
__global__ void __launch_bounds__(kRowBlock)
softmax_xent_bwd_f32(const float* probs, const void* __restrict__ labels, float* dlogits,
                     unsigned long long* __restrict__ bad_row, int64_t rows, int64_t cols) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const float rows_f = static_cast<float>(rows);
    for (int64_t r = global_warp(); r < rows; r += grid_warps()) {
        const float* p = probs + r * cols;
        float* d = dlogits + r * cols;
        if constexpr (KIND == LabelKind::kOneHot) {
            const float* y = static_cast<const float*>(labels) + r * cols;
            for (int64_t c = lane; c < cols; c += kWarpSize) d[c] = (p[c] - y[c]) / rows_f;
        } else {
            const int64_t label = load_class_label<KIND>(labels, r);
            // A bad row gets probs / rows: the label is only compared, never
            // used as an index, so nothing is read or written out of bounds.
            const bool ok = label_in_range(label, cols);
            if (!ok && lane == 0) atomicMin(bad_row, static_cast<unsigned long long>(r));
            for (int64_t c = lane; c < cols; c += kWarpSize) {
                float v = p[c];
                if (ok && c == label) v -= 1.0f;
                d[c] = v / rows_f;
            }
        }
    }
}

const char* label_kind_name(LabelKind kind) {
    switch (kind) {
        case LabelKind::kInt32: return "int32";
        case LabelKind::kInt64: return "int64";
        case LabelKind::kOneHot: return "one-hot float32";
    }
    return "unknown";
}

bool valid_label_kind(LabelKind kind) {
    return kind == LabelKind::kInt32 || kind == LabelKind::kInt64 || kind == LabelKind::kOneHot;
}

// *bad_row = -1 (all bits set): "no bad row", and the identity of the
// unsigned atomicMin the kernels use.
void reset_bad_row(int64_t* bad_row, cudaStream_t stream) {
    CUDA_CHECK(cudaMemsetAsync(bad_row, 0xFF, sizeof(int64_t), stream));
}

// Shared precondition checks of the forward and backward launchers.
void check_xent_args(const char* op, const void* labels, LabelKind kind, int64_t* bad_row,
                     int64_t rows, int64_t cols) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be non-negative, got rows=" << rows << " cols=" << cols);
    FASTMLP_CHECK(valid_label_kind(kind),
                  op << ": unknown label kind " << static_cast<int>(kind));
    FASTMLP_CHECK(bad_row != nullptr, op << ": bad_row is null");
    FASTMLP_CHECK(cols == 0 || rows <= std::numeric_limits<int64_t>::max() / cols,
                  op << ": rows*cols overflows int64 (rows=" << rows << ", cols=" << cols << ")");
    // One-hot labels are a rows x cols array, empty when cols == 0.
    const bool labels_needed = rows > 0 && (kind != LabelKind::kOneHot || cols > 0);
    FASTMLP_CHECK(!labels_needed || labels != nullptr,
                  op << ": labels (" << label_kind_name(kind) << ") are null");
}

}  // namespace

void softmax_xent_fwd(const float* logits, const void* labels, LabelKind kind, float* probs,
                      float* row_loss, float* loss, int64_t* bad_row, int64_t rows, int64_t cols,
                      cudaStream_t stream) {
    check_xent_args("softmax_xent_fwd", labels, kind, bad_row, rows, cols);
    FASTMLP_CHECK(loss != nullptr, "softmax_xent_fwd: loss is null");
    if (rows > 0) {
        FASTMLP_CHECK(row_loss != nullptr, "softmax_xent_fwd: row_loss is null");
        FASTMLP_CHECK(cols == 0 || (logits != nullptr && probs != nullptr),
                      "softmax_xent_fwd: logits or probs is null");
    }

    reset_bad_row(bad_row, stream);
    if (rows == 0) {
        // The mean over no rows is defined as 0; all-zero bits are +0.0f.
        CUDA_CHECK(cudaMemsetAsync(loss, 0, sizeof(float), stream));
        return;
    }

    auto* bad = reinterpret_cast<unsigned long long*>(bad_row);
    const unsigned int blocks = detail::grid_stride_blocks(rows, kWarpsPerBlock);
    switch (kind) {
        case LabelKind::kInt32:
            softmax_xent_fwd_f32<LabelKind::kInt32><<<blocks, kRowBlock, 0, stream>>>(
                logits, labels, probs, row_loss, bad, rows, cols);
            break;
        case LabelKind::kInt64:
            softmax_xent_fwd_f32<LabelKind::kInt64><<<blocks, kRowBlock, 0, stream>>>(
                logits, labels, probs, row_loss, bad, rows, cols);
            break;
        case LabelKind::kOneHot:
            softmax_xent_fwd_f32<LabelKind::kOneHot><<<blocks, kRowBlock, 0, stream>>>(
                logits, labels, probs, row_loss, bad, rows, cols);
            break;
    }
    detail::check_launch();
    // Stream order makes row_loss complete before the reduction reads it.
    softmax_xent_mean_loss_f32<<<1, kReduceBlock, 0, stream>>>(row_loss, loss, rows);
    detail::check_launch();
}

void softmax_xent_bwd(const float* probs, const void* labels, LabelKind kind, float* dlogits,
                      int64_t* bad_row, int64_t rows, int64_t cols, cudaStream_t stream) {
    check_xent_args("softmax_xent_bwd", labels, kind, bad_row, rows, cols);
    if (rows > 0) {
        FASTMLP_CHECK(cols == 0 || (probs != nullptr && dlogits != nullptr),
                      "softmax_xent_bwd: probs or dlogits is null");
    }

    reset_bad_row(bad_row, stream);
    if (rows == 0) return;

    auto* bad = reinterpret_cast<unsigned long long*>(bad_row);
    const unsigned int blocks = detail::grid_stride_blocks(rows, kWarpsPerBlock);
    switch (kind) {
        case LabelKind::kInt32:
            softmax_xent_bwd_f32<LabelKind::kInt32><<<blocks, kRowBlock, 0, stream>>>(
                probs, labels, dlogits, bad, rows, cols);
            break;
        case LabelKind::kInt64:
            softmax_xent_bwd_f32<LabelKind::kInt64><<<blocks, kRowBlock, 0, stream>>>(
                probs, labels, dlogits, bad, rows, cols);
            break;
        case LabelKind::kOneHot:
            softmax_xent_bwd_f32<LabelKind::kOneHot><<<blocks, kRowBlock, 0, stream>>>(
                probs, labels, dlogits, bad, rows, cols);
            break;
    }
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
