// The math of loss_fused (issue 16), shared by the CPU and CUDA kernels: the
// per-element terms of the elementwise losses and the per-row loops of every
// kind, written once against a "Lanes" policy that says which columns this
// thread visits and how its partial sums become the row's:
//   CPU:  first = 0, step = 1, sum / max = identity (one thread, one row);
//   CUDA: first = lane, step = 32, sum / max = a warp butterfly (a warp, one row).
// The same expressions in the same order per column, so the CPU tests cover
// the rules the GPU runs (the row sums differ only in their association).
//
// Semantics (Keras / PyTorch, "sum over batch size"): per row a loss L_r,
// *loss = sum_r w_r L_r / rows, dpred = w_r / rows * dL_r/dpred.
//   Elementwise kinds, L_r = mean over c of l(p, y):
//     mse    (p - y)^2                        grad 2 (p - y)
//     mae    |p - y|                          grad sign(p - y), sign(0) = 0 (torch L1Loss)
//     huber  |d| <= delta ? d^2 / 2 : delta (|d| - delta / 2), d = p - y
//                                             grad |d| <= delta ? d : delta sign(d)
//     bce_logits (p = logits z; y' = y (1 - ls) + ls / 2, Keras' smoothing)
//            max(z, 0) - z y' + log1p(exp(-|z|))   grad sigmoid(z) - y'
//     bce_probs (Keras from_logits=False; q = clamp(p, 1e-7, 1 - 1e-7))
//            -(y' log q + (1 - y') log(1 - q))     grad (q - y') / (q (1 - q)), 0 where clamped
//   (each grad above is then divided by cols: the mean over the columns).
//   Cross-entropy kinds, target t = (1 - ls) y + ls / cols (y: the one-hot of
//   an integer label, or the float row):
//     cce_logits  L = -sum_c t_c log softmax(z)_c (logsumexp after the row max);
//                 grad softmax(z) * S - t with S = sum_c t_c, the exact derivative
//                 (torch CrossEntropyLoss): S = 1 for integer labels, so p - t.
//     cce_probs   (Keras categorical_crossentropy from_logits=False) s = sum_c p_c,
//                 u = p / s, q = clamp(u, 1e-7, 1 - 1e-7), L = -sum_c t_c log q_c;
//                 g_c = -t_c / q_c where u_c was inside the clamp range, else 0;
//                 dL/dp_j = (g_j - sum_c g_c u_c) / s.
// NaN and Inf propagate (a NaN counts as inside the clamp range, so its
// gradient is NaN too, never a silent 0).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "check.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {

// Keras' backend epsilon: the clamp of the probability losses.
constexpr float kLossProbLo = 1e-7f;
constexpr float kLossProbHi = 1.0f - 1e-7f;  // 0.99999988f, as Keras' float32(1 - 1e-7)

// The constants of one loss call, derived once by the launcher.
struct LossConsts {
    float delta;     // Huber
    float y_scale;   // label smoothing: y' = y * y_scale + y_add
    float y_add;     // BCE: ls / 2; cross-entropy: ls / cols; else 0
    float grad_div;  // elementwise kinds: cols (the mean over the columns); else 1
};

inline LossConsts loss_consts(const LossSpec& spec, int64_t cols) {
    const auto kind = static_cast<LossKind>(spec.kind);
    const bool bce = kind == LossKind::kBceLogits || kind == LossKind::kBceProbs;
    const bool cce = kind == LossKind::kCceLogits || kind == LossKind::kCceProbs;
    const float ls = (bce || cce) ? spec.label_smoothing : 0.0f;
    LossConsts k;
    k.delta = spec.delta;
    k.y_scale = 1.0f - ls;
    k.y_add = bce ? 0.5f * ls
                  : (cce && cols > 0 ? static_cast<float>(static_cast<double>(ls) / cols) : 0.0f);
    k.grad_div = cce ? 1.0f : static_cast<float>(cols);
    return k;
}

// The scale of row r's gradient: w_r / rows (the mean over the batch), as one
// float computed in double so that it rounds once; the elementwise kinds'
// 1 / cols is applied per element by grad_div (a true division).
FASTMLP_HOSTDEV float loss_row_scale(const float* sample_weight, int64_t r, int64_t rows) {
    const double w = sample_weight ? static_cast<double>(sample_weight[r]) : 1.0;
    return static_cast<float>(w / static_cast<double>(rows));
}

// sign with sign(0) = 0 and sign(NaN) = NaN (torch.sign).
FASTMLP_ACT_INLINE float loss_sign(float d) {
    return d > 0.0f ? 1.0f : (d < 0.0f ? -1.0f : (d == 0.0f ? 0.0f : d));
}

