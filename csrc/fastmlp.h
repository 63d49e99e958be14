// The C++ op API of fastmlp: raw pointers, sizes and (for CUDA) a stream.
//
// Conventions, shared by both backends:
// - float32, row-major (C order). A Dense kernel is (in, out): y = x @ W + b.
// - Kernels never allocate; the caller (the Python layer, through CuPy's pool
//   on the GPU) passes every output and workspace.
// - Every size may be 0 (a no-op) or any positive value; no tile divisibility.
// - Reductions are deterministic (no floating-point atomics): a run repeats
//   bit for bit on the same device.
// - A launcher checks its preconditions with FASTMLP_CHECK (-> ValueError in
//   Python); a CUDA launcher launches on the given stream and checks the launch.
#pragma once

#include <cstdint>
#include <string>

#include "kernel_math.h"

#ifdef FASTMLP_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

namespace fastmlp {

// How softmax-cross-entropy labels are stored.
enum class LabelKind : int {
    kInt32 = 0,   // (rows,) int32 class indices
    kInt64 = 1,   // (rows,) int64 class indices
    kOneHot = 2,  // (rows, cols) float32 rows (one-hot or any distribution)
};

// [issue 16] The fused metrics kernel (metrics_fused): which per-row metrics to
// sum (MetricSpec::flags, OR-ed), the order of the sums it writes, and the
// transform turning the model's last pre-transform values into predictions.
enum MetricFlag : int32_t { kMetricArgmax = 1, kMetricBinary = 2, kMetricTopK = 4,
                            kMetricAbs = 8, kMetricSq = 16 };
constexpr int kNumMetricSums = 5;  // sums[] order: argmax, binary, topk, abs, sq
enum class OutputTransform : int32_t { kNone = 0, kSigmoid = 1, kSoftmax = 2 };
struct MetricSpec { int32_t flags = 0; int32_t transform = 0; int32_t k = 5; float threshold = 0.5f; };
// [issue 16] The losses of loss_fused (csrc/loss_math.h has their math).
enum class LossKind : int { kMse = 0, kMae = 1, kHuber = 2, kBceLogits = 3, kBceProbs = 4,
                            kCceLogits = 5, kCceProbs = 6 };
// kind: a LossKind; delta: Huber's threshold (> 0); label_smoothing in [0, 1):
// the BCE and cross-entropy kinds' smoothing (ignored by the others).
struct LossSpec { int32_t kind = 0; float delta = 1.0f; float label_smoothing = 0.0f; };

// The fused extras of gemm_ex, for Dense layers. Applied to each element of C
// after t = alpha * sum_p op(A)(i,p) op(B)(p,j) + beta * C(i,j), in this order:
//   t += bias[j]                         bias != nullptr     (Dense forward)
//   t = t < 0 ? 0 : t                    relu                (Dense forward)
//   t = mask[i*ld_mask + j] <= 0 ? 0 : t relu_mask != nullptr (dX through a ReLU:
//                                        mask is the ReLU's output, m x n)
// (kernel_math.h's relu / relu_grad: NaN and Inf propagate as in torch)
// and, independently of C, colsum_b[j] = sum_p op(B)(p,j) (n floats): the bias
// gradient fused into dW = X^T dY. colsum_b needs trans_b == false. The sum
// order is fixed per build and machine (deterministic), not necessarily p order.
struct GemmEpilogue {
    const float* bias = nullptr;
    bool relu = false;
    const float* relu_mask = nullptr;
    int64_t ld_mask = 0;
    float* colsum_b = nullptr;
    // [issue 6] Scratch for the CUDA kernel family's split-K (partial tiles,
    // reduced in fixed order): workspace_floats floats of device memory, or
    // null. Kernels never allocate; the Python layer asks how much the chosen
    // kernel needs (_C.cuda.gemm_workspace_floats) and passes it. Without
    // enough, a split-K entry runs unsplit. The CPU ignores it.
    float* workspace = nullptr;
    int64_t workspace_floats = 0;
    // [issue 17] DP-SGD's per-example clipping inside the weight-gradient GEMM:
    // k floats (op(B)'s rows), or null for none. Then
    //   C = alpha * op(A) diag(row_scale_k) op(B) + beta * C, and
    //   colsum_b[j] = sum_p row_scale_k[p] op(B)(p, j).
    // Each product op(B)(p,j) * s[p] is rounded to float32 before it is used
    // (the semantics of scaling op(B)'s rows first): kernel_math.h's
    // row_scaled, never contracted into an FMA, on both devices; the GEMM and
    // the column sums then round as the unscaled call on the scaled B does, so
    // CPU and GPU agree to GEMM rounding, and s = 1 gives the unscaled call's
    // bits on the same path. All four transposes; the CUDA tuned family
    // declines such calls (the foundation's tiled kernel scales as it loads).
    const float* row_scale_k = nullptr;

