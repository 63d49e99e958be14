// CPU loss_fused (issue 16): every LossKind's loss and gradient in one pass.
//
// The per-element math is loss_math.h's (loss_elem, loss_target,
// log_softmax_entry, loss_cce_logits_grad, the loss_expf / loss_logf
// building blocks), the same functions the CUDA kernel runs; only the loops
// around them are the CPU's own, shaped so that they vectorise:
//   - every kind evaluates its elements in flat
//     loops over a small stack buffer (a block of short rows, or a piece of a
//     wide row), branch-free, in an AVX-512 / AVX2 / baseline clone
//     (FASTMLP_SIMD_CLONES) picked at load time;
//   - a row's sums then run in a fixed order that depends only on cols
//     (row_sum below), never on the thread count or the SIMD width;
// (loss_math.h's loss_row, the CUDA kernel's per-row loop, runs the same
// per-column functions in the GPU's order.)
// Rows are split over the pool; each row's loss lands in row_loss, and the
// caller's thread then sums row_loss in row order in double, so the result
// does not depend on the thread count.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <limits>

#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "loss_math.h"

namespace fastmlp {
namespace cpu {
namespace {

#define FASTMLP_ALWAYS_INLINE inline __attribute__((always_inline))

constexpr int64_t kPiece = 1024;    // floats per stack buffer (4 KiB: in L1)
constexpr int64_t kLanes = 16;      // partial sums of a wide row
constexpr int64_t kWideCols = 64;   // rows of at least this many columns are "wide"
static_assert(kPiece % kLanes == 0 && kPiece >= kWideCols, "pieces of whole lane groups");

// The CPU's summation order of a row's terms v_0 .. v_{cols-1}:
//   cols < kWideCols: one float sum in column order (the terms come from a
//     block of rows, see sum_serial);
//   wide rows: kLanes partial sums, lane j takes the columns c = j (mod kLanes)
//     in order, then the lanes are added pairwise (j + 8 into j, then 4, 2, 1).
// Both depend only on cols, so the result is the same bits for any thread
// count and any SIMD width (each lane is one float chain; nothing is
// reassociated by the compiler).
FASTMLP_ALWAYS_INLINE float sum_serial(const float* __restrict v, int64_t n) {
    float s = 0.0f;
    for (int64_t c = 0; c < n; ++c) s += v[c];
    return s;
}

struct LaneSum {
    float a[kLanes] = {};
    // Adds v[0 .. len): the next columns of the row; every call but the last
    // has len a multiple of kLanes, so column c lands in lane c % kLanes.
    FASTMLP_ALWAYS_INLINE void add(const float* __restrict v, int64_t len) {
        int64_t i = 0;
        for (; i + kLanes <= len; i += kLanes)
            for (int64_t j = 0; j < kLanes; ++j) a[j] += v[i + j];
        for (int64_t j = 0; i + j < len; ++j) a[j] += v[i + j];
    }
    FASTMLP_ALWAYS_INLINE float total() {
        for (int64_t w = kLanes / 2; w > 0; w /= 2)
            for (int64_t j = 0; j < w; ++j) a[j] += a[j + w];
        return a[0];
    }
};

// The sum of one row's terms in the order above: fill(c0, len, buf) writes the
// terms of columns c0 .. c0+len-1 into buf (len <= kPiece).
template <class Fill>
FASTMLP_ALWAYS_INLINE float row_sum(int64_t cols, float* __restrict buf, Fill&& fill) {
    if (cols < kWideCols) {
        fill(int64_t{0}, cols, buf);
        return sum_serial(buf, cols);
    }
    LaneSum acc;
    for (int64_t c0 = 0; c0 < cols; c0 += kPiece) {
        const int64_t len = std::min(kPiece, cols - c0);
        fill(c0, len, buf);
        acc.add(buf, len);
    }
    return acc.total();
}

// The maximum of a row (max_nan: a NaN makes it NaN). Order-free: any
// grouping gives the same value (up to the sign of a zero maximum, which is
// only ever subtracted from the row).
FASTMLP_ALWAYS_INLINE float row_max(const float* __restrict z, int64_t cols) {
    float m[kLanes];
    for (int64_t j = 0; j < kLanes; ++j) m[j] = -INFINITY;
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes)
        for (int64_t j = 0; j < kLanes; ++j) m[j] = max_nan(m[j], z[c + j]);
    for (int64_t j = 0; c + j < cols; ++j) m[j] = max_nan(m[j], z[c + j]);
    for (int64_t w = kLanes / 2; w > 0; w /= 2)
        for (int64_t j = 0; j < w; ++j) m[j] = max_nan(m[j], m[j + w]);
    return m[0];
}

// l[i] = l(p_i, y_i) and, with BACKWARD, d[i] = dl/dp_i / grad_div for a flat
// span of elements (the row scale is applied by the caller).
// A cross-entropy row's integer label (-1: none, float rows) and whether it is
// bad (outside [0, cols)); its float target row (null for integer labels).
template <LabelKind LK>
FASTMLP_ALWAYS_INLINE int64_t cce_row_label(const void* labels, int64_t r, int64_t cols,
                                            bool& bad) {
    if constexpr (LK == LabelKind::kOneHot) {
        bad = false;
        return -1;
    } else {
        const int64_t label = loss_label<LK>(labels, r, cols);
        bad = label < 0;
        return label;
    }
}

template <LabelKind LK>
FASTMLP_ALWAYS_INLINE const float* cce_row_targets(const void* labels, int64_t r, int64_t cols) {
    return LK == LabelKind::kOneHot ? static_cast<const float*>(labels) + r * cols : nullptr;
}

template <int KIND, bool BACKWARD>
FASTMLP_ALWAYS_INLINE void elem_span(const float* __restrict p, const float* __restrict y,
                                     const LossConsts& k, float* __restrict l,
                                     float* __restrict d, int64_t len) {
    const LossConsts kk = k;  // a local: its fields stay in registers
    for (int64_t i = 0; i < len; ++i) {
        float g;
        l[i] = loss_elem<KIND>(p[i], y[i], kk, g);
        if constexpr (BACKWARD) d[i] = g / kk.grad_div;
    }
}

FASTMLP_ALWAYS_INLINE void scale_span(float* __restrict d, float scale, int64_t len) {
    for (int64_t i = 0; i < len; ++i) d[i] = scale * d[i];
}

// Rows r0 .. r1-1 of an elementwise kind: row_loss[r] = w_r L_r, dpred.
template <int KIND, bool BACKWARD>
FASTMLP_ALWAYS_INLINE void elementwise_rows(const float* pred, const float* y,
                                            const float* sample_weight, float* dpred,
                                            float* row_loss, int64_t r0, int64_t r1,
                                            int64_t rows, int64_t cols, const LossConsts& k) {
    float buf[kPiece];
    const float cols_f = static_cast<float>(cols);
    auto finish = [&](int64_t r, float sum) FASTMLP_ALWAYS_INLINE_LAMBDA {
        const float w = sample_weight ? sample_weight[r] : 1.0f;
        row_loss[r] = w * (sum / cols_f);
    };
    if (cols < kWideCols) {
        // Blocks of whole rows: one flat element loop, then the row sums.
        const int64_t nb = kPiece / cols;
        for (int64_t b0 = r0; b0 < r1; b0 += nb) {
            const int64_t n = std::min(nb, r1 - b0);
            const int64_t off = b0 * cols;
            float* d = BACKWARD ? dpred + off : nullptr;
            elem_span<KIND, BACKWARD>(pred + off, y + off, k, buf, d, n * cols);
            for (int64_t i = 0; i < n; ++i) {
                const int64_t r = b0 + i;
                if constexpr (BACKWARD)
                    scale_span(d + i * cols, loss_row_scale(sample_weight, r, rows), cols);
                finish(r, sum_serial(buf + i * cols, cols));
            }
        }
        return;
    }
    for (int64_t r = r0; r < r1; ++r) {
        const int64_t off = r * cols;
        const float scale = loss_row_scale(sample_weight, r, rows);
        const float s = row_sum(cols, buf, [&](int64_t c0, int64_t len, float* l)
                                               FASTMLP_ALWAYS_INLINE_LAMBDA {
            float* d = BACKWARD ? dpred + off + c0 : nullptr;
            elem_span<KIND, BACKWARD>(pred + off + c0, y + off + c0, k, l, d, len);
            if constexpr (BACKWARD) scale_span(d, scale, len);
        });
        finish(r, s);
    }
}

// Rows r0 .. r1-1 of cce_logits (the rules of loss_row's cce_logits branch:
// L = -sum_c t_c log softmax(z)_c, d_c = scale (softmax(z)_c S - t_c)).
// Returns the first row with a bad integer label, or -1.
template <LabelKind LK, bool BACKWARD>
FASTMLP_ALWAYS_INLINE int64_t cce_logits_rows(const float* pred, const void* labels,
                                              const float* sample_weight, float* dpred,
                                              float* row_loss, int64_t r0, int64_t r1,
                                              int64_t rows, int64_t cols,
                                              const LossConsts& k) {
    constexpr bool kFloatRows = LK == LabelKind::kOneHot;
    const LossConsts kk = k;
    int64_t first_bad = -1;
    float buf[kPiece];
    auto label_of = [&](int64_t r, bool& bad) FASTMLP_ALWAYS_INLINE_LAMBDA {
        return cce_row_label<LK>(labels, r, cols, bad);
    };
    auto yrow = [&](int64_t r) FASTMLP_ALWAYS_INLINE_LAMBDA {
        return cce_row_targets<LK>(labels, r, cols);
    };
    // L_r from the row's max and log-sum; the gradient from e = exp(z - m)
    // (recomputed, or the block's buffer).
    auto finish = [&](int64_t r, float loss, bool bad) FASTMLP_ALWAYS_INLINE_LAMBDA {
        if (bad && first_bad < 0) first_bad = r;
        const float w = sample_weight ? sample_weight[r] : 1.0f;
        row_loss[r] = w * (bad ? NAN : loss);
    };
    if (cols < kWideCols) {
        // Blocks of whole rows: the exps of the block in one flat loop.
        const int64_t nb = kPiece / cols;
        float mx[kPiece], se[kPiece], lse[kPiece];
        for (int64_t b0 = r0; b0 < r1; b0 += nb) {
            const int64_t n = std::min(nb, r1 - b0);
            for (int64_t i = 0; i < n; ++i) {
                const float* z = pred + (b0 + i) * cols;
                float m = -INFINITY;
                for (int64_t c = 0; c < cols; ++c) m = max_nan(m, z[c]);
                mx[i] = m;
                for (int64_t c = 0; c < cols; ++c) buf[i * cols + c] = z[c] - m;
            }
            for (int64_t j = 0; j < n * cols; ++j) buf[j] = loss_expf(buf[j]);
            for (int64_t i = 0; i < n; ++i) se[i] = sum_serial(buf + i * cols, cols);
            for (int64_t i = 0; i < n; ++i) lse[i] = loss_logf(se[i]);
            for (int64_t i = 0; i < n; ++i) {
                const int64_t r = b0 + i;
                const float* z = pred + r * cols;
                const float* y = yrow(r);
                bool bad;
                const int64_t label = label_of(r, bad);
                float dot = 0.0f;
                for (int64_t c = 0; c < cols; ++c)
                    dot += loss_target<LK>(y, label, c, kk) * log_softmax_entry(z[c], mx[i], lse[i]);
                if constexpr (BACKWARD) {
                    float S = 1.0f;
                    if constexpr (kFloatRows) {
                        S = 0.0f;
                        for (int64_t c = 0; c < cols; ++c) S += loss_target<LK>(y, label, c, kk);
                    }
                    const float scale = loss_row_scale(sample_weight, r, rows);
                    float* d = dpred + r * cols;
                    const float* e = buf + i * cols;
                    for (int64_t c = 0; c < cols; ++c)
                        d[c] = loss_cce_logits_grad(e[c], se[i], S,
                                                    loss_target<LK>(y, label, c, kk), scale);
                }
                finish(r, -dot, bad);
            }
        }
        return first_bad;
    }
    for (int64_t r = r0; r < r1; ++r) {
        const float* z = pred + r * cols;
        const float* y = yrow(r);
        bool bad;
        const int64_t label = label_of(r, bad);
        const float m = row_max(z, cols);
        const float s = row_sum(cols, buf, [&](int64_t c0, int64_t len, float* v)
                                               FASTMLP_ALWAYS_INLINE_LAMBDA {
            for (int64_t c = 0; c < len; ++c) v[c] = loss_expf(z[c0 + c] - m);
        });
        const float ls = loss_logf(s);
        const float dot = row_sum(cols, buf, [&](int64_t c0, int64_t len, float* v)
                                                 FASTMLP_ALWAYS_INLINE_LAMBDA {
            for (int64_t c = 0; c < len; ++c)
                v[c] = loss_target<LK>(y, label, c0 + c, kk) * log_softmax_entry(z[c0 + c], m, ls);
        });
        if constexpr (BACKWARD) {
            float S = 1.0f;
            if constexpr (kFloatRows)
                S = row_sum(cols, buf, [&](int64_t c0, int64_t len, float* v)
                                           FASTMLP_ALWAYS_INLINE_LAMBDA {
                    for (int64_t c = 0; c < len; ++c) v[c] = loss_target<LK>(y, label, c0 + c, kk);
                });
            const float scale = loss_row_scale(sample_weight, r, rows);
            float* d = dpred + r * cols;
            for (int64_t c = 0; c < cols; ++c)
                d[c] = loss_cce_logits_grad(loss_expf(z[c] - m), s, S,
                                            loss_target<LK>(y, label, c, kk), scale);
        }
        finish(r, -dot, bad);
    }
    return first_bad;
}

// Rows r0 .. r1-1 of cce_probs (the rules of loss_row's cce_probs branch,
// loss_cce_probs_terms / loss_cce_probs_grad per column). Returns the first
// row with a bad integer label, or -1.
template <LabelKind LK, bool BACKWARD>
FASTMLP_ALWAYS_INLINE int64_t cce_probs_rows(const float* pred, const void* labels,
                                             const float* sample_weight, float* dpred,
                                             float* row_loss, int64_t r0, int64_t r1,
                                             int64_t rows, int64_t cols, const LossConsts& k) {
    const LossConsts kk = k;
    int64_t first_bad = -1;
    float lb[kPiece], gb[kPiece], sb[kPiece], tb[kPiece];
    auto finish = [&](int64_t r, float loss, bool bad) FASTMLP_ALWAYS_INLINE_LAMBDA {
        if (bad && first_bad < 0) first_bad = r;
        const float w = sample_weight ? sample_weight[r] : 1.0f;
        row_loss[r] = w * (bad ? NAN : loss);
    };
    // The terms of columns c0 .. c0+len-1 of the rows whose sums and targets
    // are in sb / tb (flat), into lb (t log q) and gb (g u).
    auto terms = [&](const float* p, int64_t len) FASTMLP_ALWAYS_INLINE_LAMBDA {
        for (int64_t i = 0; i < len; ++i) {
            float gu;
            lb[i] = loss_cce_probs_terms(p[i], sb[i], tb[i], gu);
            gb[i] = gu;
        }
    };
    // d = the gradients of columns whose sums and targets are at s / t.
    auto grads = [&](const float* p, const float* s, const float* t, float* d, float gu,
                     float scale, int64_t len) FASTMLP_ALWAYS_INLINE_LAMBDA {
        for (int64_t i = 0; i < len; ++i) d[i] = loss_cce_probs_grad(p[i], s[i], t[i], gu, scale);
    };
    auto label_of = [&](int64_t r, bool& bad) FASTMLP_ALWAYS_INLINE_LAMBDA {
        return cce_row_label<LK>(labels, r, cols, bad);
    };
    auto yrow = [&](int64_t r) FASTMLP_ALWAYS_INLINE_LAMBDA {
        return cce_row_targets<LK>(labels, r, cols);
    };
    if (cols < kWideCols) {
        // Blocks of whole rows: per row its sum and targets, then flat loops.
        const int64_t nb = kPiece / cols;
        for (int64_t b0 = r0; b0 < r1; b0 += nb) {
            const int64_t n = std::min(nb, r1 - b0);
            const float* p = pred + b0 * cols;
            for (int64_t i = 0; i < n; ++i) {
                const int64_t r = b0 + i;
                const float s = sum_serial(p + i * cols, cols);
                bool bad;
                const int64_t label = label_of(r, bad);
                const float* y = yrow(r);
                for (int64_t c = 0; c < cols; ++c) {
                    sb[i * cols + c] = s;
                    tb[i * cols + c] = loss_target<LK>(y, label, c, kk);
                }
            }
            terms(p, n * cols);
            for (int64_t i = 0; i < n; ++i) {
                const int64_t r = b0 + i;
                bool bad;
                label_of(r, bad);
                const float loss = -sum_serial(lb + i * cols, cols);
                if constexpr (BACKWARD) {
                    const float gu = sum_serial(gb + i * cols, cols);
                    grads(p + i * cols, sb + i * cols, tb + i * cols, dpred + r * cols, gu,
                          loss_row_scale(sample_weight, r, rows), cols);
                }
                finish(r, loss, bad);
            }
        }
        return first_bad;
    }
    for (int64_t r = r0; r < r1; ++r) {
        const float* p = pred + r * cols;
        const float* y = yrow(r);
        bool bad;
        const int64_t label = label_of(r, bad);
        float* buf = lb;
        const float s = row_sum(cols, buf, [&](int64_t c0, int64_t len, float* v)
                                               FASTMLP_ALWAYS_INLINE_LAMBDA {
            for (int64_t c = 0; c < len; ++c) v[c] = p[c0 + c];
        });
        LaneSum lsum, gsum;
        for (int64_t c0 = 0; c0 < cols; c0 += kPiece) {
            const int64_t len = std::min(kPiece, cols - c0);
            for (int64_t c = 0; c < len; ++c) {
                sb[c] = s;
                tb[c] = loss_target<LK>(y, label, c0 + c, kk);
            }
            terms(p + c0, len);
            lsum.add(lb, len);
            gsum.add(gb, len);
        }
        const float loss = -lsum.total();
        if constexpr (BACKWARD) {
            const float gu = gsum.total();
            const float scale = loss_row_scale(sample_weight, r, rows);
            for (int64_t c0 = 0; c0 < cols; c0 += kPiece) {
                const int64_t len = std::min(kPiece, cols - c0);
                for (int64_t c = 0; c < len; ++c) {
                    sb[c] = s;
                    tb[c] = loss_target<LK>(y, label, c0 + c, kk);
                }
                grads(p + c0, sb, tb, dpred + r * cols + c0, gu, scale, len);
            }
        }
        finish(r, loss, bad);
    }
    return first_bad;
}

template <bool BACKWARD>
FASTMLP_ALWAYS_INLINE int64_t loss_rows_t(int kind, LabelKind lk, const float* pred,
                                          const void* labels, const float* sw, float* dpred,
                                          float* row_loss, int64_t r0, int64_t r1, int64_t rows,
                                          int64_t cols, const LossConsts& k) {
    const float* y = static_cast<const float*>(labels);
    switch (static_cast<LossKind>(kind)) {
        case LossKind::kMse:
            elementwise_rows<0, BACKWARD>(pred, y, sw, dpred, row_loss, r0, r1, rows, cols, k);
            return -1;
        case LossKind::kMae:
            elementwise_rows<1, BACKWARD>(pred, y, sw, dpred, row_loss, r0, r1, rows, cols, k);
            return -1;
        case LossKind::kHuber:
            elementwise_rows<2, BACKWARD>(pred, y, sw, dpred, row_loss, r0, r1, rows, cols, k);
            return -1;
        case LossKind::kBceLogits:
            elementwise_rows<3, BACKWARD>(pred, y, sw, dpred, row_loss, r0, r1, rows, cols, k);
            return -1;
        case LossKind::kBceProbs:
            elementwise_rows<4, BACKWARD>(pred, y, sw, dpred, row_loss, r0, r1, rows, cols, k);
            return -1;
        case LossKind::kCceLogits:
            if (lk == LabelKind::kInt32)
                return cce_logits_rows<LabelKind::kInt32, BACKWARD>(pred, labels, sw, dpred,
                                                                    row_loss, r0, r1, rows, cols, k);
            if (lk == LabelKind::kInt64)
                return cce_logits_rows<LabelKind::kInt64, BACKWARD>(pred, labels, sw, dpred,
                                                                    row_loss, r0, r1, rows, cols, k);
            return cce_logits_rows<LabelKind::kOneHot, BACKWARD>(pred, labels, sw, dpred,
                                                                 row_loss, r0, r1, rows, cols, k);
        case LossKind::kCceProbs:
            if (lk == LabelKind::kInt32)
                return cce_probs_rows<LabelKind::kInt32, BACKWARD>(pred, labels, sw, dpred,
                                                                   row_loss, r0, r1, rows, cols, k);
            if (lk == LabelKind::kInt64)
                return cce_probs_rows<LabelKind::kInt64, BACKWARD>(pred, labels, sw, dpred,
                                                                   row_loss, r0, r1, rows, cols, k);
            return cce_probs_rows<LabelKind::kOneHot, BACKWARD>(pred, labels, sw, dpred,
                                                                row_loss, r0, r1, rows, cols, k);
    }
    return -1;
}

// Rows r0 .. r1-1 of any (checked) kind; returns the first bad row, or -1.
// One clone per instruction set: everything above is inlined into it.
FASTMLP_SIMD_CLONES
int64_t loss_rows(int kind, LabelKind lk, const float* pred, const void* labels,
                  const float* sample_weight, float* dpred, float* row_loss, int64_t r0,
                  int64_t r1, int64_t rows, int64_t cols, const LossConsts& k) {
    if (dpred)
        return loss_rows_t<true>(kind, lk, pred, labels, sample_weight, dpred, row_loss, r0, r1,
                                 rows, cols, k);
    return loss_rows_t<false>(kind, lk, pred, labels, sample_weight, dpred, row_loss, r0, r1,
                              rows, cols, k);
}

}  // namespace

void loss_fused(const float* pred, const void* labels, LabelKind label_kind,
                const float* sample_weight, float* dpred, float* row_loss, float* loss,
                int64_t* bad_row, int64_t rows, int64_t cols, const LossSpec& spec) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_loss_args(pred, labels, label_kind, dpred, row_loss, loss, bad_row, rows, cols, spec);

    const LossConsts k = loss_consts(spec, cols);
    std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        const int64_t bad = loss_rows(spec.kind, label_kind, pred, labels, sample_weight, dpred,
                                      row_loss, r0, r1, rows, cols, k);
        if (bad >= 0) atomic_min(first_bad, bad);
    });
    // The batch mean in row order, in double (rows can be millions).
    double total = 0.0;
    for (int64_t r = 0; r < rows; ++r) total += row_loss[r];
    *loss = rows > 0 ? static_cast<float>(total / static_cast<double>(rows)) : 0.0f;
    const int64_t fb = first_bad.load();
    *bad_row = fb == std::numeric_limits<int64_t>::max() ? -1 : fb;
}

}  // namespace cpu
}  // namespace fastmlp