// The transcendentals of the losses: CUDA's expf / log1pf / logf on the
// device (unchanged numerics); on the host kernel_math.h's branch-free
// act_expf / act_log1pf / log_vec (<= 3 ulp, the accuracy class of the
// activation and softmax kernels), so the CPU loops over them vectorise.
// loss_logf's arguments are >= 1e-7 (a clamped probability) or a softmax sum
// >= 1, never the denormals log_vec reads as 0.
FASTMLP_ACT_INLINE float loss_expf(float x) { return act_expf(x); }
FASTMLP_ACT_INLINE float loss_log1pf(float x) { return act_log1pf(x); }
#if defined(__CUDA_ARCH__)
FASTMLP_HOSTDEV float loss_logf(float x) { return logf(x); }
#else
FASTMLP_ACT_INLINE float loss_logf(float x) { return log_vec(x); }
#endif

// One gradient entry of cce_logits from e = exp(z - max): scale (e / se S - t).
FASTMLP_ACT_INLINE float loss_cce_logits_grad(float e, float se, float S, float t, float scale) {
    return scale * (e / se * S - t);
}

// Whether a probability was inside the clamp range (NaN counts as inside).
FASTMLP_ACT_INLINE bool loss_unclamped(float u) { return !(u < kLossProbLo || u > kLossProbHi); }
FASTMLP_ACT_INLINE float loss_clamp(float u) {
    return u < kLossProbLo ? kLossProbLo : (u > kLossProbHi ? kLossProbHi : u);
}

// One element of an elementwise kind: returns l(p, y), sets g = dl/dp
// (before the division by cols).
template <int KIND>
FASTMLP_ACT_INLINE float loss_elem(float p, float y, const LossConsts& k, float& g) {
    if constexpr (KIND == static_cast<int>(LossKind::kMse)) {
        const float d = p - y;
        g = 2.0f * d;
        return d * d;
    } else if constexpr (KIND == static_cast<int>(LossKind::kMae)) {
        const float d = p - y;
        g = loss_sign(d);
        return fabsf(d);
    } else if constexpr (KIND == static_cast<int>(LossKind::kHuber)) {
        const float d = p - y;
        const float ad = fabsf(d);
        // Selects, not a branch: the CPU loops over it vectorise (a data-dependent
        // branch mispredicts on every other element). NaN takes the outer side:
        // NaN loss, NaN grad.
        const bool inner = ad <= k.delta;
        g = inner ? d : k.delta * loss_sign(d);
        return inner ? 0.5f * d * d : k.delta * (ad - 0.5f * k.delta);
    } else if constexpr (KIND == static_cast<int>(LossKind::kBceLogits)) {
        const float t = y * k.y_scale + k.y_add;
        // sigmoid(z) - t from s = sigmoid(-|z|) = e / (1 + e), e = exp(-|z|) <= 1:
        // for z >= 0 it is (1 - t) - s, so a confident logit with t = 1 keeps its
        // tiny gradient exactly (1 / (1 + e) - 1 would round it to a few ulp of 1).
        const float e = loss_expf(-fabsf(p));
        const float s = e / (1.0f + e);
        g = p >= 0.0f ? (1.0f - t) - s : s - t;  // NaN: e and s are NaN
        // max(z, 0) written so that a NaN z stays NaN.
        const float relu_z = p < 0.0f ? 0.0f : p;
        return relu_z - p * t + loss_log1pf(e);
    } else {
        static_assert(KIND == static_cast<int>(LossKind::kBceProbs), "an elementwise kind");
        const float t = y * k.y_scale + k.y_add;
        const float q = loss_clamp(p);
        const float one_q = 1.0f - q;
        g = loss_unclamped(p) ? (q - t) / (q * one_q) : 0.0f;
        return -(t * loss_logf(q) + (1.0f - t) * loss_logf(one_q));
    }
}

// The kind's name for error messages (the names of fastmlp.ops.LOSS_KINDS).
inline const char* loss_kind_name(int kind) {
    switch (static_cast<LossKind>(kind)) {
        case LossKind::kMse: return "mse";
        case LossKind::kMae: return "mae";
        case LossKind::kHuber: return "huber";
        case LossKind::kBceLogits: return "bce_logits";
        case LossKind::kBceProbs: return "bce_probs";
        case LossKind::kCceLogits: return "cce_logits";
        case LossKind::kCceProbs: return "cce_probs";
    }
    return "unknown";
}

constexpr bool loss_is_cce(int kind) {
    return kind == static_cast<int>(LossKind::kCceLogits) ||
           kind == static_cast<int>(LossKind::kCceProbs);
}

