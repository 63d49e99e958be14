// Scalar math shared by the CPU and CUDA kernels, so that the CPU tests cover
// the exact rules the GPU runs.
//
// The optimizer rules follow torch.optim's single-tensor implementations
// operation by operation (same order of float32 operations), so results agree
// with PyTorch to rounding.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#define FASTMLP_HOSTDEV __host__ __device__ __forceinline__
#else
#define FASTMLP_HOSTDEV inline
#endif
// The activation rules and the vectorisable math under them: always inlined on
// the host, so that a CPU loop over them is one straight-line body the
// compiler can vectorise (an out-of-line call leaves the loop scalar: GCC's
// inliner gave up on elu's expm1 -> exp_vec + log_vec inside a large loop).
#if defined(__CUDACC__)
#define FASTMLP_ACT_INLINE FASTMLP_HOSTDEV
#define FASTMLP_DISPATCH_INLINE inline  // with_act: host code (launchers)
#elif defined(__GNUC__)
#define FASTMLP_ACT_INLINE inline __attribute__((always_inline))
#define FASTMLP_DISPATCH_INLINE FASTMLP_ACT_INLINE
#else
#define FASTMLP_ACT_INLINE inline
#define FASTMLP_DISPATCH_INLINE inline
#endif

namespace fastmlp {

// Roundings that must not depend on the compiler's context. nvcc leaves a
// `p - a * b` (or a product used by a later statement) as PTX mul/sub without
// a rounding mode, which ptxas may or may not fuse into one FFMA depending on
// scheduling: the same source in two kernels could then round differently.
// On the device these say which one is meant; on the host they are the plain
// expressions.
#if defined(__CUDA_ARCH__)
FASTMLP_HOSTDEV float mul_rn(float a, float b) { return __fmul_rn(a, b); }
// sqrtf follows nvcc's -prec-sqrt (approximate under --use_fast_math); this does not.
FASTMLP_HOSTDEV float sqrt_rn(float x) { return __fsqrt_rn(x); }
FASTMLP_HOSTDEV float sub_mul(float p, float a, float b) { return __fmaf_rn(-a, b, p); }
#else
FASTMLP_HOSTDEV float mul_rn(float a, float b) { return a * b; }
FASTMLP_HOSTDEV float sqrt_rn(float x) { return std::sqrt(x); }
FASTMLP_HOSTDEV float sub_mul(float p, float a, float b) { return p - a * b; }
#endif

// [issue 17] op(B)(p, j) scaled by DP-SGD's clip factor s[p] (GemmEpilogue::
// row_scale_k), rounded to float32 before the GEMM or the column sum uses it.
// On the host the callers keep the product from being fused into their sum:
// the GEMM stores it into its packed panel, the column sum is compiled with
// -ffp-contract=off (cpu/gemm_rowscale.cpp).
FASTMLP_HOSTDEV float row_scaled(float b, float s) { return mul_rn(b, s); }

// NaN and Inf propagate as in torch (issue 20: a comparison that is false for
// NaN must not turn a NaN into a number). Every ReLU of every kernel, scalar
// or vector, CPU or CUDA, is one of these two rules.

// torch.relu: x < 0 ? 0 : x, so relu(NaN) = NaN, relu(+Inf) = +Inf,
// relu(-Inf) = 0 and relu(-0) = -0 (the same as vmaxps(0, x) on x86).
FASTMLP_HOSTDEV float relu(float x) { return x < 0.0f ? 0.0f : x; }

// torch's threshold_backward(dy, y, 0): y <= 0 ? 0 : dy. The mask comes from
// the forward output y, so it needs no copy of the input; at y == 0 the
// gradient is 0, and where y is NaN the gradient dy passes (NaN stays visible).
FASTMLP_HOSTDEV float relu_grad(float dy, float y) { return y <= 0.0f ? 0.0f : dy; }

// 1 when x is NaN or +-Inf (its exponent bits all set), else 0: an integer
// test, so an OR over a loop vectorises (isfinite may not, and -ffast-math
// style flags could fold it away).
FASTMLP_HOSTDEV uint32_t nonfinite_bit(float x) {
    uint32_t u;
    std::memcpy(&u, &x, sizeof(u));
    return (~u & 0x7f800000u) == 0u ? 1u : 0u;
}

// max(a, b) that returns NaN when either is NaN (torch.max / np.maximum);
// fmaxf and std::max drop a NaN operand. On sm_80+ it is one instruction
// (max.NaN.f32; the compare-and-select costs registers in the softmax
// kernels). The two may differ only in the sign of a zero result (max of -0
// and +0), which the callers (a row max subtracted from the row) never see.
FASTMLP_HOSTDEV float max_nan(float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    float r;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
    return r;
#else
    return (a > b || a != a) ? a : b;
#endif
}

// ---- SGD (torch.optim.SGD, dampening = 0) ---------------------------------
//   g = grad + wd * p
//   buf = momentum * buf + g          (buf starts at 0, so the first step gives
//                                      buf = g exactly, as torch's clone does)
//   g = nesterov ? g + momentum * buf : buf
//   p = p - lr * g
struct SgdHyper {
    float lr;
    float momentum;
    float weight_decay;
    bool nesterov;
};

FASTMLP_ACT_INLINE void sgd_update(float& p, float g, float* buf, const SgdHyper& h) {
    if (h.weight_decay != 0.0f) g = g + h.weight_decay * p;
    if (h.momentum != 0.0f) {
        float b = h.momentum * (*buf) + g;
        *buf = b;
        g = h.nesterov ? g + h.momentum * b : b;
    }
    p = sub_mul(p, h.lr, g);
}

// ---- Adam / AdamW (torch.optim.Adam / AdamW) --------------------------------
// torch computes the bias corrections in Python floats (double) and passes
// them to float32 tensor ops; adam_hyper does the same on the host.
struct AdamHyper {
    float beta1;
    float beta2;
    float weight_decay;
    float decay_factor;   // AdamW: 1 - lr * wd (applied to p first)
    bool decoupled;
    float one_minus_beta1;
    float one_minus_beta2;
    float step_size;      // lr / (1 - beta1^step) * sqrt(1 - beta2^step)
    float eps_scaled;     // eps * sqrt(1 - beta2^step)
};

inline AdamHyper adam_hyper(double lr, double beta1, double beta2, double eps,
                            double weight_decay, bool decoupled, int64_t step) {
    AdamHyper h;
    h.beta1 = static_cast<float>(beta1);
    h.beta2 = static_cast<float>(beta2);
    h.weight_decay = static_cast<float>(weight_decay);
    h.decay_factor = static_cast<float>(1.0 - lr * weight_decay);
    h.decoupled = decoupled;
    h.one_minus_beta1 = static_cast<float>(1.0 - beta1);
    h.one_minus_beta2 = static_cast<float>(1.0 - beta2);
    double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
    double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
    h.step_size = static_cast<float>(lr / bc1 * std::sqrt(bc2));
    h.eps_scaled = static_cast<float>(eps * std::sqrt(bc2));
    return h;
}

FASTMLP_ACT_INLINE void adam_update(float& p, float g, float& m, float& v, const AdamHyper& h) {
    if (h.weight_decay != 0.0f) {
        if (h.decoupled) p = mul_rn(p, h.decay_factor);   // AdamW: p.mul_(1 - lr*wd)
        else g = g + h.weight_decay * p;            // Adam: grad.add(p, alpha=wd)
    }
    m = m + h.one_minus_beta1 * (g - m);            // exp_avg.lerp_(grad, 1-beta1)
    v = v * h.beta2 + h.one_minus_beta2 * g * g;    // exp_avg_sq.mul_(b2).addcmul_(g, g, 1-b2)
    // torch: denom = sqrt(v) / sqrt(bc2) + eps; p.addcdiv_(m, denom, -lr / bc1).
    // The same update with sqrt(bc2) moved into the host-side constants, one
    // division per element instead of two (the divider is what bounds this loop
    // on CPUs: 1.5x faster on Zen 4); a few ulp from torch's rounding, as its
    // own foreach/fused variants are (tests/test_optim.py holds the bound).
    p = p + (-h.step_size) * m / (sqrtf(v) + h.eps_scaled);
}

// ---- RMSprop (torch.optim.RMSprop) -------------------------------------------
// torch's single-tensor path, float32 op for op as its vectorised CPU kernels
// round (verified bit for bit against torch 2.x on the CPU, with torch's own
// sqrt; torch's vectorised CPU sqrt is not always correctly rounded, so torch
// itself differs from this rule by 1 ulp of sqrt in places):
//   g = g + wd * p                      grad.add(p, alpha=wd): vec::fmadd
//   sq = sq * alpha + ((1-alpha) g) g   square_avg.mul_(alpha).addcmul_(g, g, 1-alpha):
//                                       the addcmul is fmadd(value * g, g, sq)
//   centered: gavg = lerp(gavg, g, w = 1-alpha): w < 0.5: fma(w, g - gavg, gavg),
//             else fma(w - 1, g - gavg, g) (torch's lerp_vec)
//             avg = sqrt(sq - gavg * gavg) + eps   (addcmul(gavg, gavg, value=-1))
//   else      avg = sqrt(sq) + eps
//   momentum > 0: buf = buf * momentum + g / avg; p = p - lr * buf  (add_(buf, alpha=-lr): fmadd)
//   else          p = p + (-lr * g) / avg         (addcdiv_(g, avg, value=-lr))
// Every multiply-add is an explicit fma or an explicit rounding, so the CPU
// (any SIMD width) and the GPU compute the same floats.
FASTMLP_ACT_INLINE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
    return __fmaf_rn(a, b, c);
#else
    return std::fma(a, b, c);
#endif
}

