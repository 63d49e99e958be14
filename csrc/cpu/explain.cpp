// CPU kernels of the interpretability methods (issue 18): the gradient seed of
// the explained output (target_seed), integrated gradients' path points
// (ig_interpolate) and their quadrature, which also gives saliency and
// gradient x input (ig_accumulate). fastmlp.h states the contracts; the scalar
// rules are kernel_math.h's (sigmoid_seed, softmax_seed, ig_point,
// ig_attribution, ig_first), shared with the GPU. Compiled with
// -ffp-contract=off (CMakeLists.txt): b + alpha (x - b) and the quadrature's
// s + w g round each operation, as the GPU's __fmul_rn keeps them.
#include <cmath>
#include <limits>

#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "explain_check.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

// One row of target_seed (cols >= 1).
void target_seed_row(const float* z, int32_t t, float* o, int64_t cols, OutputTransform tr) {
    for (int64_t c = 0; c < cols; ++c) o[c] = 0.0f;
    if (t < 0 || t >= cols) return;  // a bad target: zeros, nothing read
    if (tr == OutputTransform::kNone) {
        o[t] = 1.0f;
    } else if (tr == OutputTransform::kSigmoid) {
        o[t] = sigmoid_seed(z[t]);
    } else {
        // The max-subtracted softmax, summed in column order (softmax_xent's rule);
        // o holds exp(z - max) between the passes.
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < cols; ++c) mx = max_nan(mx, z[c]);
        float sum = 0.0f;
        for (int64_t c = 0; c < cols; ++c) {
            o[c] = act_expf(z[c] - mx);
            sum += o[c];
        }
        const float p_t = o[t] / sum;
        for (int64_t c = 0; c < cols; ++c) o[c] = softmax_seed(p_t, o[c] / sum, c == t);
    }
}

}  // namespace

void target_seed(const float* logits, const int32_t* targets, float* out, int64_t rows,
                 int64_t cols, int32_t transform) {
    check_target_seed_args(logits, targets, out, rows, cols, transform);  // explain_check.h
    if (rows == 0 || cols == 0) return;
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    const auto tr = static_cast<OutputTransform>(transform);
    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r)
            target_seed_row(logits + r * cols, targets[r], out + r * cols, cols, tr);
    });
}

void ig_interpolate(const float* x, const float* baseline, const float* alphas,
                    const int32_t* targets, float* out, int32_t* targets_out, int64_t images,
                    int64_t cols, int64_t steps, const int64_t* step, int64_t batch,
                    int64_t rows) {
    check_ig_interpolate_args(x, baseline, alphas, targets, out, targets_out, images, cols,
                              steps, step, batch, rows);
    if (rows == 0) return;
    FlushDenormalScope fp_scope;
    const int64_t total = images * steps;
    const int64_t v0 = ig_first(*step, batch, total);
    // Rows r < n are inside [0, total); the rest are skipped.
    const int64_t n = total - v0 < rows ? total - v0 : rows;
    parallel_range(n, n * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const int64_t v = v0 + r, i = v / steps;
            const float alpha = alphas[v % steps];
            if (targets) targets_out[r] = targets[i];
            const float* xi = x + i * cols;
            const float* bi = baseline ? baseline + i * cols : nullptr;
            float* o = out + r * cols;
            for (int64_t c = 0; c < cols; ++c) o[c] = ig_point(xi[c], bi, c, alpha);
        }
    });
}

void ig_accumulate(const float* grads, const float* x, const float* baseline,
                   const float* weights, float* out, int64_t images, int64_t cols,
                   int64_t steps, const int64_t* step, int64_t batch, int64_t rows,
                   bool multiply, bool absolute) {
    check_ig_accumulate_args(grads, x, baseline, weights, out, images, cols, steps, step, batch,
                             rows, multiply);
    if (rows == 0 || cols == 0) return;
    FlushDenormalScope fp_scope;
    const int64_t i0 = ig_first(*step, batch / steps, images);
    const int64_t per_call = rows / steps;
    const int64_t n = images - i0 < per_call ? images - i0 : per_call;
    parallel_range(n, n * steps * cols >= kParMin, [&](int64_t k0, int64_t k1) {
        for (int64_t k = k0; k < k1; ++k) {
            const int64_t i = i0 + k;
            const float* g = grads + k * steps * cols;
            float* o = out + i * cols;
            // The image's columns side by side, the path points m in order: each
            // column's sum is s = ((0 + w0 g0) + w1 g1) + ..., as on the GPU.
            for (int64_t c = 0; c < cols; ++c) o[c] = 0.0f;
            for (int64_t m = 0; m < steps; ++m) {
                const float w = weights[m];
                const float* gm = g + m * cols;
                for (int64_t c = 0; c < cols; ++c) o[c] = o[c] + mul_rn(w, gm[c]);
            }
            const float* xi = multiply ? x + i * cols : nullptr;
            const float* bi = baseline ? baseline + i * cols : nullptr;
            for (int64_t c = 0; c < cols; ++c)
                o[c] = ig_attribution(o[c], xi ? xi[c] : 0.0f, bi, c, multiply, absolute);
        }
    });
}

}  // namespace cpu
}  // namespace fastmlp