// Row r's integer label, or -1 when it lies outside [0, cols) (int64 labels
// may not fit an int: compared before any narrowing, never used unchecked).
template <LabelKind LK>
FASTMLP_HOSTDEV int64_t loss_label(const void* labels, int64_t r, int64_t cols) {
    int64_t y;
    if constexpr (LK == LabelKind::kInt32) y = static_cast<const int32_t*>(labels)[r];
    else y = static_cast<const int64_t*>(labels)[r];
    return (y >= 0 && y < cols) ? y : -1;
}

// The target t_c of a cross-entropy row: from the float row y, or the one-hot
// of `label` (-1: no class, only the smoothing's share).
template <LabelKind LK>
FASTMLP_ACT_INLINE float loss_target(const float* y, int64_t label, int64_t c, const LossConsts& k) {
    if constexpr (LK == LabelKind::kOneHot) return y[c] * k.y_scale + k.y_add;
    else return (c == label ? k.y_scale : 0.0f) + k.y_add;
}

// One column of cce_probs (p: the entry, s: the row sum, t: the target):
// returns t log q, sets gu = g u, the column's term of sum_c g_c u_c (0 where
// u was clamped: adding +0 leaves the sum unchanged).
FASTMLP_ACT_INLINE float loss_cce_probs_terms(float p, float s, float t, float& gu) {
    const float u = p / s;
    const float q = loss_clamp(u);
    gu = loss_unclamped(u) ? (-t / q) * u : 0.0f;
    return t * loss_logf(q);
}

// One gradient entry of cce_probs: scale (g - sum_c g_c u_c) / s.
FASTMLP_ACT_INLINE float loss_cce_probs_grad(float p, float s, float t, float gu, float scale) {
    const float u = p / s;
    const float q = loss_clamp(u);
    const float g = loss_unclamped(u) ? -t / q : 0.0f;
    return scale * ((g - gu) / s);
}

// The loss L_r of row r (NaN for a bad integer label: then *bad = true) and,
// with BACKWARD, its gradient d[c] = scale * dL_r/dp_c for the columns this
// thread visits. Every thread of a row gets the same L_r. p: the row's
// predictions; y: the float label row (kOneHot) or null; label_src: the
// integer labels (the other label kinds).
template <int KIND, LabelKind LK, bool BACKWARD, class Lanes>
FASTMLP_HOSTDEV float loss_row(const float* p, const float* y, const void* label_src, int64_t r,
                               int64_t cols, const LossConsts& k, float scale, float* d,
                               bool& bad, const Lanes& lanes) {
    const int64_t c0 = lanes.first(), step = lanes.step();
    if constexpr (!loss_is_cce(KIND)) {
        static_assert(LK == LabelKind::kOneHot, "elementwise losses take float label rows");
        (void)label_src;
        (void)r;
        bad = false;
        float sum = 0.0f;
        for (int64_t c = c0; c < cols; c += step) {
            float g;
            sum += loss_elem<KIND>(p[c], y[c], k, g);
            if constexpr (BACKWARD) d[c] = scale * (g / k.grad_div);
        }
        return lanes.sum(sum) / static_cast<float>(cols);
    } else {
        int64_t label = -1;
        if constexpr (LK != LabelKind::kOneHot) {
            label = loss_label<LK>(label_src, r, cols);
            bad = label < 0;
        } else {
            bad = false;
        }
        float loss;
        if constexpr (KIND == static_cast<int>(LossKind::kCceLogits)) {
            // max_nan: a NaN logit makes the whole row NaN, as torch.
            float m = -INFINITY;
            for (int64_t c = c0; c < cols; c += step) m = max_nan(m, p[c]);
            m = lanes.max(m);
            // exp(z - max) <= 1: no overflow for logits of +-1000.
            float se = 0.0f, tsum = 0.0f;
            for (int64_t c = c0; c < cols; c += step) {
                se += loss_expf(p[c] - m);
                if constexpr (BACKWARD && LK == LabelKind::kOneHot)
                    tsum += loss_target<LK>(y, label, c, k);
            }
            se = lanes.sum(se);
            // S = sum_c t_c: exactly 1 for an integer label ((1 - ls) + cols * ls / cols),
            // summed for float rows (which need not sum to 1).
            // (Only the gradient needs it.)
            const float S = (BACKWARD && LK == LabelKind::kOneHot) ? lanes.sum(tsum) : 1.0f;
            const float lse = loss_logf(se);
            float dot = 0.0f;
            for (int64_t c = c0; c < cols; c += step) {
                const float zc = p[c];
                const float t = loss_target<LK>(y, label, c, k);
                dot += t * log_softmax_entry(zc, m, lse);
                if constexpr (BACKWARD)
                    d[c] = loss_cce_logits_grad(loss_expf(zc - m), se, S, t, scale);
            }
            loss = -lanes.sum(dot);
        } else {
            float s = 0.0f;
            for (int64_t c = c0; c < cols; c += step) s += p[c];
            s = lanes.sum(s);
            float lsum = 0.0f, gu = 0.0f;
            for (int64_t c = c0; c < cols; c += step) {
                float guc;
                lsum += loss_cce_probs_terms(p[c], s, loss_target<LK>(y, label, c, k), guc);
                gu += guc;
            }
            loss = -lanes.sum(lsum);
            if constexpr (BACKWARD) {
                gu = lanes.sum(gu);
                for (int64_t c = c0; c < cols; c += step)
                    d[c] = loss_cce_probs_grad(p[c], s, loss_target<LK>(y, label, c, k), gu, scale);
            }
        }
        return bad ? NAN : loss;
    }
}