struct RmspropHyper {
    float lr;
    float alpha;
    float one_minus_alpha;
    float eps;
    float weight_decay;
    float momentum;
    bool centered;
};

// The scalars as torch passes them to its float32 ops: each Python float (double)
// rounded to float once, 1 - alpha computed in double first.
inline RmspropHyper rmsprop_hyper(double lr, double alpha, double eps, double weight_decay,
                                  double momentum, bool centered) {
    RmspropHyper h;
    h.lr = static_cast<float>(lr);
    h.alpha = static_cast<float>(alpha);
    h.one_minus_alpha = static_cast<float>(1.0 - alpha);
    h.eps = static_cast<float>(eps);
    h.weight_decay = static_cast<float>(weight_decay);
    h.momentum = static_cast<float>(momentum);
    h.centered = centered;
    return h;
}

// buf is read only when h.momentum != 0, gavg only when h.centered (null otherwise).
FASTMLP_ACT_INLINE void rmsprop_update(float& p, float g, float& sq, float* buf, float* gavg,
                                    const RmspropHyper& h) {
    if (h.weight_decay != 0.0f) g = fma_rn(p, h.weight_decay, g);
    sq = fma_rn(mul_rn(h.one_minus_alpha, g), g, mul_rn(sq, h.alpha));
    float avg;
    if (h.centered) {
        const float w = h.one_minus_alpha;
        const float d = g - *gavg;
        const float ga = w < 0.5f ? fma_rn(w, d, *gavg) : fma_rn(w - 1.0f, d, g);
        *gavg = ga;
        avg = sqrtf(fma_rn(-ga, ga, sq)) + h.eps;
    } else {
        avg = sqrtf(sq) + h.eps;
    }
    if (h.momentum != 0.0f) {
        // buf * momentum rounded on its own, as torch's mul_: written as an fma
        // with a -0 addend (exactly the rounded product, -0 included) because
        // GCC would contract a plain product into an fma with the sum below.
        const float b = fma_rn(*buf, h.momentum, -0.0f) + g / avg;
        *buf = b;
        p = fma_rn(b, -h.lr, p);
    } else {
        p = p + mul_rn(-h.lr, g) / avg;
    }
}

// ---- The gradient transform before an optimizer's own rule ------------------
// Applied to each gradient element, in this order (w = the parameter before
// the update):
//   g = fma(std, z_e, g)                 (DP-SGD noise, e = noise.offset + i, z_e =
//                                         gaussian_noise(e, *noise.step, key): one rounding)
//   g = g + l1 * sign(w)                 (Keras l1 kernel regularizer; sign(0) = 0,
//                                         sign(NaN) = NaN)
//   g = g + (2 * l2) * w                 (l2 regularizer; one fma: a single rounding)
//   g = g * (*scale)                     (clip by norm: grad_clip_scale's result)
//   g = min(max(g, -clipvalue), clipvalue) when clipvalue > 0 (NaN stays NaN, as
//                                         torch's clamp_ in clip_grad_value_)
// Each step is skipped when its parameter is 0 / null. When penalty != null,
// *penalty = l1 * sum|w| + l2 * sum w^2 over the pre-update w, in double:
// written, not accumulated; the partial sums are taken in a fixed order that
// does not depend on the thread count (CPU: fixed blocks of the array; CUDA:
// per-block partials in work, finished by penalty_finish in optim_loops.cuh).
// Gaussian noise added to the gradient before the optimizer's rule (DP-SGD,
// issue 17): element i of a call gets std * gaussian_noise(offset + i, *step,
// key0, key1) (below). std and step are read by the kernel (device memory on
// CUDA), so the engine's CUDA Graph replays with the current step and the
// noise scale it computed; the stream index offset + i is the element's index
// in the model's flat parameters, so a parameter segment updated by its own
// call draws the same numbers as the whole array in one call.
struct NoiseSpec {
    const float* std = nullptr;     // 1 float (device memory on CUDA): the standard deviation; null = no noise
    uint32_t key0 = 0, key1 = 0;    // noise_key(seed)
    const int64_t* step = nullptr;  // the step counter (device memory on CUDA): the engine passes &state->rng_step
    int64_t offset = 0;             // stream index of this call's element 0 (the element's index in the model's flat parameters)
};

struct GradTransform {
    NoiseSpec noise;               // first: g = fma(std, z, g); noise.std null = none
    float l1 = 0.0f, l2 = 0.0f;
    const float* scale = nullptr;  // one float (device memory on CUDA), or null
    float clipvalue = 0.0f;
    double* penalty = nullptr;     // one double (device memory on CUDA), or null
    double* work = nullptr;        // CUDA: optimizer_work_doubles() doubles; CPU: ignored
    FASTMLP_HOSTDEV bool any() const {
        return noise.std || l1 != 0.0f || l2 != 0.0f || scale || clipvalue > 0.0f || penalty;
    }
};

// The steps of the transform, one definition each (transform_grad and
// transform_grad_fixed below run the same ones).
FASTMLP_ACT_INLINE float l1_grad_step(float g, float w, float l1) {
    return g + (w > 0.0f ? l1 : w < 0.0f ? -l1 : (w == w ? 0.0f : w));
}
FASTMLP_ACT_INLINE float l2_grad_step(float g, float w, float l2) { return fma_rn(2.0f * l2, w, g); }
FASTMLP_ACT_INLINE float clipvalue_step(float g, float c) { return g < -c ? -c : (g > c ? c : g); }

FASTMLP_ACT_INLINE float noise_grad_step(float g, float noise_std, float z) {
    return fma_rn(noise_std, z, g);
}

