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
// Fused (softmax_xent_fused, the engine's training step): one row kernel does
// the forward, the backward (out = dlogits) or only the probabilities, and the
// arg-max hit per row; one block then reduces loss and hits. It computes with
// the same expressions as the two unfused kernels, so its loss and dlogits are
// theirs bit for bit (details above the kernel).
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
#include "warp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cuda {
namespace {

using detail::kWarpSize;

constexpr int kRowBlock = 256;                          // threads per block of the row kernels
constexpr int kWarpsPerBlock = kRowBlock / kWarpSize;   // rows in flight per block
static_assert(kRowBlock % kWarpSize == 0, "one row per warp needs whole warps");


template <LabelKind KIND>
__device__ __forceinline__ int64_t load_class_label(const void* labels, int64_t row) {
    static_assert(KIND == LabelKind::kInt32 || KIND == LabelKind::kInt64, "integer labels only");
    if constexpr (KIND == LabelKind::kInt32) return static_cast<const int32_t*>(labels)[row];
    else return static_cast<const int64_t*>(labels)[row];
}

__device__ __forceinline__ bool label_in_range(int64_t label, int64_t cols) {
    return label >= 0 && label < cols;
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

        // max_nan (kernel_math.h): a NaN logit makes the max NaN, so the whole
        // row's probs and its loss come out NaN, as torch's.
        float row_max = -CUDART_INF_F;
        for (int64_t c = lane; c < cols; c += kWarpSize) row_max = fastmlp::max_nan(row_max, z[c]);
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
// The fused op's reduction (softmax_xent_fused_reduce_f32) runs the same
// block_mean_loss, so its loss equals the unfused forward's bit for bit.
constexpr int kReduceBlock = 1024;
static_assert(kReduceBlock % kWarpSize == 0 && kReduceBlock / kWarpSize <= kWarpSize,
              "the per-warp sums must fit in one warp for the final reduction");

// The mean row loss, valid in thread 0 (the other threads return 0). Every
// thread of the kReduceBlock-thread block must call it (it has a barrier).
__device__ __forceinline__ float block_mean_loss(const float* __restrict__ row_loss,
                                                 int64_t rows) {
    __shared__ float warp_sums[kReduceBlock / kWarpSize];
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;

    float s = 0.0f;
    for (int64_t r = threadIdx.x; r < rows; r += kReduceBlock) s += row_loss[r];
    s = warp_sum(s);
    if (lane == 0) warp_sums[warp] = s;
    __syncthreads();   // every warp's sum is in shared memory before warp 0 reads them

    float mean = 0.0f;
    if (warp == 0) {   // warp-uniform: all 32 lanes of warp 0 take part in the shuffles
        float v = lane < kReduceBlock / kWarpSize ? warp_sums[lane] : 0.0f;
        v = warp_sum(v);
        if (lane == 0) mean = v / static_cast<float>(rows);
    }
    return mean;
}

__global__ void __launch_bounds__(kReduceBlock)
softmax_xent_mean_loss_f32(const float* __restrict__ row_loss, float* __restrict__ loss,
                           int64_t rows) {
    const float mean = block_mean_loss(row_loss, rows);
    if (threadIdx.x == 0) *loss = mean;
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

// ---- The fused training-step loss: softmax_xent_fused --------------------------
// One pass per row computes what softmax_xent_fwd_f32 + softmax_xent_bwd_f32
// compute, plus the arg-max hit, and one block reduces loss and hits.
//
// Bit-for-bit contract with the unfused ops: the row max and the sum are the
// same lane-strided loops and the same xor butterflies; p = expf(z - max) / sum
// and the one-hot dot product are the same expressions (so the same FFMA
// contraction); dlogits = (p - y) / float(rows) with p the float the forward
// would have stored; the mean is block_mean_loss, shared with the forward.
//
// Arg-max, "the first maximum", as the CPU's first_argmax (best = 0; for c
// ascending: if z[c] > z[best] best = c). With that scan a NaN compares false,
// so it is picked only when it sits at index 0 (then nothing beats it), and
// otherwise the result is the lowest index holding the maximum of the non-NaN
// values (-0.0 == +0.0, so they tie and the lower index wins). The warp
// computes exactly that: each lane keeps the first maximum of its non-NaN
// columns (strict > over ascending c), the butterfly keeps the larger value
// and, on equal values, the lower index (a strict total order on the
// candidates, so every lane ends with the same winner whatever the pairing),
// and a NaN at column 0 overrides the result with 0.
constexpr int64_t kNoIndex = INT64_MAX;   // "this lane has no non-NaN column yet"

// Folds column c (value x, visited in ascending c per lane) into the lane's best.
__device__ __forceinline__ void argmax_visit(float x, int64_t c, float& best_v, int64_t& best_i) {
    // x == x is false only for NaN; !(x <= best_v) is x > best_v for a real
    // best and true while best_v is still the NaN placeholder.
    if (x == x && (best_i == kNoIndex || !(x <= best_v))) {
        best_v = x;
        best_i = c;
    }
}


// The CPU's first_argmax of a row with cols >= 1 columns: the warp's first
// maximum, except that a NaN at column 0 wins. `first` is lane 0's value of
// column 0 (other lanes' values are ignored).
__device__ __forceinline__ int64_t row_first_argmax(float best_v, int64_t best_i, float first) {
    const int64_t best = warp_first_argmax<kNoIndex>(best_v, best_i);
    const float v0 = __shfl_sync(kFullMask, first, 0);
    return v0 != v0 ? 0 : best;   // a non-NaN column 0 is a candidate, so best is set
}

// out = probs (BACKWARD false) or dlogits = (probs - onehot) / rows (true);
// row_loss(r) as softmax_xent_fwd_f32; row_hits(r) = 1 when the row's arg-max
// is its label (one-hot: the label row's arg-max), else 0 (a bad label: 0).
// out must not overlap logits (the launcher checks): logits is read three
// times per row, and __restrict__ lets those reads go through the
// read-only path. cols >= 1.
template <LabelKind KIND, bool BACKWARD>
__global__ void __launch_bounds__(kRowBlock)
softmax_xent_fused_f32(const float* __restrict__ logits, const void* __restrict__ labels,
                       float* __restrict__ out, float* __restrict__ row_loss,
                       int32_t* __restrict__ row_hits, unsigned long long* __restrict__ bad_row,
                       int64_t rows, int64_t cols) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const float rows_f = static_cast<float>(rows);
    // r is warp-uniform, so every shuffle below runs with all 32 lanes.
    for (int64_t r = global_warp(); r < rows; r += grid_warps()) {
        const float* z = logits + r * cols;
        float* o = out + r * cols;

        // Pass 1: the row max (as softmax_xent_fwd_f32) and the logits' arg-max.
        float row_max = -CUDART_INF_F;
        float best_v = CUDART_NAN_F;
        int64_t best_i = kNoIndex;
        for (int64_t c = lane; c < cols; c += kWarpSize) {
            const float x = z[c];
            row_max = fastmlp::max_nan(row_max, x);
            argmax_visit(x, c, best_v, best_i);
        }
        row_max = warp_max(row_max);
        const int64_t pred = row_first_argmax(best_v, best_i, lane == 0 ? z[0] : 0.0f);

        // Pass 2: the sum of exp(z - max), as the forward.
        float sum = 0.0f;
        for (int64_t c = lane; c < cols; c += kWarpSize) sum += expf(z[c] - row_max);
        sum = warp_sum(sum);
        const float log_sum = logf(sum);

        // Pass 3: probabilities (or their gradient), the one-hot loss terms
        // and the one-hot label's arg-max.
        float loss;
        int32_t hit;
        if constexpr (KIND == LabelKind::kOneHot) {
            const float* y = static_cast<const float*>(labels) + r * cols;
            float dot = 0.0f;
            float y_best_v = CUDART_NAN_F;
            int64_t y_best_i = kNoIndex;
            for (int64_t c = lane; c < cols; c += kWarpSize) {
                const float zc = z[c];
                const float yc = y[c];
                const float p = expf(zc - row_max) / sum;
                dot += yc * log_softmax_entry(zc, row_max, log_sum);
                argmax_visit(yc, c, y_best_v, y_best_i);
                if constexpr (BACKWARD) o[c] = (p - yc) / rows_f;
                else o[c] = p;
            }
            loss = -warp_sum(dot);
            const int64_t truth = row_first_argmax(y_best_v, y_best_i, lane == 0 ? y[0] : 0.0f);
            hit = pred == truth ? 1 : 0;
        } else {
            // Every lane reads the same label (one broadcast transaction), so
            // `ok` is warp-uniform.
            const int64_t label = load_class_label<KIND>(labels, r);
            const bool ok = label_in_range(label, cols);
            // Unrolled 2x, not the default 4x: with two correctly rounded
            // divisions per column (each a possible slow-path call), ptxas
            // spilled a register in the int32 backward at 4x (sm_90).
#pragma unroll 2
            for (int64_t c = lane; c < cols; c += kWarpSize) {
                const float p = expf(z[c] - row_max) / sum;
                if constexpr (BACKWARD) {
                    // As softmax_xent_bwd_f32: a bad row gets p / rows, the
                    // label is compared, never used as an index.
                    float v = p;
                    if (ok && c == label) v -= 1.0f;
                    o[c] = v / rows_f;
                } else {
                    o[c] = p;
                }
            }
            if (ok) {
                loss = -log_softmax_entry(z[label], row_max, log_sum);
                hit = pred == label ? 1 : 0;
            } else {
                loss = CUDART_NAN_F;
                hit = 0;
                if (lane == 0) atomicMin(bad_row, static_cast<unsigned long long>(r));
            }
        }
        if (lane == 0) {
            row_loss[r] = loss;
            row_hits[r] = hit;
        }
    }
}

// *loss = block_mean_loss (the forward's mean, bit for bit) and *hits = the
// sum of row_hits, by one block. The hit count is an integer sum, exact in
// any order; it uses the same rows-per-thread split as the loss. rows > 0.
__global__ void __launch_bounds__(kReduceBlock)
softmax_xent_fused_reduce_f32(const float* __restrict__ row_loss,
                              const int32_t* __restrict__ row_hits, float* __restrict__ loss,
                              int64_t* __restrict__ hits, int64_t rows) {
    __shared__ long long warp_hits[kReduceBlock / kWarpSize];
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const int warp = static_cast<int>(threadIdx.x) / kWarpSize;

    long long h = 0;
    for (int64_t r = threadIdx.x; r < rows; r += kReduceBlock) h += row_hits[r];
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
        h += __shfl_xor_sync(kFullMask, h, offset);
    if (lane == 0) warp_hits[warp] = h;

    // block_mean_loss's barrier also publishes warp_hits to warp 0.
    const float mean = block_mean_loss(row_loss, rows);

    if (warp == 0) {
        long long v = lane < kReduceBlock / kWarpSize ? warp_hits[lane] : 0;
#pragma unroll
        for (int offset = kWarpSize / 2; offset > 0; offset /= 2)
            v += __shfl_xor_sync(kFullMask, v, offset);
        if (lane == 0) {
            *loss = mean;
            *hits = static_cast<int64_t>(v);
        }
    }
}

template <LabelKind KIND>
void launch_softmax_xent_fused(const float* logits, const void* labels, float* out,
                               float* row_loss, int32_t* row_hits, unsigned long long* bad_row,
                               int64_t rows, int64_t cols, bool backward, cudaStream_t stream) {
    const unsigned int blocks = detail::grid_stride_blocks(rows, kWarpsPerBlock);
    if (backward)
        softmax_xent_fused_f32<KIND, true><<<blocks, kRowBlock, 0, stream>>>(
            logits, labels, out, row_loss, row_hits, bad_row, rows, cols);
    else
        softmax_xent_fused_f32<KIND, false><<<blocks, kRowBlock, 0, stream>>>(
            logits, labels, out, row_loss, row_hits, bad_row, rows, cols);
    detail::check_launch();
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

void softmax_xent_fused(const float* logits, const void* labels, LabelKind kind, float* out,
                        float* row_loss, int32_t* row_hits, float* loss, int64_t* hits,
                        int64_t* bad_row, int64_t rows, int64_t cols, bool backward,
                        cudaStream_t stream) {
    check_xent_args("softmax_xent_fused", labels, kind, bad_row, rows, cols);
    FASTMLP_CHECK(loss != nullptr && hits != nullptr, "softmax_xent_fused: loss or hits is null");
    // The arg-max needs a column (as the CPU op, which checks the same).
    FASTMLP_CHECK(rows == 0 || cols > 0, "softmax_xent_fused: need at least one class, got cols=0");
    if (rows > 0) {
        FASTMLP_CHECK(logits != nullptr && out != nullptr,
                      "softmax_xent_fused: logits or out is null");
        FASTMLP_CHECK(row_loss != nullptr && row_hits != nullptr,
                      "softmax_xent_fused: row_loss or row_hits is null");
        // out and logits must not overlap: the kernel reads a logits row three
        // times and marks both __restrict__ (rows * cols fits int64: checked above).
        const uint64_t n = static_cast<uint64_t>(rows * cols);
        FASTMLP_CHECK(!floats_overlap(out, n, logits, n),
                      "softmax_xent_fused: out must not overlap logits");
    }

    reset_bad_row(bad_row, stream);
    if (rows == 0) {
        // Nothing to read: the mean over no rows is 0 (all-zero bits are
        // +0.0f) and there are no hits.
        CUDA_CHECK(cudaMemsetAsync(loss, 0, sizeof(float), stream));
        CUDA_CHECK(cudaMemsetAsync(hits, 0, sizeof(int64_t), stream));
        return;
    }

    auto* bad = reinterpret_cast<unsigned long long*>(bad_row);
    switch (kind) {
        case LabelKind::kInt32:
            launch_softmax_xent_fused<LabelKind::kInt32>(logits, labels, out, row_loss, row_hits,
                                                         bad, rows, cols, backward, stream);
            break;
        case LabelKind::kInt64:
            launch_softmax_xent_fused<LabelKind::kInt64>(logits, labels, out, row_loss, row_hits,
                                                         bad, rows, cols, backward, stream);
            break;
        case LabelKind::kOneHot:
            launch_softmax_xent_fused<LabelKind::kOneHot>(logits, labels, out, row_loss, row_hits,
                                                          bad, rows, cols, backward, stream);
            break;
    }
    // Stream order makes row_loss / row_hits complete before the reduction.
    softmax_xent_fused_reduce_f32<<<1, kReduceBlock, 0, stream>>>(row_loss, row_hits, loss, hits,
                                                                  rows);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
