// CPU softmax-cross-entropy, forward and backward.
//
// Labels come as int32 / int64 class indices or float one-hot rows
// (LabelKind). An integer label outside [0, cols) is never used as an index:
// the row gets a NaN loss and the smallest such row is reported in *bad_row,
// so the Python layer can raise a ValueError naming it.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>

#include "cpu/fpenv.h"
#include "check.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

constexpr int64_t kBlock = 256, kBlockFloats = 4096;  // a block: at most these rows, floats

// The softmax of n rows of `cols` logits z (n * cols <= kBlockFloats unless
// n == 1): p = exp(z - max) / sum, mx = the row maxima, lse = log(sum). Every
// row is reduced over c = 0..cols-1 in order. The exps and logs of the whole
// block run in flat loops (SIMD across rows: the MLP's row of 10 classes is
// shorter than a vector) with exp_vec/log_vec (kernel_math.h).
FASTMLP_SIMD_CLONES
void softmax_block(const float* __restrict z, float* __restrict p, float* __restrict mx,
                   float* __restrict lse, int64_t n, int64_t cols) {
    for (int64_t r = 0; r < n; ++r) {
        const float* zr = z + r * cols;
        float* pr = p + r * cols;
        float m = zr[0];
        for (int64_t c = 1; c < cols; ++c) m = fastmlp::max_nan(m, zr[c]);  // a NaN logit: a NaN row
        mx[r] = m;
        for (int64_t c = 0; c < cols; ++c) pr[c] = zr[c] - m;  // <= 0: exp never overflows
    }
    for (int64_t i = 0; i < n * cols; ++i) p[i] = exp_vec(p[i]);
    float sum[kBlock];
    for (int64_t r = 0; r < n; ++r) {
        const float* pr = p + r * cols;
        float s = 0.0f;
        for (int64_t c = 0; c < cols; ++c) s += pr[c];
        sum[r] = s;
    }
    for (int64_t r = 0; r < n; ++r) lse[r] = log_vec(sum[r]);  // sum >= 1 (exp(0) is a term), or NaN
    for (int64_t r = 0; r < n; ++r) {
        float* pr = p + r * cols;
        const float inv = 1.0f / sum[r];
        for (int64_t c = 0; c < cols; ++c) pr[c] *= inv;
    }
}

// The integer label of row r, or -1 when it is out of range (int64 labels may
// not fit in int, so compare before narrowing).
int64_t label_of(const void* labels, LabelKind kind, int64_t r, int64_t cols) {
    int64_t y = kind == LabelKind::kInt32 ? static_cast<const int32_t*>(labels)[r]
                                          : static_cast<const int64_t*>(labels)[r];
    return (y >= 0 && y < cols) ? y : -1;
}

// The loss of rows r0 .. r0+n-1 from their maxima and log-sums (NaN for an
// out-of-range label); returns the first such row, or -1.
FASTMLP_SIMD_CLONES
int64_t row_losses(const float* __restrict logits, const void* labels, LabelKind kind,
                   const float* __restrict mx, const float* __restrict lse,
                   float* __restrict row_loss, int64_t r0, int64_t n, int64_t cols) {
    int64_t bad = -1;
    for (int64_t i = 0; i < n; ++i) {
        const int64_t r = r0 + i;
        const float* z = logits + r * cols;
        float l;
        if (kind == LabelKind::kOneHot) {
            const float* y = static_cast<const float*>(labels) + r * cols;
            l = 0.0f;
            for (int64_t c = 0; c < cols; ++c) l -= y[c] * log_softmax_entry(z[c], mx[i], lse[i]);
        } else {
            const int64_t y = label_of(labels, kind, r, cols);
            if (y < 0) {
                l = std::numeric_limits<float>::quiet_NaN();
                if (bad < 0) bad = r;
            } else {
                l = -log_softmax_entry(z[y], mx[i], lse[i]);
            }
        }
        row_loss[r] = l;
    }
    return bad;
}

void check_args(const char* op, const void* labels, LabelKind kind, int64_t rows,
                int64_t cols) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be >= 0, got rows=" << rows << " cols=" << cols);
    FASTMLP_CHECK(kind == LabelKind::kInt32 || kind == LabelKind::kInt64 ||
                      kind == LabelKind::kOneHot,
                  op << ": unknown label kind " << static_cast<int>(kind));
    FASTMLP_CHECK(rows == 0 || labels, op << ": null labels");
    FASTMLP_CHECK(rows == 0 || cols > 0, op << ": need at least one class");
}

}  // namespace

