// The pybind11 module fastmlp._C: a thin layer over the op API in fastmlp.h.
//
// Arrays arrive as raw addresses (uintptr_t) with their sizes; the Python
// layer (fastmlp/_interop.py) has already validated dtype, shape, contiguity
// and device, so this file only converts and forwards. Plain C++: pybind11
// never goes through nvcc. The GIL is released around every kernel call.
#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "engine.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace py = pybind11;
using fastmlp::LabelKind;
using std::int64_t;
using std::uintptr_t;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

#ifndef FASTMLP_BUILD_INFO
#define FASTMLP_BUILD_INFO "unknown"
#endif
#ifndef FASTMLP_CUDA_WHY
#define FASTMLP_CUDA_WHY "unknown"
#endif

// [issue 15] A dropout as Python passes it: (threshold, scale, key0, key1,
// address of the int64 step) -- threshold 0 means none (kernel_math.h DropoutSpec).
using DropoutTuple = std::tuple<uint32_t, float, uint32_t, uint32_t, uintptr_t>;

fastmlp::DropoutSpec dropout_spec(const DropoutTuple& t) {
    fastmlp::DropoutSpec d;
    d.threshold = std::get<0>(t);
    d.scale = std::get<1>(t);
    d.key0 = std::get<2>(t);
    d.key1 = std::get<3>(t);
    d.step = ptr<const int64_t>(std::get<4>(t));
    return d;
}

// The optimizers' gradient transform as Python passes it: (l1, l2, address of the
// clip scale, clipvalue, address of the penalty, address of the work, address of
// the noise std, noise key0, noise key1, address of the int64 noise step, noise
// offset) -- 0 / 0.0 for what is not used (kernel_math.h GradTransform, NoiseSpec).
using TransformTuple = std::tuple<float, float, uintptr_t, float, uintptr_t, uintptr_t,
                                  uintptr_t, uint32_t, uint32_t, uintptr_t, int64_t>;

fastmlp::GradTransform grad_transform(const TransformTuple& tr) {
    fastmlp::GradTransform t;
    t.l1 = std::get<0>(tr);
    t.l2 = std::get<1>(tr);
    t.scale = ptr<const float>(std::get<2>(tr));
    t.clipvalue = std::get<3>(tr);
    t.penalty = ptr<double>(std::get<4>(tr));
    t.work = ptr<double>(std::get<5>(tr));
    t.noise.std = ptr<const float>(std::get<6>(tr));
    t.noise.key0 = std::get<7>(tr);
    t.noise.key1 = std::get<8>(tr);
    t.noise.step = ptr<const int64_t>(std::get<9>(tr));
    t.noise.offset = std::get<10>(tr);
    return t;
}