// The transformed gradient of one element; `scale` is *t.scale read once by
// the caller (1 when t.scale is null: g * 1 == g exactly); noise_std
// (*t.noise.std, read once) and z (the element's gaussian_noise) are read only
// when t.noise.std is not null.
// The steps after the noise (a loop that applied the noise itself calls this).
FASTMLP_HOSTDEV float transform_grad_after_noise(float g, float w, const GradTransform& t,
                                                 float scale) {
    if (t.l1 != 0.0f) g = l1_grad_step(g, w, t.l1);
    if (t.l2 != 0.0f) g = l2_grad_step(g, w, t.l2);
    g = mul_rn(g, scale);
    if (t.clipvalue > 0.0f) g = clipvalue_step(g, t.clipvalue);
    return g;
}

FASTMLP_HOSTDEV float transform_grad(float g, float w, const GradTransform& t, float scale,
                                     float noise_std, float z) {
    if (t.noise.std) g = noise_grad_step(g, noise_std, z);
    return transform_grad_after_noise(g, w, t, scale);
}

// transform_grad with its steps fixed at compile time: the caller has tested
// kL1 == (t.l1 != 0), kL2 == (t.l2 != 0) and kClip == (t.clipvalue > 0) once
// for the whole loop, and gets the same floats. (The CPU loops: with the tests
// inside, GCC if-converts them into mask arithmetic on every vector, and the
// transformed Adam step took 2x the plain one.) The scale is applied as an fma
// with a -0 addend: exactly the rounded product mul_rn(g, scale), -0 included,
// but not a product the compiler may contract into the update's own
// a * b + c (without the runtime test in between, GCC fused g * scale into
// SGD's momentum * buf + g instead of momentum * buf, another rounding).
// kNoise == (t.noise.std != null): the noise step first, with noise_std and z
// as transform_grad's. (The CPU loops of optim.cpp run the noise step in
// their chunk's noise loop instead and call this with kNoise false: the same
// floats, one fma, in the order above.)
template <bool kL1, bool kL2, bool kClip, bool kNoise = false>
FASTMLP_ACT_INLINE float transform_grad_fixed(float g, float w, const GradTransform& t, float scale,
                                              float noise_std = 0.0f, float z = 0.0f) {
    if (kNoise) g = noise_grad_step(g, noise_std, z);
    if (kL1) g = l1_grad_step(g, w, t.l1);
    if (kL2) g = l2_grad_step(g, w, t.l2);
    g = fma_rn(g, scale, -0.0f);
    if (kClip) g = clipvalue_step(g, t.clipvalue);
    return g;
}

// ---- Clip by norm (grad_clip_scale) -------------------------------------------
// One element's regularized gradient g + l1 sign(w) + 2 l2 w in double. The
// product (2 l2) w of two floats is exact in double, so an fma here or not
// gives the same value.
// kL1 / kL2: whether the l1 / l2 terms run, fixed at compile time by a CPU loop
// that tested l1 != 0 / l2 != 0 once (the tests inside the loop cost it half its
// speed); clip_regularized_grad below is the same with the tests per element.
template <bool kL1, bool kL2>
FASTMLP_ACT_INLINE double clip_regularized_grad_fixed(float g, float w, float l1, float l2) {
    double r = static_cast<double>(g);
    if (kL1) r += (w > 0.0f ? l1 : w < 0.0f ? -l1 : (w == w ? 0.0f : w));
    if (kL2) r += static_cast<double>(2.0f * l2) * static_cast<double>(w);
    return r;
}
FASTMLP_HOSTDEV double clip_regularized_grad(float g, float w, float l1, float l2) {
    if (l1 != 0.0f) {
        return l2 != 0.0f ? clip_regularized_grad_fixed<true, true>(g, w, l1, l2)
                          : clip_regularized_grad_fixed<true, false>(g, w, l1, l2);
    }
    return l2 != 0.0f ? clip_regularized_grad_fixed<false, true>(g, w, l1, l2)
                      : clip_regularized_grad_fixed<false, false>(g, w, l1, l2);
}

// r * r rounded on its own (no fma with the sum it is added to), on both devices.
FASTMLP_HOSTDEV double square_rn(double r) {
#if defined(__CUDA_ARCH__)
    return __dmul_rn(r, r);
#else
    return r * r;
#endif
}

// The scale for a sum of squares s: min(1, max_norm / (sqrt(s) + 1e-6)) in
// double, rounded to float (torch.nn.utils.clip_grad_norm_'s clip coefficient).
// A NaN sum gives a NaN scale (the gradients become NaN, as in torch).
FASTMLP_HOSTDEV float clip_scale_value(double s, float max_norm) {
    const double c = static_cast<double>(max_norm) / (sqrt(s) + 1e-6);
    return static_cast<float>(c > 1.0 ? 1.0 : c);
}

// ---- DP-SGD per-example norms (dp_row_sqnorms, dp_clip_factors) ---------------
// Double sums and products rounded one operation at a time on both devices:
// nvcc (and a host compiler targeting FMA) may otherwise fuse a * b + c, and the
// CPU and the GPU would round the row's value differently.
#if defined(__CUDA_ARCH__)
FASTMLP_HOSTDEV double dmul_rn(double a, double b) { return __dmul_rn(a, b); }
FASTMLP_HOSTDEV double dadd_rn(double a, double b) { return __dadd_rn(a, b); }
#else
FASTMLP_HOSTDEV double dmul_rn(double a, double b) { return a * b; }
FASTMLP_HOSTDEV double dadd_rn(double a, double b) { return a + b; }
#endif

// The lanes of a row's sum of squares: column c goes to lane c % 32 (the CUDA
// kernel's warp lanes); each lane sums in column order, then the lanes are added
// as __shfl_xor_sync's butterfly adds them (offsets 16, 8, 4, 2, 1), so the CPU
// and the GPU get the same double bit for bit. The square of a float is exact in
// double, so a fused multiply-add in the lane sums changes nothing.
constexpr int kDpLanes = 32;

// One Dense layer's contribution to example r's squared gradient norm, given
// sx = ||x_r||^2 and sdz = ||dz_r||^2 (doubles): the weight gradient x_r dz_r^T
// has ||.||_F^2 = sx * sdz and the bias gradient dz_r adds sdz ("ghost norm").
// prev (the running sum of the earlier layers, or 0) + (sx + bias) * sdz in
// double, rounded to float once.
FASTMLP_HOSTDEV float dp_row_sqnorm_value(double sx, double sdz, bool bias, float prev) {
    const double w = bias ? dadd_rn(sx, 1.0) : sx;
    return static_cast<float>(dadd_rn(static_cast<double>(prev), dmul_rn(w, sdz)));
}

// The per-row gradient scale of DP-SGD from the row's squared norm acc (of the
// gradient times 1 / grad_scale): norm = grad_scale * sqrt(acc), the clip factor
// c = min(1, clip / (norm + 1e-6)) (Opacus), and the scale c * grad_scale / divisor,
// in double, rounded to float. A NaN acc gives NaN (c > 1 is false for NaN).
FASTMLP_HOSTDEV float dp_clip_factor_value(float acc, float clip, float grad_scale,
                                           float divisor) {
    const double gs = static_cast<double>(grad_scale);
    const double norm = dmul_rn(gs, sqrt(static_cast<double>(acc)));
    double c = static_cast<double>(clip) / dadd_rn(norm, 1e-6);
    c = c > 1.0 ? 1.0 : c;
    return static_cast<float>(dmul_rn(c, gs) / static_cast<double>(divisor));
}