    // [issue 15] The general activation epilogue (kernel_math.h ActCode,
    // DropoutSpec), for what the relu / relu_mask fast paths above do not
    // cover. Element (i, j) of C is element e = i * n + j of the dropout mask.
    //   forward (act != linear, dropout.threshold != 0 or preact set), after the bias:
    //     preact[i*ld_preact + j] = t        when preact != nullptr
    //     t = act(t) * dropout_multiplier(e)
    //   backward (grad_act != linear or grad_dropout.threshold != 0):
    //     t = t * dropout_multiplier(e)      (grad_dropout: the mask of the forward)
    //     t = act_grad(t, saved[i*ld_saved + j])   from the pre-activation when
    //                                        saved_is_input, else from the output
    // relu must be false when act is set, relu_mask null when grad_act is set.
    int32_t act = 0;
    float* preact = nullptr;
    int64_t ld_preact = 0;
    DropoutSpec dropout;
    int32_t grad_act = 0;
    const float* saved = nullptr;
    int64_t ld_saved = 0;
    bool saved_is_input = false;
    DropoutSpec grad_dropout;

    // (preact alone also counts: it asks for t to be stored, even for linear.)
    bool has_act() const { return act != 0 || dropout.threshold != 0 || preact != nullptr; }
    bool has_grad_act() const { return grad_act != 0 || grad_dropout.threshold != 0; }
};

// Matmul precision. The CPU always computes in fp32 (kTf32 is accepted and
// ignored there); on CUDA kTf32 allows TF32 tensor cores (10-bit mantissa
// inputs, fp32 accumulation) where a verified kernel exists.
enum class Precision : int { kFp32 = 0, kTf32 = 1 };

// The ops, declared once for both backends. FASTMLP_STREAM_ARG is empty on the
// CPU and ", cudaStream_t stream" on CUDA.
//
// gemm_ex: gemm plus the GemmEpilogue extras, in one pass where the backend
//   has a fused kernel. gemm == gemm_ex with an empty epilogue, fp32.
// gemm: C(m,n) = alpha * op(A)(m,k) @ op(B)(k,n) + beta * C, row-major.
//   op(A) = A (m x k, lda >= k) or, with trans_a, A^T where A is k x m (lda >= m);
//   op(B) = B (k x n, ldb >= n) or, with trans_b, B^T where B is n x k (ldb >= k).
//   ldc >= n. beta == 0 makes C write-only: whatever C held (NaN included)
//   does not propagate, as in BLAS. k == 0 gives C = beta * C.
// bias_add:  y(r,c) = x(r,c) + bias(c)           y may alias x
// bias_grad: db(c) = sum_r dy(r,c)                (column sums)
// relu:      y = x < 0 ? 0 : x (torch.relu)       y may alias x
// relu_backward: dx = y <= 0 ? 0 : dy             dx may alias dy
// first_nonfinite: *out = the smallest i with x[i] NaN or +-Inf, or -1 (out
//   points to one int64, device memory on CUDA).
// softmax_xent_fwd: probs = softmax(logits) per row; row_loss(r) = -sum_c
//   label(r,c) * log probs(r,c); *loss = mean over rows (0 when rows == 0).
//   *bad_row = the smallest row whose integer label is outside [0, cols), or
//   -1; such a row gets row_loss = NaN and is never read out of bounds.
//   loss and bad_row point to one element each (device memory on CUDA).
// softmax_xent_bwd: dlogits = (probs - onehot(label)) / rows; bad_row as above
//   (a bad row's dlogits = probs / rows, no out-of-bounds write).
//   dlogits may alias probs.
// softmax_xent_fused: the training step's loss in one pass over the logits:
//   with backward, out = (softmax(logits) - onehot(label)) / rows (dlogits);
//   without, out = softmax(logits) (probs). *loss = the mean row loss and
//   *bad_row as softmax_xent_fwd; *hits = the rows whose arg-max (the first
//   maximum) equals the label (for one-hot rows: the label row's arg-max).
//   row_loss (rows floats) and row_hits (rows int32) are scratch. out must not
//   alias logits. On the CPU the values are bit for bit those of
//   softmax_xent_fwd followed by softmax_xent_bwd (it calls them).
//   loss, hits, bad_row point to one element each (device memory on CUDA).
// random_permutation: out[i] = permute_index(i, perm_key(n, seed, counter))
//   (kernel_math.h): the same permutation of [0, n) on every device.
// gaussian_noise: out[i] = gaussian_noise(offset + i, step, noise_key(seed))
//   (kernel_math.h): standard normals, the same floats on every device; the
//   generator the optimizers' DP-SGD noise (GradTransform::noise) draws from.
// activation_fwd: y = act(x) * dropout multiplier (kernel_math.h), x and y
//   (rows, cols); y may alias x. act = linear with a dropout is plain dropout.
// activation_bwd: dx = act_grad(dy * dropout multiplier, saved), from the
//   input x (saved_is_input) or the output y; saved may be null for linear.
//   dx may alias dy.
// batchnorm_fwd: per column c over the rows (Keras BatchNormalization):
//   training: mean(c), var(c) = the batch mean and biased variance;
//     save_mean(c) = mean, save_invstd(c) = 1 / sqrt(var + eps);
//     moving_mean = moving_mean * momentum + mean * (1 - momentum), the same
//     for moving_var with var (in place, in the same kernel);
//   inference: mean, var = moving_mean, moving_var (save_* are not written
//     and may be null).
//   y = (x - mean) * invstd * gamma + beta; gamma / beta null: 1 / 0.
//   rows == 0 in training leaves everything but y untouched.
//   The statistics are sums of x - (the column's row-0 value) in double, the
//   shared rule in kernel_math.h (norm_stats, moving_update).
// batchnorm_bwd (training statistics): xhat = (x - save_mean) * save_invstd,
//   dbeta(c) = sum_r dy, dgamma(c) = sum_r dy * xhat (null: not wanted),
//   dx = gamma * invstd / rows * (rows * dy - dbeta - xhat * dgamma).
// layernorm_fwd: per row r over the cols: save_mean(r), save_invstd(r) =
//   1 / sqrt(biased var + eps); y = (x - mean) * invstd * gamma + beta.
//   cols == 0 leaves save_* untouched (no statistics of an empty row, as BN
//   with rows == 0).
// layernorm_bwd: xhat as above per row, g = dy * gamma;
//   dx = invstd / cols * (cols * g - sum_c g - xhat * sum_c g * xhat);
//   dgamma(c) = sum_r dy * xhat, dbeta(c) = sum_r dy (null: not wanted).
// The normalisation reductions are deterministic (fixed order, no atomics;
//   on the CPU independent of the thread count). dgamma / dbeta are written,
//   not accumulated (zeros when rows == 0). No output may alias an input.
// sgd_step / adam_step: in place, torch.optim semantics (see kernel_math.h). buf may be
//   null when momentum == 0. step counts from 1.
// metrics_fused [issue 16]: per-step partial sums of the Keras metrics.
//   p = transform(pred) (MetricSpec::transform: none; sigmoid, kernel_math.h's
//   sigmoidf; or a max-subtracted row softmax), written to probs_out (rows, cols)
//   unless it is null. labels: kInt32 / kInt64 class indices (rows,) or kOneHot
//   float rows (rows, cols). sums[m] (kNumMetricSums doubles, device memory on
//   CUDA) is WRITTEN with the sum over rows of metric m's per-row value, 0 for
//   a metric not in spec.flags (details and NaN rules in metric_math.h):
//     argmax  1 when the first maximum of pred equals the label (float rows:
//             their first maximum), else 0
//     binary  mean over c of [(p > threshold) == (y > 0.5)]   (float labels only)
//     topk    1 when fewer than k classes have pred > pred[label], else 0
//     abs     mean over c of |p - y|;  sq: of (p - y)^2        (float labels only)
//   argmax and topk compare pred, not p: every transform is monotone per row,
//   so the result is the same but without the ties rounding makes in p.
//   An integer label outside [0, cols) is a miss, never read. row_scratch:
//   rows * kNumMetricSums floats (metric m's row values at m * rows). Each sum
//   is a fixed-order sum in double of the row values: deterministic (on the CPU
//   independent of the thread count). rows == 0 gives all sums 0.
// loss_fused [issue 16]: a LossSpec loss and its gradient in one pass over
//   pred (rows, cols) (csrc/loss_math.h has the math of each kind). Per row a
//   loss L_r; *loss = sum_r w_r L_r / rows (w_r = sample_weight[r], or 1 when
//   sample_weight is null; summed in double in row order); with dpred
//   (non-null, must not overlap pred) dpred(r, c) = w_r / rows * dL_r/dpred(r, c).
//   labels: (rows, cols) float rows (kOneHot) for every kind; the two
//   cross-entropy kinds also take (rows,) int32 / int64 class indices.
//   row_loss (rows floats) is scratch (it gets w_r L_r). loss and bad_row
//   point to one element each (device memory on CUDA), written, never
//   accumulated; *bad_row as softmax_xent_fwd (a bad row: NaN loss, its dpred
//   computed with no class target). rows == 0: *loss = 0, *bad_row = -1.
// rmsprop_step: in place, torch.optim.RMSprop (kernel_math.h rmsprop_update); sq is
//   square_avg, buf the momentum buffer (null when momentum == 0), gavg grad_avg
//   (null unless centered).
// The optimizer steps apply t (kernel_math.h GradTransform: DP-SGD noise, l1/l2
//   regularizer gradients, clip-by-norm scale, clipvalue, the penalty) to each gradient
//   element before their own rule; an empty t is exactly the plain step. On CUDA
//   t.penalty needs t.work (optimizer_work_doubles() doubles of device memory).
// grad_clip_scale: for segments k = 0..nseg-1 of the flat arrays (segment k =
//   elements offsets[k] .. offsets[k+1]-1; offsets: nseg+1 int64, device memory
//   on CUDA; l1l2: 2*nseg floats (l1_k, l2_k), or null = all 0):
//   s_k = sum over the segment of (g + l1_k sign(w) + 2 l2_k w)^2 in double, in a
//   fixed order (independent of the thread count);
//   mode 0 (per tensor, Keras clipnorm): scale[k] = min(1, max_norm / (sqrt(s_k) + 1e-6));
//   mode 1 (global, torch clip_grad_norm_): every scale[k] =
//     min(1, max_norm / (sqrt(sum_k s_k) + 1e-6)).
//   The min and the division in double, the result rounded to float. work:
//   grad_clip_work_doubles(size, nseg) doubles (device memory on CUDA; the CPU
//   ignores it and may get null).
// dp_row_sqnorms [issue 17]: DP-SGD's per-example squared gradient norm of one
//   Dense layer ("ghost norm": example r's weight gradient is x_r dz_r^T):
//   acc[r] = (accumulate ? acc[r] : 0) + (sum_c x[r,c]^2 + (bias ? 1 : 0)) * sum_c dz[r,c]^2,
//   r < rows; x is rows x in (ld = in), dz rows x out (ld = out). Each row's sums
//   in double (kernel_math.h kDpLanes: the same order on both devices), then the
//   product and the add rounded to float once (dp_row_sqnorm_value). Without
//   accumulate, acc's old contents are never read. acc must not overlap x or dz.
// dp_clip_factors [issue 17]: in place, acc[r] (a squared per-row norm of the
//   rows' gradient contribution) becomes the row's scale s_r = c_r * grad_scale /
//   divisor, where norm_r = grad_scale * sqrt(acc[r]) and c_r = min(1, clip /
//   (norm_r + 1e-6)) (Opacus's clip factor), in double, rounded to float
//   (kernel_math.h dp_clip_factor_value); when std_out != null, std_out[0] =
//   noise_multiplier * clip / divisor (one float, device memory on CUDA; written
//   also when rows == 0). grad_scale, divisor > 0; clip > 0; noise_multiplier >= 0.
//   A NaN acc gives a NaN scale.
// target_seed [issue 18]: the gradient seed of an explanation, out(r, j) =
//   d f_t(z_r) / d z_rj for the logits row z_r, t = targets[r] (int32) and the
//   transform f (OutputTransform): none -> (j == t); sigmoid -> sigmoid'(z_rt) at
//   j == t (kernel_math.h sigmoid_seed), else 0; softmax -> p_t ((j == t) - p_j),
//   p = the max-subtracted row softmax (softmax_seed). A target outside [0, cols)
//   gives a row of zeros (never read out of bounds; the Python op refuses it
//   first). out must not overlap logits.
// ig_interpolate [issue 18]: integrated gradients' path points. Virtual row v of
//   images * steps is image i = v / steps at point m = v % steps; this call
//   writes rows r < rows of out (rows, cols) from v = (*step) * batch + r:
//   out(r, c) = ig_point(x(i, c), baseline, alphas[m]) (kernel_math.h: Captum's
//   b + alpha (x - b), each operation rounded; baseline null = zeros), and
//   targets_out[r] = targets[i] when targets != null (targets_out then required).
//   A v outside [0, images * steps) is skipped (its row left untouched). step
//   points to one int64, device memory on CUDA, read by the kernel (a CUDA
//   Graph replays the launch with a changing step). steps >= 1. out must not
//   overlap x, baseline, alphas; targets_out not targets.
// ig_accumulate [issue 18]: the quadrature over the path points that
//   ig_interpolate wrote for the same (*step, batch, rows): grads (rows, cols),
//   batch % steps == 0, rows % steps == 0. Images i = i0 + k, i0 = (*step) *
//   batch / steps, k < rows / steps (i >= images skipped): s = sum over m =
//   0..steps-1 in order of mul_rn(weights[m], grads((k steps + m), c)) (float,
//   from 0); out(i, c) = ig_attribution(s, x(i, c), baseline, multiply,
//   absolute) ((x - b) s with multiply, |.| with absolute). out (images, cols)
//   must not overlap grads, x, baseline, weights.
// adv_init [issue 18]: the attack's start, element e = r * cols + c: adv[e] =
//   adv_clamp(x[e] + mul_rn(eps, adv_uniform(dropout_bits(e, *step, key0,
//   key1))), lo, hi) (a uniform in (-1, 1), kernel_math.h; keys from
//   adversarial_key(seed)); step null: adv[e] = adv_clamp(x[e], lo, hi) (no
//   random start). step: one int64, device memory on CUDA. eps >= 0 finite,
//   lo <= hi (+-inf allowed). adv may be x exactly, not a partial overlap.
// adv_step [issue 18]: FGSM / PGD's step, in place: adv[e] = adv_step_value(x[e],
//   adv[e], grad[e], eps, alpha, lo, hi, project) (kernel_math.h: adv + alpha
//   sign(grad), projected into x +- eps with project, clamped to [lo, hi]).
//   eps, alpha >= 0 finite, lo <= hi. x and grad must not overlap adv.
#define FASTMLP_DECLARE_OPS(FASTMLP_STREAM_ARG)                                        \
    void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, \
              const float* a, int64_t lda, const float* b, int64_t ldb, float beta,     \
              float* c, int64_t ldc FASTMLP_STREAM_ARG);                                \
    void gemm_ex(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,\
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta,  \
                 float* c, int64_t ldc, const GemmEpilogue& ep,                         \
                 Precision precision FASTMLP_STREAM_ARG);                               \
    void bias_add(const float* x, const float* bias, float* y, int64_t rows,           \
                  int64_t cols FASTMLP_STREAM_ARG);                                     \
    void bias_grad(const float* dy, float* db, int64_t rows,                            \
                   int64_t cols FASTMLP_STREAM_ARG);                                    \
    void relu(const float* x, float* y, int64_t size FASTMLP_STREAM_ARG);               \
    void relu_backward(const float* dy, const float* y, float* dx,                      \
                       int64_t size FASTMLP_STREAM_ARG);                                \
    void first_nonfinite(const float* x, int64_t size, int64_t* out FASTMLP_STREAM_ARG);\
    void softmax_xent_fwd(const float* logits, const void* labels, LabelKind kind,      \
                          float* probs, float* row_loss, float* loss, int64_t* bad_row, \
                          int64_t rows, int64_t cols FASTMLP_STREAM_ARG);               \
    void softmax_xent_bwd(const float* probs, const void* labels, LabelKind kind,       \
                          float* dlogits, int64_t* bad_row, int64_t rows,               \
                          int64_t cols FASTMLP_STREAM_ARG);                             \
    void softmax_xent_fused(const float* logits, const void* labels, LabelKind kind,    \
                            float* out, float* row_loss, int32_t* row_hits, float* loss,  \
                            int64_t* hits, int64_t* bad_row, int64_t rows, int64_t cols,  \
                            bool backward FASTMLP_STREAM_ARG);                            \
    void activation_fwd(const float* x, float* y, int64_t rows, int64_t cols, int act,   \
                        const DropoutSpec& dropout FASTMLP_STREAM_ARG);                   \
    void activation_bwd(const float* dy, const float* saved, float* dx, int64_t rows,     \
                        int64_t cols, int act, bool saved_is_input,                       \
                        const DropoutSpec& dropout FASTMLP_STREAM_ARG);                   \
    void batchnorm_fwd(const float* x, const float* gamma, const float* beta, float* y,   \
                       float* save_mean, float* save_invstd, float* moving_mean,          \
                       float* moving_var, int64_t rows, int64_t cols, float eps,          \
                       float momentum, bool training FASTMLP_STREAM_ARG);                 \
    void batchnorm_bwd(const float* dy, const float* x, const float* gamma,               \
                       const float* save_mean, const float* save_invstd, float* dx,       \
                       float* dgamma, float* dbeta, int64_t rows,                         \
                       int64_t cols FASTMLP_STREAM_ARG);                                  \
    void layernorm_fwd(const float* x, const float* gamma, const float* beta, float* y,   \
                       float* save_mean, float* save_invstd, int64_t rows, int64_t cols,  \
                       float eps FASTMLP_STREAM_ARG);                                     \
    void layernorm_bwd(const float* dy, const float* x, const float* gamma,               \
                       const float* save_mean, const float* save_invstd, float* dx,       \
                       float* dgamma, float* dbeta, int64_t rows,                         \
                       int64_t cols FASTMLP_STREAM_ARG);                                  \
    void random_permutation(int64_t* out, int64_t n, uint64_t seed,                     \
                            uint64_t counter FASTMLP_STREAM_ARG);                         \
    void gaussian_noise(float* out, int64_t size, uint64_t seed, uint64_t step,         \
                        int64_t offset FASTMLP_STREAM_ARG);                               \
    void sgd_step(float* param, const float* grad, float* buf, int64_t size, float lr,  \
                  float momentum, bool nesterov, float weight_decay,                    \
                  const GradTransform& t FASTMLP_STREAM_ARG);                           \
    void adam_step(float* param, const float* grad, float* m, float* v, int64_t size,   \
                   double lr, double beta1, double beta2, double eps,                   \
                   double weight_decay, bool decoupled, int64_t step,                   \
                   const GradTransform& t FASTMLP_STREAM_ARG);                          \
    void rmsprop_step(float* param, const float* grad, float* sq, float* buf,           \
                      float* gavg, int64_t size, double lr, double alpha, double eps,   \
                      double weight_decay, double momentum, bool centered,              \
                      const GradTransform& t FASTMLP_STREAM_ARG);                       \
    void grad_clip_scale(const float* params, const float* grads, const int64_t* offsets, \
                         const float* l1l2, int64_t nseg, int mode, float max_norm,     \
                         float* scale, double* work FASTMLP_STREAM_ARG);           \
    void metrics_fused(const float* pred, const void* labels, LabelKind label_kind,        \
                       float* probs_out, float* row_scratch, double* sums, int64_t rows,  \
                       int64_t cols, const MetricSpec& spec FASTMLP_STREAM_ARG);      \
    void loss_fused(const float* pred, const void* labels, LabelKind label_kind,          \
                    const float* sample_weight, float* dpred, float* row_loss, float* loss, \
                    int64_t* bad_row, int64_t rows, int64_t cols,                         \
                    const LossSpec& spec FASTMLP_STREAM_ARG);                            \
    void dp_row_sqnorms(const float* x, const float* dz, float* acc, int64_t rows, int64_t in, \
                        int64_t out, bool bias, bool accumulate FASTMLP_STREAM_ARG);           \
    void dp_clip_factors(float* acc, int64_t rows, float clip, float noise_multiplier,      \
                         float grad_scale, float divisor, float* std_out FASTMLP_STREAM_ARG); \
    void target_seed(const float* logits, const int32_t* targets, float* out, int64_t rows, \
                     int64_t cols, int32_t transform FASTMLP_STREAM_ARG);                  \
    void ig_interpolate(const float* x, const float* baseline, const float* alphas,        \
                        const int32_t* targets, float* out, int32_t* targets_out,          \
                        int64_t images, int64_t cols, int64_t steps, const int64_t* step,  \
                        int64_t batch, int64_t rows FASTMLP_STREAM_ARG);                   \
    void ig_accumulate(const float* grads, const float* x, const float* baseline,          \
                       const float* weights, float* out, int64_t images, int64_t cols,     \
                       int64_t steps, const int64_t* step, int64_t batch, int64_t rows,    \
                       bool multiply, bool absolute FASTMLP_STREAM_ARG);                   \
    void adv_init(const float* x, float* adv, int64_t rows, int64_t cols, float eps,       \
                  float lo, float hi, const int64_t* step, uint32_t key0,                  \
                  uint32_t key1 FASTMLP_STREAM_ARG);                                       \
    void adv_step(const float* x, float* adv, const float* grad, int64_t rows, int64_t cols, \
                  float eps, float alpha, float lo, float hi, bool project FASTMLP_STREAM_ARG);