void softmax_xent_fwd(const float* logits, const void* labels, LabelKind kind,
                      float* probs, float* row_loss, float* loss, int64_t* bad_row,
                      int64_t rows, int64_t cols) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_args("softmax_xent_fwd", labels, kind, rows, cols);
    FASTMLP_CHECK(loss && bad_row, "softmax_xent_fwd: null loss or bad_row");
    FASTMLP_CHECK(rows == 0 || (logits && probs && row_loss), "softmax_xent_fwd: null pointer");
    std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        // Rows in blocks of at most kBlock rows and kBlockFloats logits:
        // softmax_block computes the probabilities and, per row, the max and
        // log(sum exp); the loss of each row then needs only its label.
        const int64_t block = std::max<int64_t>(1, std::min(kBlock, kBlockFloats / cols));
        float mx[kBlock], lse[kBlock];
        for (int64_t b0 = r0; b0 < r1; b0 += block) {
            const int64_t n = std::min(r1 - b0, block);
            softmax_block(logits + b0 * cols, probs + b0 * cols, mx, lse, n, cols);
            const int64_t bad = row_losses(logits, labels, kind, mx, lse, row_loss, b0, n, cols);
            if (bad >= 0) atomic_min(first_bad, bad);
        }
    });
    // The mean in a fixed order (double accumulation: rows can be millions).
    double total = 0.0;
    for (int64_t r = 0; r < rows; ++r) total += row_loss[r];
    *loss = rows > 0 ? static_cast<float>(total / static_cast<double>(rows)) : 0.0f;
    const int64_t fb = first_bad.load();
    *bad_row = fb == std::numeric_limits<int64_t>::max() ? -1 : fb;
}

void softmax_xent_bwd(const float* probs, const void* labels, LabelKind kind, float* dlogits,
                      int64_t* bad_row, int64_t rows, int64_t cols) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_args("softmax_xent_bwd", labels, kind, rows, cols);
    FASTMLP_CHECK(bad_row, "softmax_xent_bwd: null bad_row");
    FASTMLP_CHECK(rows == 0 || (probs && dlogits), "softmax_xent_bwd: null pointer");
    // (p - y) / rows as a true division, like the GPU kernel and NumPy's
    // `(probs - onehot) / n`: a multiply by 1/rows would round twice.
    const float rows_f = static_cast<float>(rows);
    std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        const float* p = probs + r * cols;
        float* d = dlogits + r * cols;  // may alias p: each element read, then written
        if (kind == LabelKind::kOneHot) {
            const float* y = static_cast<const float*>(labels) + r * cols;
            for (int64_t c = 0; c < cols; ++c) d[c] = (p[c] - y[c]) / rows_f;
        } else {
            const int64_t y = label_of(labels, kind, r, cols);
            if (y < 0) atomic_min(first_bad, r);
            for (int64_t c = 0; c < cols; ++c) d[c] = (p[c] - (c == y ? 1.0f : 0.0f)) / rows_f;
        }
    }
    });
    const int64_t fb = first_bad.load();
    *bad_row = fb == std::numeric_limits<int64_t>::max() ? -1 : fb;
}

namespace {

// Index of the first maximum of row[0..n): a NaN never compares greater, so it
// is picked only at index 0 (a row with NaN has a NaN loss already).
int64_t first_argmax(const float* row, int64_t n) {
    int64_t best = 0;
    for (int64_t c = 1; c < n; ++c)
        if (row[c] > row[best]) best = c;
    return best;
}

}  // namespace

void softmax_xent_fused(const float* logits, const void* labels, LabelKind kind, float* out,
                        float* row_loss, int32_t* /*row_hits: the CPU counts directly*/,
                        float* loss, int64_t* hits, int64_t* bad_row, int64_t rows, int64_t cols,
                        bool backward) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_args("softmax_xent_fused", labels, kind, rows, cols);
    FASTMLP_CHECK(hits, "softmax_xent_fused: null hits");
    FASTMLP_CHECK(rows == 0 || cols == 0 || logits + rows * cols <= out || out + rows * cols <= logits,
                  "softmax_xent_fused: out must not overlap logits");
    // Forward then backward, in place over out: the same functions (and so the
    // same bits) as the two unfused ops.
    softmax_xent_fwd(logits, labels, kind, out, row_loss, loss, bad_row, rows, cols);
    if (backward) softmax_xent_bwd(out, labels, kind, out, bad_row, rows, cols);
    int64_t count = 0;
    for (int64_t r = 0; r < rows; ++r) {
        int64_t truth;
        if (kind == LabelKind::kOneHot)
            truth = first_argmax(static_cast<const float*>(labels) + r * cols, cols);
        else
            truth = label_of(labels, kind, r, cols);  // -1 when out of range: never a hit
        count += first_argmax(logits + r * cols, cols) == truth;
    }
    *hits = count;
}

}  // namespace cpu
}  // namespace fastmlp