// The noise standard deviation DP-SGD adds to the summed clipped gradient, in
// the units of the scaled one: noise_multiplier * clip / divisor.
FASTMLP_HOSTDEV float dp_noise_std_value(float noise_multiplier, float clip, float divisor) {
    return static_cast<float>(
        dmul_rn(static_cast<double>(noise_multiplier), static_cast<double>(clip)) /
        static_cast<double>(divisor));
}

// ---- exp for vectorised CPU loops --------------------------------------------
// std::exp is a library call the compiler cannot vectorise; this one is plain
// arithmetic, so a loop over it becomes SIMD code (16 lanes with AVX-512).
// Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r
// (relative error <= 2 ulp over the float range), times 2^n built in two
// power-of-two factors so results below FLT_MIN come out as IEEE denormals
// (flushed to zero in fastmlp's default CPU mode). exp(-inf) = 0,
// exp(x > 88.72) = +inf, exp(NaN) = NaN. CPU only (the CUDA kernels use expf).
FASTMLP_ACT_INLINE float exp_vec(float x) {
    const float xc = x < -104.0f ? -104.0f : (x > 88.8f ? 88.8f : x);  // NaN passes through
    const float t = xc * 1.44269504088896341f;
    const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (|t| < 2^22)
    float r = xc - n * 0.693359375f;                   // ln2 = 0.693359375 - 2.12194440e-4
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    const int32_t ni = static_cast<int32_t>(n);       // [-150, 129]
    const int32_t n1 = ni >> 1, n2 = ni - n1;          // each in [-75, 65]: a normal 2^k
    float s1, s2;
    const int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    std::memcpy(&s1, &b1, 4);
    std::memcpy(&s2, &b2, 4);
    const float y = (p * s1) * s2;
    return x > 88.72283935546875f ? INFINITY : y;
}

// log for vectorised CPU loops, the companion of exp_vec: Cephes' logf. x =
// 2^e m with m in [sqrt(1/2), sqrt(2)), log x = e ln2 + log m, log m by a
// degree-9 polynomial (relative error <= 2 ulp for normal x). log(0) = -inf,
// log(x < 0) = NaN, log(+inf) = +inf, log(NaN) = NaN; a denormal x is read as
// 0 (softmax sums are >= 1, the only use here). CPU only.
FASTMLP_ACT_INLINE float log_vec(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, 4);
    int32_t e = ((bits >> 23) & 0xff) - 126;                // x = 2^e * m, m in [0.5, 1)
    const int32_t mb = (bits & 0x007fffff) | 0x3f000000;
    float m;
    std::memcpy(&m, &mb, 4);
    const bool small = m < 0.707106781186547524f;           // m in [sqrt(1/2), sqrt(2))
    e -= small ? 1 : 0;
    m = (small ? m + m : m) - 1.0f;
    const float z = m * m;
    float p = 7.0376836292e-2f;
    p = p * m - 1.1514610310e-1f;
    p = p * m + 1.1676998740e-1f;
    p = p * m - 1.2420140846e-1f;
    p = p * m + 1.4249322787e-1f;
    p = p * m - 1.6668057665e-1f;
    p = p * m + 2.0000714765e-1f;
    p = p * m - 2.4999993993e-1f;
    p = p * m + 3.3333331174e-1f;
    const float fe = static_cast<float>(e);
    float y = p * m * z;
    y = y + fe * -2.12194440e-4f;
    y = y - 0.5f * z;
    y = m + y;
    y = y + fe * 0.693359375f;
    // Outside the normal range: +inf -> +inf, [0, FLT_MIN) -> -inf, < 0 or NaN -> NaN.
    // Blended as integers: a float select here made GCC branch (and not vectorise).
    float special = x == INFINITY ? INFINITY : -INFINITY;
    special = x >= 0.0f ? special : NAN;
    const int32_t keep = -static_cast<int32_t>((x >= 1.17549435e-38f) & (x < INFINITY));
    int32_t yb, sb;
    std::memcpy(&yb, &y, 4);
    std::memcpy(&sb, &special, 4);
    const int32_t rb = (yb & keep) | (sb & ~keep);
    float r;
    std::memcpy(&r, &rb, 4);
    return r;
}

// ---- Softmax cross-entropy ---------------------------------------------------
// Numerically stable: every exponent is z - max(z) <= 0, so exp never
// overflows for logits of +-1000, and log p = z - max - log(sum exp(z - max))
// is finite even where p underflows to 0 (a one-hot 0 times it stays 0).
FASTMLP_HOSTDEV float log_softmax_entry(float z, float row_max, float log_sum) {
    return (z - row_max) - log_sum;
}

// ---- Batch / layer normalisation (issue 15) ----------------------------------
// The statistics of n > 0 values x_i from the sums of d_i = x_i - shift in
// double: s1 = sum d_i, s2 = sum d_i^2. The shift is one of the values (the
// first row / column), so d is small where the data sit far from zero
// (x = 1000 + N(0, 1)) and sum d^2 / n - mean(d)^2 does not cancel away the
// variance; double sums keep the rounding of n terms far below float32's ulp.
// The biased variance (divide by n), as Keras and torch's normalisation.
struct NormStats {
    float mean, var, invstd;
};
FASTMLP_HOSTDEV NormStats norm_stats(double s1, double s2, float shift, int64_t n, float eps) {
    const double dn = static_cast<double>(n);
    const double md = s1 / dn;
    double var = s2 / dn - md * md;
    var = var < 0.0 ? 0.0 : var;  // rounding can leave -tiny; a NaN passes (false compare)
    NormStats s;
    s.mean = static_cast<float>(static_cast<double>(shift) + md);
    s.var = static_cast<float>(var);
    // 1 / sqrt, each correctly rounded (not rsqrt, whose rounding differs between
    // the CPU and the GPU's approximation): both backends get the same invstd.
    s.invstd = 1.0f / sqrtf(s.var + eps);
    return s;
}

// Keras' moving statistics: moving * momentum + batch * (1 - momentum), the two
// products rounded before the add on both backends (no FMA contraction on the GPU).
FASTMLP_HOSTDEV float moving_update(float moving, float batch, float momentum) {
    return mul_rn(moving, momentum) + mul_rn(batch, 1.0f - momentum);
}

// ---- Counter-based random numbers: Philox4x32-10 ---------------------------
// Salmon et al., "Parallel random numbers: as easy as 1, 2, 3" (SC'11), the
// generator cuRAND and JAX use. A pure function of (counter, key): any element
// of any epoch's stream is computed directly, in any order, on any device, so
// the CPU and the GPU draw the same numbers (tests/test_random.py checks the
// published known-answer vectors).
struct Philox4 {
    uint32_t v[4];
};