struct SgdHyper;   // kernel_math.h
struct AdamHyper;
struct RmspropHyper;

namespace cpu {
#define FASTMLP_NO_STREAM
FASTMLP_DECLARE_OPS(FASTMLP_NO_STREAM)
#undef FASTMLP_NO_STREAM
// Threads the CPU kernels use (cpu/parallel.h: set_num_threads, else
// FASTMLP_NUM_THREADS, else OMP_NUM_THREADS, else the CPUs this process may use).
int num_threads();
// Sets the threads of all later CPU kernels (process-wide).
void set_num_threads(int n);
// Flush-to-zero / denormals-are-zero inside the CPU kernels (cpu/fpenv.h):
// on by default, process-wide; the caller's own FP mode is restored after
// every kernel call.
bool flush_denormal();
void set_flush_denormal(bool on);
bool flush_denormal_supported();
// The instruction set of the CPU GEMM driver: its name ("avx512", "avx2",
// "generic"), the ones this CPU supports (comma-separated), and a setter for
// tests and benchmarks ("auto" = the best supported); returns the old name.
std::string gemm_isa();
std::string gemm_isas_supported();
std::string set_gemm_isa(const std::string& name);
// The same for the Gaussian noise generator's block loop (cpu/noise.h):
// "avx512" or "generic"; FASTMLP_CPU_NOISE=avx512|generic|auto overrides the
// default (the best supported).
std::string noise_isa();
std::string noise_isas_supported();
std::string set_noise_isa(const std::string& name);
// Test-only: the vector Box-Muller of `isa` ("avx512") against the scalar one on
// every uniform each word can give; returns the number of lanes that differ.
int64_t noise_box_muller_mismatches(const std::string& isa);

// The optimizer updates with their constants already computed (the engine's
// per-step table; sgd_step / adam_step compute them, then call these).
// Return true when an updated parameter is NaN or +-Inf (found in the update
// loop itself: the engine stops training on it without another pass).
// An empty GradTransform (the default) runs exactly the plain update loops.
bool sgd_step_hyper(float* param, const float* grad, float* buf, int64_t size,
                    const SgdHyper& h, const GradTransform& t = GradTransform());
bool adam_step_hyper(float* param, const float* grad, float* m, float* v, int64_t size,
                     const AdamHyper& h, const GradTransform& t = GradTransform());
bool rmsprop_step_hyper(float* param, const float* grad, float* sq, float* buf, float* gavg,
                        int64_t size, const RmspropHyper& h,
                        const GradTransform& t = GradTransform());
// Scratch sizes (in doubles) of the transform's penalty and of grad_clip_scale:
// the CPU needs none (0); the engine may pass null work on the CPU.
int64_t optimizer_work_doubles();
int64_t grad_clip_work_doubles(int64_t size, int64_t nseg);
}  // namespace cpu

#ifdef FASTMLP_WITH_CUDA
namespace cuda {
#define FASTMLP_CUDA_STREAM , cudaStream_t stream
FASTMLP_DECLARE_OPS(FASTMLP_CUDA_STREAM)
#undef FASTMLP_CUDA_STREAM
// Scratch sizes in doubles: GradTransform::work for a penalty (optim_loops.cuh:
// two doubles per block of the optimizer loops' grid, whose size must not
// exceed optimizer_work_doubles() / 2 blocks) and grad_clip_scale's work.
int64_t optimizer_work_doubles();
int64_t grad_clip_work_doubles(int64_t size, int64_t nseg);
}  // namespace cuda
#endif

}  // namespace fastmlp