// Binds the ops of namespace NS into module M. EXTRA_PARAM / EXTRA_ARG add the
// stream argument on CUDA and are empty on the CPU.
#define FASTMLP_BIND_OPS(M, NS, EXTRA_PARAM, EXTRA_ARG)                         \
    M.def("gemm", [](bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,         \
                     uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, float beta,          \
                     uintptr_t c, int64_t ldc EXTRA_PARAM) {                                  \
        NS::gemm(ta, tb, m, n, k, alpha, ptr<const float>(a), lda, ptr<const float>(b), ldb, \
                 beta, ptr<float>(c), ldc EXTRA_ARG);                                        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("gemm_ex", [](bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,      \
                        uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, float beta,       \
                        uintptr_t c, int64_t ldc, uintptr_t bias, bool relu,                  \
                        uintptr_t relu_mask, int64_t ld_mask, uintptr_t colsum_b,             \
                        int precision, uintptr_t workspace,                                   \
                        int64_t workspace_floats EXTRA_PARAM) {                               \
        fastmlp::GemmEpilogue ep;                                                             \
        ep.bias = ptr<const float>(bias);                                                     \
        ep.relu = relu;                                                                       \
        ep.relu_mask = ptr<const float>(relu_mask);                                           \
        ep.ld_mask = ld_mask;                                                                 \
        ep.colsum_b = ptr<float>(colsum_b);                                                   \
        /* [issue 6] split-K scratch of the CUDA kernel family; the CPU ignores it */         \
        ep.workspace = ptr<float>(workspace);                                                 \
        ep.workspace_floats = workspace_floats;                                               \
        NS::gemm_ex(ta, tb, m, n, k, alpha, ptr<const float>(a), lda, ptr<const float>(b),   \
                    ldb, beta, ptr<float>(c), ldc, ep,                                        \
                    static_cast<fastmlp::Precision>(precision) EXTRA_ARG);                    \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    /* [issue 17] gemm_ex with row_scale_k (DP-SGD's per-example clip factors, k  */     \
    /* floats scaling op(B)'s rows, fastmlp.h) and colsum_b: the Dense dW call.     */     \
    M.def("gemm_ex_row_scaled", [](bool ta, bool tb, int64_t m, int64_t n, int64_t k,         \
                                   float alpha, uintptr_t a, int64_t lda, uintptr_t b,        \
                                   int64_t ldb, float beta, uintptr_t c, int64_t ldc,         \
                                   uintptr_t colsum_b, uintptr_t row_scale_k,                 \
                                   int precision EXTRA_PARAM) {                               \
        fastmlp::GemmEpilogue ep;                                                             \
        ep.colsum_b = ptr<float>(colsum_b);                                                   \
        ep.row_scale_k = ptr<const float>(row_scale_k);                                       \
        NS::gemm_ex(ta, tb, m, n, k, alpha, ptr<const float>(a), lda, ptr<const float>(b),   \
                    ldb, beta, ptr<float>(c), ldc, ep,                                        \
                    static_cast<fastmlp::Precision>(precision) EXTRA_ARG);                    \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    /* [issue 15] gemm_ex with the activation epilogue: the same arguments, then  */      \
    /* act, preact, ld_preact, dropout, grad_act, saved, ld_saved, saved_is_input, */      \
    /* grad_dropout (a dropout is (threshold, scale, key0, key1, step address)).  */      \
    M.def("gemm_ex", [](bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,      \
                        uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, float beta,       \
                        uintptr_t c, int64_t ldc, uintptr_t bias, bool relu,                  \
                        uintptr_t relu_mask, int64_t ld_mask, uintptr_t colsum_b,             \
                        int precision, uintptr_t workspace, int64_t workspace_floats,         \
                        int act, uintptr_t preact, int64_t ld_preact, DropoutTuple dropout,   \
                        int grad_act, uintptr_t saved, int64_t ld_saved, bool saved_is_input, \
                        DropoutTuple grad_dropout EXTRA_PARAM) {                              \
        fastmlp::GemmEpilogue ep;                                                             \
        ep.bias = ptr<const float>(bias);                                                     \
        ep.relu = relu;                                                                       \
        ep.relu_mask = ptr<const float>(relu_mask);                                           \
        ep.ld_mask = ld_mask;                                                                 \
        ep.colsum_b = ptr<float>(colsum_b);                                                   \
        ep.workspace = ptr<float>(workspace);                                                 \
        ep.workspace_floats = workspace_floats;                                               \
        ep.act = act;                                                                         \
        ep.preact = ptr<float>(preact);                                                       \
        ep.ld_preact = ld_preact;                                                             \
        ep.dropout = dropout_spec(dropout);                                                   \
        ep.grad_act = grad_act;                                                               \
        ep.saved = ptr<const float>(saved);                                                   \
        ep.ld_saved = ld_saved;                                                               \
        ep.saved_is_input = saved_is_input;                                                   \
        ep.grad_dropout = dropout_spec(grad_dropout);                                         \
        NS::gemm_ex(ta, tb, m, n, k, alpha, ptr<const float>(a), lda, ptr<const float>(b),   \
                    ldb, beta, ptr<float>(c), ldc, ep,                                        \
                    static_cast<fastmlp::Precision>(precision) EXTRA_ARG);                    \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("bias_add", [](uintptr_t x, uintptr_t bias, uintptr_t y, int64_t rows,            \
                         int64_t cols EXTRA_PARAM) {                                         \
        NS::bias_add(ptr<const float>(x), ptr<const float>(bias), ptr<float>(y), rows,       \
                     cols EXTRA_ARG);                                                        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("bias_grad", [](uintptr_t dy, uintptr_t db, int64_t rows, int64_t cols EXTRA_PARAM) { \
        NS::bias_grad(ptr<const float>(dy), ptr<float>(db), rows, cols EXTRA_ARG);           \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("relu", [](uintptr_t x, uintptr_t y, int64_t size EXTRA_PARAM) {                   \
        NS::relu(ptr<const float>(x), ptr<float>(y), size EXTRA_ARG);                        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("relu_backward", [](uintptr_t dy, uintptr_t y, uintptr_t dx, int64_t size EXTRA_PARAM) { \
        NS::relu_backward(ptr<const float>(dy), ptr<const float>(y), ptr<float>(dx),         \
                          size EXTRA_ARG);                                                   \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("activation_fwd", [](uintptr_t x, uintptr_t y, int64_t rows, int64_t cols, int act, \
                               DropoutTuple dropout EXTRA_PARAM) {                           \
        NS::activation_fwd(ptr<const float>(x), ptr<float>(y), rows, cols, act,              \
                           dropout_spec(dropout) EXTRA_ARG);                                  \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("activation_bwd", [](uintptr_t dy, uintptr_t saved, uintptr_t dx, int64_t rows,    \
                               int64_t cols, int act, bool saved_is_input,                   \
                               DropoutTuple dropout EXTRA_PARAM) {                           \
        NS::activation_bwd(ptr<const float>(dy), ptr<const float>(saved), ptr<float>(dx),    \
                           rows, cols, act, saved_is_input, dropout_spec(dropout) EXTRA_ARG); \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("first_nonfinite", [](uintptr_t x, int64_t size, uintptr_t out EXTRA_PARAM) {      \
        NS::first_nonfinite(ptr<const float>(x), size, ptr<int64_t>(out) EXTRA_ARG);         \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("softmax_xent_fwd", [](uintptr_t logits, uintptr_t labels, int kind, uintptr_t probs, \
                                 uintptr_t row_loss, uintptr_t loss, uintptr_t bad_row,      \
                                 int64_t rows, int64_t cols EXTRA_PARAM) {                   \
        NS::softmax_xent_fwd(ptr<const float>(logits), ptr<const void>(labels),              \
                             static_cast<LabelKind>(kind), ptr<float>(probs),                \
                             ptr<float>(row_loss), ptr<float>(loss), ptr<int64_t>(bad_row),  \
                             rows, cols EXTRA_ARG);                                          \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("softmax_xent_bwd", [](uintptr_t probs, uintptr_t labels, int kind, uintptr_t dlogits, \
                                 uintptr_t bad_row, int64_t rows, int64_t cols EXTRA_PARAM) { \
        NS::softmax_xent_bwd(ptr<const float>(probs), ptr<const void>(labels),               \
                             static_cast<LabelKind>(kind), ptr<float>(dlogits),              \
                             ptr<int64_t>(bad_row), rows, cols EXTRA_ARG);                   \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("softmax_xent_fused", [](uintptr_t logits, uintptr_t labels, int kind, uintptr_t out, \
                                   uintptr_t row_loss, uintptr_t row_hits, uintptr_t loss,   \
                                   uintptr_t hits, uintptr_t bad_row, int64_t rows,          \
                                   int64_t cols, bool backward EXTRA_PARAM) {                \
        NS::softmax_xent_fused(ptr<const float>(logits), ptr<const void>(labels),            \
                               static_cast<LabelKind>(kind), ptr<float>(out),                \
                               ptr<float>(row_loss), ptr<int32_t>(row_hits), ptr<float>(loss), \
                               ptr<int64_t>(hits), ptr<int64_t>(bad_row), rows, cols,        \
                               backward EXTRA_ARG);                                          \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    /* [issue 15] batch / layer normalisation; gamma, beta, save_*, dgamma, dbeta: 0 = null */ \
    M.def("batchnorm_fwd", [](uintptr_t x, uintptr_t gamma, uintptr_t beta, uintptr_t y,       \
                              uintptr_t save_mean, uintptr_t save_invstd, uintptr_t moving_mean, \
                              uintptr_t moving_var, int64_t rows, int64_t cols, float eps,      \
                              float momentum, bool training EXTRA_PARAM) {                      \
        NS::batchnorm_fwd(ptr<const float>(x), ptr<const float>(gamma), ptr<const float>(beta), \
                          ptr<float>(y), ptr<float>(save_mean), ptr<float>(save_invstd),       \
                          ptr<float>(moving_mean), ptr<float>(moving_var), rows, cols, eps,    \
                          momentum, training EXTRA_ARG);                                       \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("batchnorm_bwd", [](uintptr_t dy, uintptr_t x, uintptr_t gamma, uintptr_t save_mean, \
                              uintptr_t save_invstd, uintptr_t dx, uintptr_t dgamma,           \
                              uintptr_t dbeta, int64_t rows, int64_t cols EXTRA_PARAM) {       \
        NS::batchnorm_bwd(ptr<const float>(dy), ptr<const float>(x), ptr<const float>(gamma),  \
                          ptr<const float>(save_mean), ptr<const float>(save_invstd),          \
                          ptr<float>(dx), ptr<float>(dgamma), ptr<float>(dbeta), rows,         \
                          cols EXTRA_ARG);                                                     \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("layernorm_fwd", [](uintptr_t x, uintptr_t gamma, uintptr_t beta, uintptr_t y,       \
                              uintptr_t save_mean, uintptr_t save_invstd, int64_t rows,        \
                              int64_t cols, float eps EXTRA_PARAM) {                           \
        NS::layernorm_fwd(ptr<const float>(x), ptr<const float>(gamma), ptr<const float>(beta), \
                          ptr<float>(y), ptr<float>(save_mean), ptr<float>(save_invstd), rows, \
                          cols, eps EXTRA_ARG);                                                \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("layernorm_bwd", [](uintptr_t dy, uintptr_t x, uintptr_t gamma, uintptr_t save_mean, \
                              uintptr_t save_invstd, uintptr_t dx, uintptr_t dgamma,           \
                              uintptr_t dbeta, int64_t rows, int64_t cols EXTRA_PARAM) {       \
        NS::layernorm_bwd(ptr<const float>(dy), ptr<const float>(x), ptr<const float>(gamma),  \
                          ptr<const float>(save_mean), ptr<const float>(save_invstd),          \
                          ptr<float>(dx), ptr<float>(dgamma), ptr<float>(dbeta), rows,         \
                          cols EXTRA_ARG);                                                     \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("random_permutation", [](uintptr_t out, int64_t n, uint64_t seed,                  \
                                   uint64_t counter EXTRA_PARAM) {                           \
        NS::random_permutation(ptr<int64_t>(out), n, seed, counter EXTRA_ARG);               \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("gaussian_noise", [](uintptr_t out, int64_t size, uint64_t seed, uint64_t step,   \
                               int64_t offset EXTRA_PARAM) {                                 \
        NS::gaussian_noise(ptr<float>(out), size, seed, step, offset EXTRA_ARG);              \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("sgd_step", [](uintptr_t param, uintptr_t grad, uintptr_t buf, int64_t size,      \
                         float lr, float momentum, bool nesterov, float weight_decay,       \
                         const TransformTuple& tr EXTRA_PARAM) {                            \
        NS::sgd_step(ptr<float>(param), ptr<const float>(grad), ptr<float>(buf), size, lr,   \
                     momentum, nesterov, weight_decay, grad_transform(tr) EXTRA_ARG);        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("adam_step", [](uintptr_t param, uintptr_t grad, uintptr_t m, uintptr_t v,        \
                          int64_t size, double lr, double beta1, double beta2, double eps,  \
                          double weight_decay, bool decoupled, int64_t step,                \
                          const TransformTuple& tr EXTRA_PARAM) {                           \
        NS::adam_step(ptr<float>(param), ptr<const float>(grad), ptr<float>(m), ptr<float>(v), \
                      size, lr, beta1, beta2, eps, weight_decay, decoupled, step,             \
                      grad_transform(tr) EXTRA_ARG);                                          \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("rmsprop_step", [](uintptr_t param, uintptr_t grad, uintptr_t sq, uintptr_t buf,  \
                             uintptr_t gavg, int64_t size, double lr, double alpha,         \
                             double eps, double weight_decay, double momentum,              \
                             bool centered, const TransformTuple& tr EXTRA_PARAM) {         \
        NS::rmsprop_step(ptr<float>(param), ptr<const float>(grad), ptr<float>(sq),          \
                         ptr<float>(buf), ptr<float>(gavg), size, lr, alpha, eps,            \
                         weight_decay, momentum, centered, grad_transform(tr) EXTRA_ARG);    \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("grad_clip_scale", [](uintptr_t params, uintptr_t grads, uintptr_t offsets,       \
                                uintptr_t l1l2, int64_t nseg, int mode, float max_norm,     \
                                uintptr_t scale, uintptr_t work EXTRA_PARAM) {              \
        NS::grad_clip_scale(ptr<const float>(params), ptr<const float>(grads),               \
                            ptr<const int64_t>(offsets), ptr<const float>(l1l2), nseg, mode, \
                            max_norm, ptr<float>(scale), ptr<double>(work) EXTRA_ARG);       \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("optimizer_work_doubles", &NS::optimizer_work_doubles);                            \
    M.def("grad_clip_work_doubles", &NS::grad_clip_work_doubles);                            \
    /* [issue 16] the fused metrics; probs_out: 0 = null; spec = flags, transform, k, threshold */ \
    M.def("metrics_fused", [](uintptr_t pred, uintptr_t labels, int kind, uintptr_t probs_out, \
                              uintptr_t row_scratch, uintptr_t sums, int64_t rows, int64_t cols, \
                              int32_t flags, int32_t transform, int32_t k,                     \
                              float threshold EXTRA_PARAM) {                                   \
        fastmlp::MetricSpec spec;                                                              \
        spec.flags = flags;                                                                    \
        spec.transform = transform;                                                            \
        spec.k = k;                                                                            \
        spec.threshold = threshold;                                                            \
        NS::metrics_fused(ptr<const float>(pred), ptr<const void>(labels),                    \
                          static_cast<LabelKind>(kind), ptr<float>(probs_out),                \
                          ptr<float>(row_scratch), ptr<double>(sums), rows, cols,             \
                          spec EXTRA_ARG);                                                     \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    /* [issue 16] the fused losses; sample_weight, dpred: 0 = null */                        \
    M.def("loss_fused", [](uintptr_t pred, uintptr_t labels, int label_kind,                 \
                           uintptr_t sample_weight, uintptr_t dpred, uintptr_t row_loss,     \
                           uintptr_t loss, uintptr_t bad_row, int64_t rows, int64_t cols,    \
                           int kind, float delta, float label_smoothing EXTRA_PARAM) {       \
        fastmlp::LossSpec spec;                                                               \
        spec.kind = kind;                                                                     \
        spec.delta = delta;                                                                   \
        spec.label_smoothing = label_smoothing;                                               \
        NS::loss_fused(ptr<const float>(pred), ptr<const void>(labels),                      \
                       static_cast<LabelKind>(label_kind), ptr<const float>(sample_weight),  \
                       ptr<float>(dpred), ptr<float>(row_loss), ptr<float>(loss),            \
                       ptr<int64_t>(bad_row), rows, cols, spec EXTRA_ARG);                   \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    /* [issue 17] DP-SGD per-example norms and clip factors; std_out: 0 = null */            \
    M.def("dp_row_sqnorms", [](uintptr_t x, uintptr_t dz, uintptr_t acc, int64_t rows,       \
                               int64_t in, int64_t out, bool bias,                           \
                               bool accumulate EXTRA_PARAM) {                                \
        NS::dp_row_sqnorms(ptr<const float>(x), ptr<const float>(dz), ptr<float>(acc), rows, \
                           in, out, bias, accumulate EXTRA_ARG);                             \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("dp_clip_factors", [](uintptr_t acc, int64_t rows, float clip,                     \
                                float noise_multiplier, float grad_scale, float divisor,     \
                                uintptr_t std_out EXTRA_PARAM) {                             \
        NS::dp_clip_factors(ptr<float>(acc), rows, clip, noise_multiplier, grad_scale,       \
                            divisor, ptr<float>(std_out) EXTRA_ARG);                         \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    /* [issue 18] interpretability: baseline, targets, targets_out: 0 = null */              \
    M.def("target_seed", [](uintptr_t logits, uintptr_t targets, uintptr_t out, int64_t rows, \
                            int64_t cols, int32_t transform EXTRA_PARAM) {                   \
        NS::target_seed(ptr<const float>(logits), ptr<const int32_t>(targets), ptr<float>(out), \
                        rows, cols, transform EXTRA_ARG);                                    \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("ig_interpolate", [](uintptr_t x, uintptr_t baseline, uintptr_t alphas,            \
                               uintptr_t targets, uintptr_t out, uintptr_t targets_out,      \
                               int64_t images, int64_t cols, int64_t steps, uintptr_t step,  \
                               int64_t batch, int64_t rows EXTRA_PARAM) {                    \
        NS::ig_interpolate(ptr<const float>(x), ptr<const float>(baseline),                  \
                           ptr<const float>(alphas), ptr<const int32_t>(targets),            \
                           ptr<float>(out), ptr<int32_t>(targets_out), images, cols, steps,  \
                           ptr<const int64_t>(step), batch, rows EXTRA_ARG);                 \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("ig_accumulate", [](uintptr_t grads, uintptr_t x, uintptr_t baseline,              \
                              uintptr_t weights, uintptr_t out, int64_t images, int64_t cols, \
                              int64_t steps, uintptr_t step, int64_t batch, int64_t rows,    \
                              bool multiply, bool absolute EXTRA_PARAM) {                    \
        NS::ig_accumulate(ptr<const float>(grads), ptr<const float>(x),                      \
                          ptr<const float>(baseline), ptr<const float>(weights),             \
                          ptr<float>(out), images, cols, steps, ptr<const int64_t>(step),    \
                          batch, rows, multiply, absolute EXTRA_ARG);                        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    /* [issue 18] adversarial examples; step: 0 = null (no random start) */                  \
    M.def("adv_init", [](uintptr_t x, uintptr_t adv, int64_t rows, int64_t cols, float eps,  \
                         float lo, float hi, uintptr_t step, uint32_t key0,                  \
                         uint32_t key1 EXTRA_PARAM) {                                        \
        NS::adv_init(ptr<const float>(x), ptr<float>(adv), rows, cols, eps, lo, hi,          \
                     ptr<const int64_t>(step), key0, key1 EXTRA_ARG);                        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("adv_step", [](uintptr_t x, uintptr_t adv, uintptr_t grad, int64_t rows,           \
                         int64_t cols, float eps, float alpha, float lo, float hi,           \
                         bool project EXTRA_PARAM) {                                         \
        NS::adv_step(ptr<const float>(x), ptr<float>(adv), ptr<const float>(grad), rows,     \
                     cols, eps, alpha, lo, hi, project EXTRA_ARG);                           \
    }, py::call_guard<py::gil_scoped_release>());

#define FASTMLP_NOTHING

// fastmlp._C.cpu.gemm_fast: the NumPy fast path of fastmlp.ops' GEMMs (gemm and
// the fused Dense ops), a few hundred nanoseconds instead of the ~10 us the
// general Python checks cost per call. It reads the NumPy array structs
// directly and runs cpu::gemm_ex only when every argument is plainly valid:
// float32, C-contiguous, aligned, the right shape, outputs writeable and not
// overlapping any input. Otherwise it returns false and touches nothing, and
// ops.py takes the general path, which raises the precise error.
struct NpView {
    float* data = nullptr;
    int64_t rows = 0, cols = 0, bytes = 0;
    bool writeable = false;
};

// h as a C-contiguous, aligned float32 array of rank `ndim` (1 or 2), or false.
bool np_view(py::handle h, int ndim, NpView& v) {
    auto& api = py::detail::npy_api::get();
    if (!api.PyArray_Check_(h.ptr())) return false;
    auto* a = py::detail::array_proxy(h.ptr());
    auto* d = py::detail::array_descriptor_proxy(a->descr);
    constexpr int kNpyFloat = 11;  // NPY_FLOAT
    const int flags = a->flags;
    constexpr int kContig = py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_;
    constexpr int kAligned = py::detail::npy_api::NPY_ARRAY_ALIGNED_;
    constexpr int kWrite = py::detail::npy_api::NPY_ARRAY_WRITEABLE_;
    if (d->type_num != kNpyFloat || a->nd != ndim || (flags & kContig) == 0 ||
        (flags & kAligned) == 0 || (d->byteorder == '>'))
        return false;
    v.data = reinterpret_cast<float*>(a->data);
    v.rows = ndim == 2 ? a->dimensions[0] : 1;
    v.cols = ndim == 2 ? a->dimensions[1] : a->dimensions[0];
    v.bytes = v.rows * v.cols * 4;
    v.writeable = (flags & kWrite) != 0;
    return true;
}

bool overlaps(const NpView& x, const NpView& y) {
    if (x.bytes == 0 || y.bytes == 0) return false;
    const uintptr_t xl = reinterpret_cast<uintptr_t>(x.data), yl = reinterpret_cast<uintptr_t>(y.data);
    return xl < yl + static_cast<uintptr_t>(y.bytes) && yl < xl + static_cast<uintptr_t>(x.bytes);
}

// [issue 15] act / preact / dropout (a DropoutTuple or None) and grad_act /
// saved / saved_is_input / grad_dropout: the activation epilogue (fastmlp.h),
// taken only when plainly valid (else false: ops.py's general path reports it).
// [issue 17] row_scale: GemmEpilogue::row_scale_k (k floats), or None.
bool bind_gemm_fast(py::handle a, py::handle b, py::handle c, bool ta, bool tb, float alpha,
                    float beta, py::handle bias, bool relu, py::handle mask, py::handle colsum,
                    int act, py::handle preact, py::handle dropout, int grad_act,
                    py::handle saved, bool saved_is_input, py::handle grad_dropout,
                    py::handle row_scale) {
    NpView A, B, C, Bias, Mask, Col;
    if (!np_view(a, 2, A) || !np_view(b, 2, B) || !np_view(c, 2, C) || !C.writeable) return false;
    const int64_t m = ta ? A.cols : A.rows, k = ta ? A.rows : A.cols;
    const int64_t kb = tb ? B.cols : B.rows, n = tb ? B.rows : B.cols;
    if (kb != k || C.rows != m || C.cols != n) return false;
    if (overlaps(C, A) || overlaps(C, B)) return false;
    fastmlp::GemmEpilogue ep;
    if (!bias.is_none()) {
        if (!np_view(bias, 1, Bias) || Bias.cols != n || overlaps(C, Bias)) return false;
        ep.bias = Bias.data;
    }
    if (!mask.is_none()) {
        if (!np_view(mask, 2, Mask) || Mask.rows != m || Mask.cols != n || overlaps(C, Mask))
            return false;
        ep.relu_mask = Mask.data;
        ep.ld_mask = n > 0 ? n : 1;
    }
    if (!colsum.is_none()) {
        if (tb || !np_view(colsum, 1, Col) || !Col.writeable || Col.cols != n ||
            overlaps(Col, A) || overlaps(Col, B) || overlaps(Col, C))
            return false;
        ep.colsum_b = Col.data;
    }
    if (!row_scale.is_none()) {  // read while C and colsum_b are written: no overlap
        NpView S;
        if (!np_view(row_scale, 1, S) || S.cols != k || overlaps(C, S) ||
            (ep.colsum_b && overlaps(Col, S)))
            return false;
        ep.row_scale_k = S.data;
    }
    ep.relu = relu;
    if (act != 0 || !dropout.is_none() || !preact.is_none() || grad_act != 0 ||
        !grad_dropout.is_none() || !saved.is_none()) {
        using fastmlp::kNumActs;
        if (act < 0 || act >= kNumActs || grad_act < 0 || grad_act >= kNumActs) return false;
        if (relu || !mask.is_none()) return false;
        if (grad_act != 0 && (saved.is_none() ||
                              (!saved_is_input && fastmlp::act_needs_input(grad_act))))
            return false;
        ep.act = act;
        ep.grad_act = grad_act;
        ep.saved_is_input = saved_is_input;
        NpView Pre, Sav;
        if (!preact.is_none()) {
            if (!np_view(preact, 2, Pre) || !Pre.writeable || Pre.rows != m || Pre.cols != n ||
                overlaps(Pre, A) || overlaps(Pre, B) || overlaps(Pre, C) ||
                (ep.bias && overlaps(Pre, Bias)))
                return false;
            ep.preact = Pre.data;
            ep.ld_preact = n > 0 ? n : 1;
        }
        if (!saved.is_none()) {
            if (!np_view(saved, 2, Sav) || Sav.rows != m || Sav.cols != n || overlaps(C, Sav))
                return false;
            ep.saved = Sav.data;
            ep.ld_saved = n > 0 ? n : 1;
        }
        try {
            if (!dropout.is_none()) ep.dropout = dropout_spec(dropout.cast<DropoutTuple>());
            if (!grad_dropout.is_none())
                ep.grad_dropout = dropout_spec(grad_dropout.cast<DropoutTuple>());
        } catch (const py::cast_error&) {
            return false;
        }
        if ((ep.dropout.threshold && !ep.dropout.step) ||
            (ep.grad_dropout.threshold && !ep.grad_dropout.step))
            return false;
    }
    const int64_t lda = A.cols > 0 ? A.cols : 1, ldb = B.cols > 0 ? B.cols : 1;
    py::gil_scoped_release release;
    fastmlp::cpu::gemm_ex(ta, tb, m, n, k, alpha, A.data, lda, B.data, ldb, beta, C.data,
                          n > 0 ? n : 1, ep, fastmlp::Precision::kFp32);
    return true;
}

// fastmlp._C.Engine: the engines of engine.h. An op arrives as (opcode,
// [buffer ids], [dims]) and is checked here for its lengths; set_ops checks
// opcodes and ids against the buffer table.
using OpTuple = std::tuple<int, std::vector<int>, std::vector<int64_t>>;

std::vector<fastmlp::engine::PlanOp> to_plan_ops(const std::vector<OpTuple>& ops) {
    using fastmlp::engine::PlanOp;
    std::vector<PlanOp> out(ops.size());
    for (size_t i = 0; i < ops.size(); ++i) {
        const auto& [code, bufs, dims] = ops[i];
        FASTMLP_CHECK(bufs.size() <= fastmlp::engine::kMaxBufs &&
                          dims.size() <= fastmlp::engine::kMaxDims,
                      "engine: op " << i << " has " << bufs.size() << " buffers and "
                                    << dims.size() << " dims (at most "
                                    << fastmlp::engine::kMaxBufs << " and "
                                    << fastmlp::engine::kMaxDims << ")");
        PlanOp& op = out[i];
        op.code = static_cast<fastmlp::engine::OpCode>(code);
        for (int b = 0; b < fastmlp::engine::kMaxBufs; ++b)
            op.buf[b] = b < static_cast<int>(bufs.size()) ? bufs[b] : -1;
        for (int d = 0; d < fastmlp::engine::kMaxDims; ++d)
            op.dim[d] = d < static_cast<int>(dims.size()) ? dims[d] : 0;
    }
    return out;
}

void bind_engine(py::module_& mod) {
    using fastmlp::engine::Engine;
    using fastmlp::engine::EngineState;
    py::list names;
#define FASTMLP_OPCODE_PYNAME(name) names.append(#name);
    FASTMLP_OPCODES(FASTMLP_OPCODE_PYNAME)
#undef FASTMLP_OPCODE_PYNAME
    mod.attr("engine_opcodes") = names;
    py::dict sizes;
    sizes["state"] = sizeof(fastmlp::engine::EngineState);
    sizes["scalars"] = sizeof(fastmlp::engine::StepScalars);
    sizes["step_hyper"] = sizeof(fastmlp::engine::StepHyper);
    mod.attr("engine_sizes") = sizes;
    mod.attr("engine_max_bufs") = fastmlp::engine::kMaxBufs;

    py::class_<Engine>(mod, "Engine", "A bound step plan on one device (engine.h)")
        .def("set_ops", [](Engine& e, int list, const std::vector<OpTuple>& ops) {
            e.set_ops(list, to_plan_ops(ops));
        })
        .def("set_buffers", &Engine::set_buffers)
        // The allreduce op's all-reduce: fn(data address, count, stream address), or
        // None. Called from the engine's thread with the GIL taken.
        .def("set_allreduce", &Engine::set_allreduce, py::arg("fn").none(true))
        .def("set_schedule", &Engine::set_schedule)
        .def("begin_pass", &Engine::begin_pass)
        .def("state", [](Engine& e, int buf) {
            EngineState st;
            {
                py::gil_scoped_release release;
                st = e.state(buf);
            }
            py::dict d;
            d["step"] = st.step;
            d["correct"] = st.correct;
            d["loss_sum"] = st.loss_sum;
            d["nonfinite_step"] = st.nonfinite_step;
            d["bad_row"] = st.bad_row;
            d["nonfinite_param_step"] = st.nonfinite_param_step;
            d["rng_step"] = st.rng_step;
            py::list metric;
            for (int i = 0; i < fastmlp::kNumMetricSums; ++i) metric.append(st.metric[i]);
            d["metric"] = metric;
            d["penalty_sum"] = st.penalty_sum;
            return d;
        })
        .def("run", &Engine::run, py::call_guard<py::gil_scoped_release>())
        .def("synchronize", &Engine::synchronize, py::call_guard<py::gil_scoped_release>())
        .def("graphs_captured", &Engine::graphs_captured);

    // Philox4x32-10 (kernel_math.h) for the known-answer tests.
    mod.def("philox4x32_10", [](std::array<uint32_t, 4> ctr, std::array<uint32_t, 2> key) {
        const fastmlp::Philox4 r = fastmlp::philox4x32_10(
            fastmlp::Philox4{{ctr[0], ctr[1], ctr[2], ctr[3]}}, key[0], key[1]);
        return std::array<uint32_t, 4>{r.v[0], r.v[1], r.v[2], r.v[3]};
    });

    // [issue 15] The dropout key of layer `layer` under seed `seed` (kernel_math.h).
    mod.def("dropout_key", [](uint64_t seed, uint64_t layer) {
        uint32_t k0 = 0, k1 = 0;
        fastmlp::dropout_key(seed, layer, &k0, &k1);
        return std::make_tuple(k0, k1);
    }, py::arg("seed"), py::arg("layer"));

    // [issue 17] The DP-SGD noise key of seed `seed` (kernel_math.h noise_key).
    mod.def("noise_key", [](uint64_t seed) {
        uint32_t k0 = 0, k1 = 0;
        fastmlp::noise_key(seed, &k0, &k1);
        return std::make_tuple(k0, k1);
    }, py::arg("seed"));

    // [issue 18] The key of the adversarial random start of seed `seed`
    // (kernel_math.h adversarial_key).
    mod.def("adversarial_key", [](uint64_t seed) {
        uint32_t k0 = 0, k1 = 0;
        fastmlp::adversarial_key(seed, &k0, &k1);
        return std::make_tuple(k0, k1);
    }, py::arg("seed"));

    mod.def("new_engine", [](const std::string& device, int ordinal) -> Engine* {
        if (device == "cpu") return fastmlp::engine::new_cpu_engine();
#ifdef FASTMLP_WITH_CUDA
        if (device == "cuda") return fastmlp::engine::new_cuda_engine(ordinal);
#endif
        (void)ordinal;
        FASTMLP_CHECK(false, "new_engine: no engine for device '" << device << "' in this build");
        return nullptr;
    }, py::return_value_policy::take_ownership);
}

}  // namespace

#ifdef FASTMLP_WITH_CUDA
namespace fastmlp {
namespace cuda {
// CUDA-only bindings beyond the common ops (GEMM kernel configurations, the
// tuning table): csrc/cuda/bind_extras.cpp, plain C++ like this file.
void bind_extras(py::module_& m);
}  // namespace cuda
}  // namespace fastmlp
#endif

PYBIND11_MODULE(_C, mod) {
    mod.doc() = "fastmlp kernels (float32, row-major); use fastmlp.ops, not this module";
    mod.attr("build_info") = FASTMLP_BUILD_INFO;
    mod.attr("cuda_build_note") = FASTMLP_CUDA_WHY;  // why the CUDA part is on or off

    bind_engine(mod);

    py::module_ cpu = mod.def_submodule("cpu", "C++ CPU kernels");
    FASTMLP_BIND_OPS(cpu, fastmlp::cpu, FASTMLP_NOTHING, FASTMLP_NOTHING)
    cpu.def("num_threads", &fastmlp::cpu::num_threads);
    cpu.def("set_num_threads", &fastmlp::cpu::set_num_threads);
    cpu.def("flush_denormal", &fastmlp::cpu::flush_denormal);
    cpu.def("set_flush_denormal", &fastmlp::cpu::set_flush_denormal);
    cpu.def("flush_denormal_supported", &fastmlp::cpu::flush_denormal_supported);
    cpu.def("gemm_isa", &fastmlp::cpu::gemm_isa);
    cpu.def("gemm_fast", &bind_gemm_fast, py::arg("a"), py::arg("b"), py::arg("c"),
            py::arg("trans_a"), py::arg("trans_b"), py::arg("alpha"), py::arg("beta"),
            py::arg("bias"), py::arg("relu"), py::arg("mask"), py::arg("colsum"),
            py::arg("act") = 0, py::arg("preact") = py::none(), py::arg("dropout") = py::none(),
            py::arg("grad_act") = 0, py::arg("saved") = py::none(),
            py::arg("saved_is_input") = false, py::arg("grad_dropout") = py::none(),
            py::arg("row_scale") = py::none());
    cpu.def("gemm_isas_supported", &fastmlp::cpu::gemm_isas_supported);
    cpu.def("set_gemm_isa", &fastmlp::cpu::set_gemm_isa);
    cpu.def("noise_isa", &fastmlp::cpu::noise_isa);
    cpu.def("noise_isas_supported", &fastmlp::cpu::noise_isas_supported);
    cpu.def("set_noise_isa", &fastmlp::cpu::set_noise_isa);
    cpu.def("noise_box_muller_mismatches", &fastmlp::cpu::noise_box_muller_mismatches,
            py::call_guard<py::gil_scoped_release>());

#ifdef FASTMLP_WITH_CUDA
    mod.attr("cuda_built") = true;
    py::module_ cuda = mod.def_submodule("cuda", "CUDA kernels");
#define FASTMLP_STREAM_PARAM , uintptr_t stream
#define FASTMLP_STREAM_ARG , reinterpret_cast<cudaStream_t>(stream)
    FASTMLP_BIND_OPS(cuda, fastmlp::cuda, FASTMLP_STREAM_PARAM, FASTMLP_STREAM_ARG)
    fastmlp::cuda::bind_extras(cuda);
    // (count, "") or (0, reason): never raises, so fm.backends() can report
    // "no driver" on a machine without a GPU.
    cuda.def("device_count", []() -> py::tuple {
        int count = 0;
        cudaError_t err = cudaGetDeviceCount(&count);
        if (err != cudaSuccess) {
            std::string why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
            cudaGetLastError();  // clear the sticky-free error so later calls start clean
            return py::make_tuple(0, why);
        }
        return py::make_tuple(count, std::string());
    });
    cuda.def("runtime_version", []() {
        int v = 0;
        cudaRuntimeGetVersion(&v);
        return v;
    });
#else
    mod.attr("cuda_built") = false;
#endif
}