FASTMLP_HOSTDEV Philox4 philox4x32_10(Philox4 ctr, uint32_t k0, uint32_t k1) {
    constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
    constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
    for (int round = 0; round < 10; ++round) {
        const uint64_t p0 = static_cast<uint64_t>(kMul0) * ctr.v[0];
        const uint64_t p1 = static_cast<uint64_t>(kMul1) * ctr.v[2];
        const uint32_t hi0 = static_cast<uint32_t>(p0 >> 32), lo0 = static_cast<uint32_t>(p0);
        const uint32_t hi1 = static_cast<uint32_t>(p1 >> 32), lo1 = static_cast<uint32_t>(p1);
        ctr = Philox4{{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
        k0 += kWeyl0;  // the key schedule: a Weyl sequence, bumped between rounds
        k1 += kWeyl1;
    }
    return ctr;
}

// ---- Shuffling: a keyed pseudo-random permutation of [0, n) ----------------
// perm[i] = permute_index(i, key) for every i is a permutation, computed per
// element with no sort and no shared state: a balanced Feistel network over
// 2*half bits (2^(2*half) >= n; any Feistel network is a bijection whatever
// its round function), whose round function is Philox of (right half, round)
// under the epoch's key, then cycle-walking: an index that lands outside
// [0, n) is encrypted again until it lands inside. The walk stays on the
// cycle of i, which contains i itself, so it ends; the domain is < 4n, so it
// takes < 4 encryptions on average. Four rounds with a pseudo-random round
// function make a pseudo-random permutation (Luby-Rackoff) -- plenty for the
// order of SGD batches.
struct PermKey {
    uint64_t n;
    uint32_t k0, k1;
    int half_bits;
};

// The permutation of [0, n) numbered `counter` (fit uses the epoch count) of
// the stream `seed`.
inline PermKey perm_key(uint64_t n, uint64_t seed, uint64_t counter) {
    // The epoch's key: Philox of the counter under the seed (a fixed tag in
    // v[2] keeps this stream apart from other uses of the same seed).
    const Philox4 k = philox4x32_10(
        Philox4{{static_cast<uint32_t>(counter), static_cast<uint32_t>(counter >> 32),
                 0x5348554Fu /* "SHUF" */, 0u}},
        static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    int bits = 0;
    while (bits < 64 && (uint64_t{1} << bits) < n) ++bits;
    PermKey key;
    key.n = n;
    key.k0 = k.v[0];
    key.k1 = k.v[1];
    key.half_bits = bits < 2 ? 1 : (bits + 1) / 2;  // n <= 2^62: half_bits <= 31
    return key;
}

FASTMLP_HOSTDEV uint64_t feistel_encrypt(uint64_t x, const PermKey& key) {
    const uint32_t mask = (uint32_t{1} << key.half_bits) - 1u;
    uint32_t left = static_cast<uint32_t>(x >> key.half_bits) & mask;
    uint32_t right = static_cast<uint32_t>(x) & mask;
    for (uint32_t round = 0; round < 4; ++round) {
        const uint32_t f = philox4x32_10(Philox4{{right, round, 0u, 0u}}, key.k0, key.k1).v[0];
        const uint32_t next = left ^ (f & mask);
        left = right;
        right = next;
    }
    return (static_cast<uint64_t>(left) << key.half_bits) | right;
}

// The position-i element of the permutation; i < key.n.
FASTMLP_HOSTDEV uint64_t permute_index(uint64_t i, const PermKey& key) {
    uint64_t x = i;
    do {
        x = feistel_encrypt(x, key);
    } while (x >= key.n);
    return x;
}

// ---- Activations (issue 15) --------------------------------------------------
// The elementwise activations of Dense(activation=...) and fm.Activation, by
// code (the same numbers in fastmlp/layers.py ACTIVATION_CODES). Softmax is
// not elementwise: it lives in the softmax-cross-entropy kernels.
enum ActCode : int32_t {
    kActLinear = 0,
    kActRelu = 1,
    kActSigmoid = 2,
    kActTanh = 3,
    kActGelu = 4,       // exact: 0.5 x (1 + erf(x / sqrt 2)) (torch / Keras 3 default)
    kActSilu = 5,       // x sigmoid(x) (= swish)
    kActElu = 6,        // alpha 1: x > 0 ? x : expm1(x)
    kActSoftplus = 7,   // log(1 + exp(x)), computed stably
    kActLeakyRelu = 8,  // x > 0 ? x : 0.2 x (Keras' default slope)
    kNumActs = 9
};
constexpr float kLeakySlope = 0.2f;

// Whether the derivative needs the pre-activation z (gelu, silu, softplus);
// the others are computed from the output y = act(z), which the next layer
// reads anyway, so nothing extra is stored for them.
FASTMLP_HOSTDEV constexpr bool act_needs_input(int act) {
    return act == kActGelu || act == kActSilu || act == kActSoftplus;
}

// A lambda's body inlined into its caller (with_act's callers are CPU loops
// whose SIMD clones must see one straight-line body: a lambda left out of line
// is compiled for the baseline ISA and the loop runs 3.5x slower).
#if defined(__GNUC__) && !defined(__CUDACC__)
#define FASTMLP_ALWAYS_INLINE_LAMBDA __attribute__((always_inline))
#else
#define FASTMLP_ALWAYS_INLINE_LAMBDA
#endif

// From a run-time code to a compiled variant, in one place for every launcher
// and CPU loop. with_act(act, f) returns f(ActTag<A>{}) for the code (linear
// for any other value: callers check the code first). with_act_grad(act,
// from_input, f) returns f(ActTag<A>{}, std::bool_constant<kFromInput>{}),
// with kFromInput true for the codes whose derivative needs the input (gelu,
// silu, softplus), false for linear (it reads nothing), else from_input.
template <int A>
using ActTag = std::integral_constant<int, A>;

template <class F>
FASTMLP_DISPATCH_INLINE decltype(auto) with_act(int act, F&& f) {
    switch (act) {
        case kActRelu: return f(ActTag<kActRelu>{});
        case kActSigmoid: return f(ActTag<kActSigmoid>{});
        case kActTanh: return f(ActTag<kActTanh>{});
        case kActGelu: return f(ActTag<kActGelu>{});
        case kActSilu: return f(ActTag<kActSilu>{});
        case kActElu: return f(ActTag<kActElu>{});
        case kActSoftplus: return f(ActTag<kActSoftplus>{});
        case kActLeakyRelu: return f(ActTag<kActLeakyRelu>{});
        default: return f(ActTag<kActLinear>{});
    }
}

template <class F>
FASTMLP_DISPATCH_INLINE decltype(auto) with_act_grad(int act, bool from_input, F&& f) {
    return with_act(act, [&](auto tag) FASTMLP_ALWAYS_INLINE_LAMBDA -> decltype(auto) {
        constexpr int A = decltype(tag)::value;
        if (A == kActLinear) return f(tag, std::false_type{});
        if (act_needs_input(A) || from_input) return f(tag, std::true_type{});
        return f(tag, std::false_type{});
    });
}

// The transcendental building blocks. On the device: CUDA's libdevice
// functions (<= 2 ulp). On the host: branch-free versions built on exp_vec /
// log_vec (plain arithmetic and selects, so the CPU loops over them become
// SIMD code; libm's calls would keep every activation loop scalar). Their
// accuracy, measured against double-precision libm over the float range
// (tests/test_activations.py holds the kernels to it through the reference):
//   act_expf   exp_vec                          <= 2 ulp
//   act_expm1f Kahan's expm1 from exp_vec/log_vec   <= 3 ulp (relative, also near 0)
//   act_log1pf Kahan's log1p from log_vec        <= 3 ulp
//   act_tanhf  Cephes tanhf: odd polynomial for |x| < 0.625, else 1 - 2 / (e^2|x| + 1)
//                                                 <= 2 ulp
//   act_erff   |x| < 1: x P(x^2) (degree 5, fitted here); else 1 - erfc(|x|),
//              erfc = e^(-x^2) / x R(1/x^2) (Cephes' erfcf coefficients)
//                                                 <= 3 ulp of erf (absolute ~1e-7 near +-1)
#if defined(__CUDA_ARCH__)
FASTMLP_HOSTDEV float act_expf(float x) { return expf(x); }
FASTMLP_HOSTDEV float act_expm1f(float x) { return expm1f(x); }
FASTMLP_HOSTDEV float act_log1pf(float x) { return log1pf(x); }
FASTMLP_HOSTDEV float act_tanhf(float x) { return tanhf(x); }
FASTMLP_HOSTDEV float act_erff(float x) { return erff(x); }
#else
FASTMLP_ACT_INLINE float act_expf(float x) { return exp_vec(x); }

// expm1(x) = (u - 1) x / log u with u = e^x rounded (Kahan): the rounding
// error of u cancels, so the result is accurate near 0 where u - 1 is not.
FASTMLP_ACT_INLINE float act_expm1f(float x) {
    const float u = exp_vec(x);
    const float um1 = u - 1.0f;
    const float l = log_vec(u);
    float r = um1 * (x / l);  // not (um1 * x) / l: that overflows for x > 84
    r = um1 == 0.0f ? x : r;          // |x| below half an ulp of 1 (and x = +-0)
    r = um1 == -1.0f ? -1.0f : r;     // x < -17: e^x is below half an ulp of 1
    return u == INFINITY ? INFINITY : r;  // x > 88.7 (log(inf) would give inf / inf)
}

// log1p(x) = log(u) x / (u - 1) with u = 1 + x rounded (Kahan), x > -1.
FASTMLP_ACT_INLINE float act_log1pf(float x) {
    const float u = 1.0f + x;
    const float um1 = u - 1.0f;
    const float r = log_vec(u) * x / um1;
    return um1 == 0.0f ? x : (u == INFINITY ? INFINITY : r);
}

FASTMLP_ACT_INLINE float act_tanhf(float x) {
    const float a = fabsf(x);  // tanh is odd: computed on |x|, the sign put back (-0 -> -0)
    const float s = a * a;
    float p = -5.70498872745e-3f;
    p = p * s + 2.06390887954e-2f;
    p = p * s - 5.37397155531e-2f;
    p = p * s + 1.33314422036e-1f;
    p = p * s - 3.33332819422e-1f;
    const float small = p * s * a + a;
    const float e = exp_vec(a + a);  // +inf for |x| > 44: then 1 - 0 = 1
    const float big = 1.0f - 2.0f / (e + 1.0f);
    return copysignf(a < 0.625f ? small : big, x);  // NaN takes `small` (NaN)
}

FASTMLP_ACT_INLINE float act_erff(float x) {
    const float a = fabsf(x);
    const float z = x * x;
    float p = -5.6541059e-4f;  // erf(x) / x on [0, 1] in z = x^2, least squares on
    p = p * z + 4.9232775e-3f; // Chebyshev nodes: <= 2.4 ulp in float32 Horner
    p = p * z - 2.6716385e-2f;
    p = p * z + 1.1280365e-1f;
    p = p * z - 3.7612349e-1f;
    p = p * z + 1.1283791e+0f;
    const float small = x * p;
    const float q = 1.0f / a;
    const float y = q * q;
    float r1 = 2.326819970068386e-2f;  // erfc on [1, 2)
    r1 = r1 * y - 1.387039388740657e-1f;
    r1 = r1 * y + 3.687424674597105e-1f;
    r1 = r1 * y - 5.824733027278666e-1f;
    r1 = r1 * y + 6.210004621745983e-1f;
    r1 = r1 * y - 4.944515323274145e-1f;
    r1 = r1 * y + 3.404879937665872e-1f;
    r1 = r1 * y - 2.741127028184656e-1f;
    r1 = r1 * y + 5.638259427386472e-1f;
    float r2 = -1.047766399936249e1f;  // erfc on [2, inf)
    r2 = r2 * y + 1.297719955372516e1f;
    r2 = r2 * y - 7.495518717768503e0f;
    r2 = r2 * y + 2.921019019210786e0f;
    r2 = r2 * y - 1.015265279202700e0f;
    r2 = r2 * y + 4.218463358204948e-1f;
    r2 = r2 * y - 2.820767439740514e-1f;
    r2 = r2 * y + 5.641895067754075e-1f;
    const float erfc = exp_vec(-z) * q * (a < 2.0f ? r1 : r2);
    const float big = copysignf(1.0f - erfc, x);
    return a < 1.0f ? small : big;  // NaN takes `big` (NaN)
}
#endif

FASTMLP_ACT_INLINE float sigmoidf(float x) { return 1.0f / (1.0f + act_expf(-x)); }

// y = act(x). NaN propagates; +-Inf map to the function's limits.
template <int A>
FASTMLP_ACT_INLINE float act_forward(float x) {
    if (A == kActRelu) return relu(x);
    if (A == kActSigmoid) return sigmoidf(x);
    if (A == kActTanh) return act_tanhf(x);
    if (A == kActGelu) return 0.5f * x * (1.0f + act_erff(x * 0.70710678118654752f));
    if (A == kActSilu) return x * sigmoidf(x);
    if (A == kActElu) return x > 0.0f ? x : act_expm1f(x);
    // max(x, 0) + log1p(exp(-|x|)): no overflow for large x, exact 0-limit for x -> -inf
    if (A == kActSoftplus) return (x > 0.0f ? x : 0.0f) + act_log1pf(act_expf(-fabsf(x)));
    if (A == kActLeakyRelu) return x > 0.0f ? x : x * kLeakySlope;
    return x;  // linear
}

// dx = dy * act'(z) from the output y = act(z) (the codes act_needs_input is
// false for). The same expressions as torch's *_backward kernels.
template <int A>
FASTMLP_ACT_INLINE float act_grad_from_output(float dy, float y) {
    if (A == kActRelu) return relu_grad(dy, y);
    if (A == kActSigmoid) return dy * (1.0f - y) * y;
    if (A == kActTanh) return dy * (1.0f - y * y);
    // torch's elu_backward: y <= 0 ? dy (y + 1) : dy, so where y is NaN, dy passes
    if (A == kActElu) return y <= 0.0f ? dy * (y + 1.0f) : dy;
    if (A == kActLeakyRelu) return y > 0.0f ? dy : dy * kLeakySlope;
    return dy;  // linear
}

// dx = dy * act'(z) from the pre-activation z (every code).
template <int A>
FASTMLP_ACT_INLINE float act_grad_from_input(float dy, float z) {
    if (A == kActGelu) {
        const float cdf = 0.5f * (1.0f + act_erff(z * 0.70710678118654752f));
        const float pdf = act_expf(-0.5f * z * z) * 0.39894228040143268f;  // 1/sqrt(2 pi)
        return dy * (cdf + z * pdf);
    }
    if (A == kActSilu) {
        const float s = sigmoidf(z);
        return dy * (s * (1.0f + z * (1.0f - s)));
    }
    if (A == kActSoftplus) return dy * sigmoidf(z);
    return act_grad_from_output<A>(dy, act_forward<A>(z));
}

// ---- Dropout (issue 15) ---------------------------------------------------------
// Inverted dropout: element e of a (rows, cols) activation, e = row * cols +
// col, is kept when its 32 random bits are >= threshold (P(drop) =
// threshold / 2^32) and then scaled by `scale` = 1 / (1 - rate). The bits are
// Philox4x32-10 of (e / 4, step) under the layer's key, lane e % 4: a pure
// function of (seed, layer, step, e), so the backward pass regenerates the
// mask instead of storing it and the CPU and the GPU draw the same mask.
// `step` is the optimizer step number (the engines read it from device
// memory: it is never a launch argument, so CUDA Graphs replay).
struct DropoutSpec {
    uint32_t threshold = 0;         // 0: no dropout
    float scale = 1.0f;             // 1 / (1 - rate), rounded once from double
    uint32_t key0 = 0, key1 = 0;    // dropout_key(seed, layer)
    const int64_t* step = nullptr;  // the step number (device memory on CUDA)
};

// The key of layer `layer` of a model whose seed is `seed` (a tag in v[2]
// keeps this stream apart from the shuffling's).
inline void dropout_key(uint64_t seed, uint64_t layer, uint32_t* k0, uint32_t* k1) {
    const Philox4 k = philox4x32_10(
        Philox4{{static_cast<uint32_t>(layer), static_cast<uint32_t>(layer >> 32),
                 0x44524F50u /* "DROP" */, 0u}},
        static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    *k0 = k.v[0];
    *k1 = k.v[1];
}

// The four words of counter block `block` at step `step`: the counter is (block,
// step) as four 32-bit words (dropout's mask bits and DP-SGD's noise draw from it).
FASTMLP_ACT_INLINE Philox4 philox_block(uint64_t block, uint64_t step, uint32_t k0, uint32_t k1) {
    return philox4x32_10(
        Philox4{{static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                 static_cast<uint32_t>(step), static_cast<uint32_t>(step >> 32)}},
        k0, k1);
}

FASTMLP_HOSTDEV uint32_t dropout_bits(uint64_t e, uint64_t step, uint32_t k0, uint32_t k1) {
    return philox_block(e >> 2, step, k0, k1).v[e & 3u];
}

// The multiplier of element e: 0 (dropped) or scale (kept). Applied as t * m,
// forward and backward, as torch's `x * mask * scale` (a NaN stays NaN even
// where the element is dropped).
FASTMLP_HOSTDEV float dropout_multiplier(uint64_t e, uint64_t step, uint32_t threshold,
                                         float scale, uint32_t k0, uint32_t k1) {
    return dropout_bits(e, step, k0, k1) < threshold ? 0.0f : scale;
}

// ---- Gaussian noise (DP-SGD, issue 17) ------------------------------------------
// Standard normal number e of the stream (key, step): Philox4x32-10 of the
// counter (e >> 2 as two words, step as two words) under noise_key(seed)
// gives four 32-bit words v0..v3; Box-Muller turns (v0, v1) into z0, z1 and
// (v2, v3) into z2, z3; element e is lane e & 3. Like dropout's bits, a pure
// function of (seed, step, e): any element is computed directly, on any device.
//
// Every step below is an integer operation, an exact float operation, or an
// explicit fma_rn / mul_rn / sqrt_rn (correctly rounded on both devices), in a
// fixed order: the CPU (scalar or any SIMD width) and the GPU compute the same
// floats bit for bit. Accuracy against float64 Box-Muller of the same bits
// (fastmlp.reference.gaussian_noise, tests/test_noise.py): a few ulp.

// The key of the noise stream of `seed` (a tag in v[2] keeps it apart from
// the shuffling's and dropout's streams of the same seed).
inline void noise_key(uint64_t seed, uint32_t* k0, uint32_t* k1) {
    const Philox4 k = philox4x32_10(
        Philox4{{0u, 0u, 0x4E4F4953u /* "NOIS" */, 0u}},
        static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    *k0 = k.v[0];
    *k1 = k.v[1];
}

// [issue 18] The key of the adversarial attacks' random start (adv_init) of
// `seed`: the tag "ADVS" keeps it apart from the noise, dropout and shuffling
// streams of the same seed.
inline void adversarial_key(uint64_t seed, uint32_t* k0, uint32_t* k1) {
    const Philox4 k = philox4x32_10(
        Philox4{{0u, 0u, 0x41445653u /* "ADVS" */, 0u}},
        static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
    *k0 = k.v[0];
    *k1 = k.v[1];
}

FASTMLP_ACT_INLINE float bits_as_float(int32_t b) {
    float f;
    std::memcpy(&f, &b, 4);
    return f;
}
FASTMLP_ACT_INLINE int32_t float_as_bits(float f) {
    int32_t b;
    std::memcpy(&b, &f, 4);
    return b;
}

// The uniforms: u = ((bits >> 8) + 0.5) * 2^-24 = x * 2^-25 with the odd
// integer x = 2 (bits >> 8) + 1 in [1, 2^25): in (0, 1), never 0 or 1, so
// log u is finite and |z| <= sqrt(-2 ln 2^-25) = sqrt(2 ln 2^25) ~ 5.9. u needs
// 25 bits, one more than a float holds, so it is never formed as a float: the
// log and the angle below reduce the integer x exactly.
FASTMLP_ACT_INLINE int32_t noise_uniform_odd(uint32_t bits) {
    return static_cast<int32_t>(((bits >> 8) << 1) | 1u);
}

// -2 log u of u = x * 2^-25 (x odd in [1, 2^25)). x = 2^k (1 + f) with
// 1 + f in [sqrt(1/2), sqrt(2)): k from the exponent of float(x) (rounded:
// only where to cut), then f = (x - 2^k) * 2^-k exactly, since
// |x - 2^k| < 0.42 * 2^k <= 2^24 is an integer a float holds. log u =
// (k - 25) ln 2 + log(1 + f), log(1 + f) = f - f^2/2 + f^3 P(f) with Cephes'
// logf polynomial (log_vec's), ln 2 split in two so (k - 25) ln 2 is exact to
// float precision. Relative error a few ulp; near u = 1 (k = 25) log u =
// log(1 + f) with f exact keeps its relative accuracy (no 1 - u cancellation).
FASTMLP_ACT_INLINE float noise_minus_2log(int32_t x) {
    const float xf = static_cast<float>(x);
    const int32_t xb = float_as_bits(xf);
    int32_t k = ((xb >> 23) & 0xff) - 127;                   // 2^k <= xf < 2^(k+1)
    k += (xb & 0x007fffff) >= 0x3504f3 ? 1 : 0;              // mantissa >= sqrt(2): round k up
    const float f = mul_rn(static_cast<float>(x - (int32_t{1} << k)),
                           bits_as_float((127 - k) << 23));  // * 2^-k, exact
    float p = 7.0376836292e-2f;
    p = fma_rn(p, f, -1.1514610310e-1f);
    p = fma_rn(p, f, 1.1676998740e-1f);
    p = fma_rn(p, f, -1.2420140846e-1f);
    p = fma_rn(p, f, 1.4249322787e-1f);
    p = fma_rn(p, f, -1.6668057665e-1f);
    p = fma_rn(p, f, 2.0000714765e-1f);
    p = fma_rn(p, f, -2.4999993993e-1f);
    p = fma_rn(p, f, 3.3333331174e-1f);
    const float ff = mul_rn(f, f);
    const float fe = static_cast<float>(k - 25);
    float y = mul_rn(mul_rn(p, f), ff);                      // f^3 P(f)
    y = fma_rn(fe, -2.12194440e-4f, y);                      // ln 2 = 0.693359375 - 2.12194440e-4
    y = fma_rn(-0.5f, ff, y);
    y = f + y;
    y = fma_rn(fe, 0.693359375f, y);                         // log u < 0
    return -2.0f * y;                                        // exact
}

// cos and sin of the angle 2 pi x / 2^25 (x odd in [1, 2^25)), reduced in
// turns, exactly: the top two bits of x are the quadrant q, the rest the
// offset into it, recentred to [-1/8, 1/8) turn (q + 1 past the middle) as the
// integer s, |s| <= 2^22, t = s * 2^-25 exact. Then sin(2 pi t) = t S(t^2)
// and cos(2 pi t) = C(t^2) (|2 pi t| <= pi / 4), polynomials fitted here
// (weighted least squares on Chebyshev nodes, coefficients rounded to float
// with the leading one fixed): <= 1.6 ulp in float Horner over every t, and
// the quadrant rotates (c, s) exactly.
FASTMLP_ACT_INLINE void noise_cos_sin(int32_t x, float* c, float* s) {
    int32_t q = x >> 23;                                     // quadrant 0..3
    int32_t r = x & 0x7fffff;                                // offset in the quadrant, 2^23 = 1/4 turn
    const int32_t past = r >= 0x400000 ? 1 : 0;              // past 1/8 turn: next quadrant, r - 1/4
    q = (q + past) & 3;
    r -= past << 23;
    const float t = mul_rn(static_cast<float>(r), 2.98023223876953125e-8f);  // * 2^-25, exact
    const float tt = mul_rn(t, t);
    float ps = -76.745f;
    ps = fma_rn(ps, tt, 81.62497f);
    ps = fma_rn(ps, tt, -41.34186f);
    ps = fma_rn(ps, tt, 6.2831855f);
    const float sn = mul_rn(t, ps);
    float pc = 59.22924f;
    pc = fma_rn(pc, tt, -85.44324f);
    pc = fma_rn(pc, tt, 64.93932f);
    pc = fma_rn(pc, tt, -19.739208f);
    const float cs = fma_rn(pc, tt, 1.0f);
    // (cos, sin) of q quarter turns + t: q = 1: (-sn, cs), 2: (-cs, -sn), 3: (sn, -cs).
    const float a = (q & 1) ? sn : cs, b = (q & 1) ? cs : sn;
    *c = (q == 1 || q == 2) ? -a : a;
    *s = (q >= 2) ? -b : b;
}

// Box-Muller of two words: z0 = r cos(2 pi u2), z1 = r sin(2 pi u2), r = sqrt(-2 log u1).
FASTMLP_ACT_INLINE void box_muller(uint32_t v1, uint32_t v2, float* z0, float* z1) {
    const float r = sqrt_rn(noise_minus_2log(noise_uniform_odd(v1)));
    float c, s;
    noise_cos_sin(noise_uniform_odd(v2), &c, &s);
    *z0 = mul_rn(r, c);
    *z1 = mul_rn(r, s);
}

// The four normals of counter block `block` (elements 4 block .. 4 block + 3).
FASTMLP_ACT_INLINE void gaussian_noise4(uint64_t block, uint64_t step, uint32_t k0, uint32_t k1,
                                     float z[4]) {
    const Philox4 r = philox_block(block, step, k0, k1);
    box_muller(r.v[0], r.v[1], &z[0], &z[1]);
    box_muller(r.v[2], r.v[3], &z[2], &z[3]);
}

// Standard normal number e of the stream (step, key): lane e & 3 of block e >> 2,
// the same float as gaussian_noise4's. Only the lane's Box-Muller pair is
// computed, and the words are picked by selects (an array indexed by e & 3
// would live in local memory on the GPU).
FASTMLP_HOSTDEV float gaussian_noise(uint64_t e, uint64_t step, uint32_t k0, uint32_t k1) {
    const uint64_t block = e >> 2;
    const Philox4 r = philox_block(block, step, k0, k1);
    const bool second = (e & 2u) != 0;
    float z0, z1;
    box_muller(second ? r.v[2] : r.v[0], second ? r.v[3] : r.v[1], &z0, &z1);
    return (e & 1u) ? z1 : z0;
}

// ---- Interpretability and adversarial examples (issue 18) -----------------------
// The per-element rules of target_seed, ig_interpolate, ig_accumulate, adv_init
// and adv_step (fastmlp.h states the contracts). Every product that must round
// on its own is a mul_rn, so nvcc cannot fuse it into an FMA with the add that
// follows; the CPU files are compiled with -ffp-contract=off for the same reason.
// ig_* and adv_* are exact float32 sequences: the CPU, the GPU and the NumPy
// reference (float32 arithmetic, correctly rounded) agree bit for bit, absent
// denormals (the CPU kernels flush them by default: cpu/fpenv.h).

// sigmoid'(z) = s(z) (1 - s(z)), computed as s(z) s(-z): 1 - s(z) cancels for
// z >~ 17 (s rounds to 1 and the product to 0), s(-z) = 1 / (1 + e^z) does not.
FASTMLP_ACT_INLINE float sigmoid_seed(float z) { return mul_rn(sigmoidf(z), sigmoidf(-z)); }

// d softmax(z)_t / d z_j = p_t ((j == t) - p_j): for j != t the difference is
// -p_j exactly, for j == t it is 1 - p_t (exact for p_t >= 1/2, Sterbenz), so
// the one rounding is the product's.
FASTMLP_HOSTDEV float softmax_seed(float p_t, float p_j, bool is_target) {
    return mul_rn(p_t, (is_target ? 1.0f : 0.0f) - p_j);
}

// Integrated gradients' path point: Captum's baseline + alpha (input - baseline),
// each operation rounded to float. Without a baseline (zeros): alpha (x - 0).
FASTMLP_HOSTDEV float ig_point(float x, const float* baseline, int64_t e, float alpha) {
    if (baseline == nullptr) return mul_rn(alpha, x - 0.0f);
    const float b = baseline[e];
    return b + mul_rn(alpha, x - b);
}

// One attribution from the weighted gradient sum s: (x - b) s with multiply
// (integrated gradients, gradient x input), s alone without (saliency); |.| with
// absolute.
FASTMLP_HOSTDEV float ig_attribution(float s, float x, const float* baseline, int64_t e,
                                     bool multiply, bool absolute) {
    const float a = multiply ? mul_rn(x - (baseline ? baseline[e] : 0.0f), s) : s;
    return absolute ? fabsf(a) : a;
}

// The first virtual row / image of a call (ig_interpolate / ig_accumulate): step *
// per_step, or `limit` (nothing to do) when the step lies outside [0, limit /
// per_step]; never overflows. step is read from memory by the kernels.
FASTMLP_HOSTDEV int64_t ig_first(int64_t step, int64_t per_step, int64_t limit) {
    if (step < 0 || (per_step > 0 && step > limit / per_step)) return limit;
    return step * per_step;
}

// torch.clamp(v, lo, hi) for lo <= hi: NaN stays NaN (both compares are false).
FASTMLP_HOSTDEV float adv_clamp(float v, float lo, float hi) {
    return v < lo ? lo : (v > hi ? hi : v);
}

// The random start's uniform in (-1, 1) from 32 random bits: (2 (bits >> 8) + 1)
// 2^-24 - 1 = k 2^-24 with the odd integer k = 2 (bits >> 8) + 1 - 2^24, |k| <
// 2^24: formed as an integer, then converted and scaled exactly (the 25-bit
// 2 (bits >> 8) + 1 itself does not fit a float). Never 0, symmetric about 0.
FASTMLP_HOSTDEV float adv_uniform(uint32_t bits) {
    const int32_t k = static_cast<int32_t>(((bits >> 8) << 1) | 1u) - (int32_t{1} << 24);
    return mul_rn(static_cast<float>(k), 5.9604644775390625e-8f);  // * 2^-24, exact
}

// torch.sign, except that NaN gives NaN (torch's CPU kernel gives 0): +1, -1,
// 0 for +-0 (+0, as torch).
FASTMLP_HOSTDEV float adv_sign(float g) {
    return g > 0.0f ? 1.0f : (g < 0.0f ? -1.0f : (g == g ? 0.0f : g));
}

// One FGSM / PGD step of an element (torchattacks): t = adv + alpha sign(g); with
// project, t = x + clamp(t - x, -eps, eps); then clamp(t, lo, hi).
FASTMLP_HOSTDEV float adv_step_value(float x, float adv, float g, float eps, float alpha,
                                     float lo, float hi, bool project) {
    float t = adv + mul_rn(alpha, adv_sign(g));  // alpha * sign is exact
    if (project) t = x + adv_clamp(t - x, -eps, eps);
    return adv_clamp(t, lo, hi);
}

}  // namespace fastmlp