// with_loss(kind, label_kind, f): f(integral_constant<int, KIND>, integral_constant<LabelKind,
// LK>) for the compiled (kind, label kind) pairs; the launchers check the pair first.
template <LabelKind LK>
using LabelTag = std::integral_constant<LabelKind, LK>;
template <int K>
using LossTag = std::integral_constant<int, K>;

template <class F>
inline void with_loss(int kind, LabelKind lk, F&& f) {
    switch (static_cast<LossKind>(kind)) {
        case LossKind::kMse: return f(LossTag<0>{}, LabelTag<LabelKind::kOneHot>{});
        case LossKind::kMae: return f(LossTag<1>{}, LabelTag<LabelKind::kOneHot>{});
        case LossKind::kHuber: return f(LossTag<2>{}, LabelTag<LabelKind::kOneHot>{});
        case LossKind::kBceLogits: return f(LossTag<3>{}, LabelTag<LabelKind::kOneHot>{});
        case LossKind::kBceProbs: return f(LossTag<4>{}, LabelTag<LabelKind::kOneHot>{});
        case LossKind::kCceLogits:
        case LossKind::kCceProbs: {
            auto g = [&](auto kt) {
                switch (lk) {
                    case LabelKind::kInt32: return f(kt, LabelTag<LabelKind::kInt32>{});
                    case LabelKind::kInt64: return f(kt, LabelTag<LabelKind::kInt64>{});
                    default: return f(kt, LabelTag<LabelKind::kOneHot>{});
                }
            };
            if (static_cast<LossKind>(kind) == LossKind::kCceLogits) return g(LossTag<5>{});
            return g(LossTag<6>{});
        }
    }
}

// The argument checks of loss_fused, one for both devices (host code).
inline void check_loss_args(const float* pred, const void* labels, LabelKind label_kind,
                            const float* dpred, const float* row_loss, const float* loss,
                            const int64_t* bad_row, int64_t rows, int64_t cols,
                            const LossSpec& spec) {
    const char* op = "loss_fused";
    FASTMLP_CHECK(spec.kind >= 0 && spec.kind <= static_cast<int>(LossKind::kCceProbs),
                  op << ": unknown loss kind " << spec.kind);
    FASTMLP_CHECK(label_kind == LabelKind::kInt32 || label_kind == LabelKind::kInt64 ||
                      label_kind == LabelKind::kOneHot,
                  op << ": unknown label kind " << static_cast<int>(label_kind));
    FASTMLP_CHECK(loss_is_cce(spec.kind) || label_kind == LabelKind::kOneHot,
                  op << ": loss " << loss_kind_name(spec.kind)
                     << " needs float label rows, got integer labels");
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be >= 0, got rows=" << rows << " cols=" << cols);
    FASTMLP_CHECK(rows == 0 || cols > 0, op << ": need at least one column, got cols=0");
    FASTMLP_CHECK(cols == 0 || rows <= std::numeric_limits<int64_t>::max() / cols,
                  op << ": rows*cols overflows int64 (rows=" << rows << ", cols=" << cols << ")");
    FASTMLP_CHECK(spec.kind != static_cast<int>(LossKind::kHuber) || spec.delta > 0.0f,
                  op << ": huber needs delta > 0, got " << spec.delta);
    FASTMLP_CHECK(spec.label_smoothing >= 0.0f && spec.label_smoothing < 1.0f,
                  op << ": label_smoothing must be in [0, 1), got " << spec.label_smoothing);
    FASTMLP_CHECK(loss && bad_row, op << ": null loss or bad_row");
    if (rows > 0) {
        FASTMLP_CHECK(pred && labels && row_loss, op << ": null pred, labels or row_loss");
        // rows * cols fits int64: checked above.
        const uint64_t n = static_cast<uint64_t>(rows * cols);
        FASTMLP_CHECK(!floats_overlap(dpred, n, pred, n), op << ": dpred must not overlap pred");
    }
}

}  // namespace fastmlp
