// The CPU Gaussian noise generator for AVX-512 (x86-64-v4): kernel_math.h's
// gaussian_noise4 on 16 counter blocks at once (64 normals per iteration), in
// structure-of-arrays form. Every scalar operation of kernel_math.h is
// transcribed one for one -- the same integer operations, the same correctly
// rounded float products, fmas, sums and square roots in the same order, the
// selects as mask blends -- so the results are bit-identical to the scalar
// code (and to the CUDA kernel); tests/test_noise.py checks it against the
// generic loop. Compiled with -mavx512f -mavx512vl -mavx512dq -mavx512bw and
// -ffp-contract=off (CMakeLists.txt); only run when the CPU reports AVX-512
// (cpu/noise.cpp).
#include "cpu/noise.h"

#ifdef FASTMLP_NOISE_AVX512
// GCC 12's intrinsics start from _mm512_undefined_*() (a self-initialised
// variable), which -Wmaybe-uninitialized reports at every inlined use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>

namespace fastmlp {
namespace cpu {
namespace {

#define FASTMLP_V inline __attribute__((always_inline))

FASTMLP_V __m512i set1(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
FASTMLP_V __m512 set1f(float x) { return _mm512_set1_ps(x); }
// a ^ b ^ c
FASTMLP_V __m512i xor3(__m512i a, __m512i b, __m512i c) {
    return _mm512_ternarylogic_epi32(a, b, c, 0x96);
}

// philox4x32_10 on 16 counters (v0 .. v3: the four words, lane by lane). The
// 32x32->64 products: vpmuludq multiplies the even u32 lanes; the odd lanes are
// shifted down to even positions and multiplied too; the high and low halves
// are then blended back into their lanes.
FASTMLP_V void philox16(__m512i& v0, __m512i& v1, __m512i& v2, __m512i& v3, uint32_t k0,
                        uint32_t k1) {
    constexpr uint32_t kMul0 = 0xD2511F53u, kMul1 = 0xCD9E8D57u;
    constexpr uint32_t kWeyl0 = 0x9E3779B9u, kWeyl1 = 0xBB67AE85u;
    constexpr __mmask16 kOdd = 0xAAAA;
    const __m512i m0 = set1(kMul0), m1 = set1(kMul1);
    for (int round = 0; round < 10; ++round) {
        const __m512i e0 = _mm512_mul_epu32(v0, m0);                        // even lanes' p0
        const __m512i o0 = _mm512_mul_epu32(_mm512_srli_epi64(v0, 32), m0);  // odd lanes' p0
        const __m512i e1 = _mm512_mul_epu32(v2, m1);
        const __m512i o1 = _mm512_mul_epu32(_mm512_srli_epi64(v2, 32), m1);
        const __m512i hi0 = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(e0, 32), o0);
        const __m512i lo0 = _mm512_mask_blend_epi32(kOdd, e0, _mm512_slli_epi64(o0, 32));
        const __m512i hi1 = _mm512_mask_blend_epi32(kOdd, _mm512_srli_epi64(e1, 32), o1);
        const __m512i lo1 = _mm512_mask_blend_epi32(kOdd, e1, _mm512_slli_epi64(o1, 32));
        const __m512i n0 = xor3(hi1, v1, set1(k0));
        const __m512i n2 = xor3(hi0, v3, set1(k1));
        v0 = n0;
        v1 = lo1;
        v2 = n2;
        v3 = lo0;
        k0 += kWeyl0;
        k1 += kWeyl1;
    }
}

// noise_uniform_odd: ((bits >> 8) << 1) | 1.
FASTMLP_V __m512i uniform_odd(__m512i bits) {
    return _mm512_or_si512(_mm512_slli_epi32(_mm512_srli_epi32(bits, 8), 1), set1(1u));
}

// noise_minus_2log, lane by lane.
FASTMLP_V __m512 minus_2log(__m512i x) {
    const __m512 xf = _mm512_cvtepi32_ps(x);
    const __m512i xb = _mm512_castps_si512(xf);
    __m512i k = _mm512_sub_epi32(_mm512_and_si512(_mm512_srai_epi32(xb, 23), set1(0xffu)),
                                 set1(127u));
    const __mmask16 up = _mm512_cmpge_epi32_mask(_mm512_and_si512(xb, set1(0x007fffffu)),
                                                 set1(0x3504f3u));
    k = _mm512_mask_add_epi32(k, up, k, set1(1u));
    const __m512 f = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_sub_epi32(x, _mm512_sllv_epi32(set1(1u), k))),
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_sub_epi32(set1(127u), k), 23)));
    __m512 p = set1f(7.0376836292e-2f);
    p = _mm512_fmadd_ps(p, f, set1f(-1.1514610310e-1f));
    p = _mm512_fmadd_ps(p, f, set1f(1.1676998740e-1f));
    p = _mm512_fmadd_ps(p, f, set1f(-1.2420140846e-1f));
    p = _mm512_fmadd_ps(p, f, set1f(1.4249322787e-1f));
    p = _mm512_fmadd_ps(p, f, set1f(-1.6668057665e-1f));
    p = _mm512_fmadd_ps(p, f, set1f(2.0000714765e-1f));
    p = _mm512_fmadd_ps(p, f, set1f(-2.4999993993e-1f));
    p = _mm512_fmadd_ps(p, f, set1f(3.3333331174e-1f));
    const __m512 ff = _mm512_mul_ps(f, f);
    const __m512 fe = _mm512_cvtepi32_ps(_mm512_sub_epi32(k, set1(25u)));
    __m512 y = _mm512_mul_ps(_mm512_mul_ps(p, f), ff);
    y = _mm512_fmadd_ps(fe, set1f(-2.12194440e-4f), y);
    y = _mm512_fmadd_ps(set1f(-0.5f), ff, y);
    y = _mm512_add_ps(f, y);
    y = _mm512_fmadd_ps(fe, set1f(0.693359375f), y);
    return _mm512_mul_ps(set1f(-2.0f), y);
}

// noise_cos_sin, lane by lane; the negations are sign-bit flips (as the
// scalar unary minus), under masks.
FASTMLP_V void cos_sin(__m512i x, __m512& c, __m512& s) {
    __m512i q = _mm512_srai_epi32(x, 23);
    __m512i r = _mm512_and_si512(x, set1(0x7fffffu));
    const __mmask16 past = _mm512_cmpge_epi32_mask(r, set1(0x400000u));
    q = _mm512_and_si512(_mm512_mask_add_epi32(q, past, q, set1(1u)), set1(3u));
    r = _mm512_mask_sub_epi32(r, past, r, set1(1u << 23));
    const __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(r), set1f(2.98023223876953125e-8f));
    const __m512 tt = _mm512_mul_ps(t, t);
    __m512 ps = set1f(-76.745f);
    ps = _mm512_fmadd_ps(ps, tt, set1f(81.62497f));
    ps = _mm512_fmadd_ps(ps, tt, set1f(-41.34186f));
    ps = _mm512_fmadd_ps(ps, tt, set1f(6.2831855f));
    const __m512 sn = _mm512_mul_ps(t, ps);
    __m512 pc = set1f(59.22924f);
    pc = _mm512_fmadd_ps(pc, tt, set1f(-85.44324f));
    pc = _mm512_fmadd_ps(pc, tt, set1f(64.93932f));
    pc = _mm512_fmadd_ps(pc, tt, set1f(-19.739208f));
    const __m512 cs = _mm512_fmadd_ps(pc, tt, set1f(1.0f));
    const __mmask16 odd = _mm512_test_epi32_mask(q, set1(1u));                          // q & 1
    const __mmask16 neg_c = _mm512_test_epi32_mask(_mm512_add_epi32(q, set1(1u)), set1(2u));  // q == 1 || q == 2
    const __mmask16 neg_s = _mm512_test_epi32_mask(q, set1(2u));                        // q >= 2
    const __m512i a = _mm512_castps_si512(_mm512_mask_blend_ps(odd, cs, sn));
    const __m512i b = _mm512_castps_si512(_mm512_mask_blend_ps(odd, sn, cs));
    const __m512i sign = set1(0x80000000u);
    c = _mm512_castsi512_ps(_mm512_mask_xor_epi32(a, neg_c, a, sign));
    s = _mm512_castsi512_ps(_mm512_mask_xor_epi32(b, neg_s, b, sign));
}

// box_muller of the words (w1, w2), lane by lane.
FASTMLP_V void box_muller16(__m512i w1, __m512i w2, __m512& z0, __m512& z1) {
    const __m512 r = _mm512_sqrt_ps(minus_2log(uniform_odd(w1)));
    __m512 c, s;
    cos_sin(uniform_odd(w2), c, s);
    z0 = _mm512_mul_ps(r, c);
    z1 = _mm512_mul_ps(r, s);
}

// One vector of the output (4 blocks), with the gradient step
// fma(noise_std, z, grad) (kernel_math.h noise_grad_step) when kGrad; `mask`
// for the last, partial vector.
template <bool kGrad>
FASTMLP_V void store_vec(float* out, const float* grad, __m512 stdv, __m512 o, __mmask16 mask) {
    if (kGrad) o = _mm512_fmadd_ps(stdv, o, _mm512_maskz_loadu_ps(mask, grad));
    _mm512_mask_storeu_ps(out, mask, o);
}


// Lane L = 4 g + p (128-bit group g, position p) draws block b + 4 p + g, so
// that after the 4x4 transposes inside each 128-bit group (unpacklo / hi_ps +
// shuffle_ps), vector p holds blocks b + 4 p .. b + 4 p + 3 in order: the
// output out[4 (b + j) + w] = z_w of block b + j with no shuffle across groups.
template <bool kGrad>
void blocks(float* __restrict out, const float* __restrict grad, float noise_std, uint64_t b0,
            int64_t nb, uint64_t step, uint32_t k0, uint32_t k1) {
    const __m512i lane = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 stdv = set1f(noise_std);
    for (int64_t b = 0; b < nb; b += 16) {
        const uint64_t base = b0 + static_cast<uint64_t>(b);
        // The 64-bit counter base + lane: the low word, and the high word with
        // the carry of the low one (lo < lane, unsigned).
        __m512i v0 = _mm512_add_epi32(set1(static_cast<uint32_t>(base)), lane);
        const __mmask16 carry = _mm512_cmplt_epu32_mask(v0, lane);
        const __m512i hi = set1(static_cast<uint32_t>(base >> 32));
        __m512i v1 = _mm512_mask_add_epi32(hi, carry, hi, set1(1u));
        __m512i v2 = set1(static_cast<uint32_t>(step)), v3 = set1(static_cast<uint32_t>(step >> 32));
        philox16(v0, v1, v2, v3, k0, k1);
        __m512 z0, z1, z2, z3;
        box_muller16(v0, v1, z0, z1);
        box_muller16(v2, v3, z2, z3);
        // Per 128-bit group: rows z0..z3, columns the group's 4 lanes -> columns.
        const __m512 t0 = _mm512_unpacklo_ps(z0, z1), t1 = _mm512_unpackhi_ps(z0, z1);
        const __m512 t2 = _mm512_unpacklo_ps(z2, z3), t3 = _mm512_unpackhi_ps(z2, z3);
        const __m512 o0 = _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 o1 = _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        const __m512 o2 = _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
        const __m512 o3 = _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
        float* o = out + 4 * b;
        const float* g = kGrad ? grad + 4 * b : o;  // (read only when kGrad)
        const int64_t left = 4 * (nb - b);  // floats left to write
        if (left >= 64) {
            store_vec<kGrad>(o, g, stdv, o0, 0xffff);
            store_vec<kGrad>(o + 16, g + 16, stdv, o1, 0xffff);
            store_vec<kGrad>(o + 32, g + 32, stdv, o2, 0xffff);
            store_vec<kGrad>(o + 48, g + 48, stdv, o3, 0xffff);
        } else {
            const __m512 os[4] = {o0, o1, o2, o3};
            for (int p = 0; 16 * p < left; ++p) {
                const int64_t cnt = std::min<int64_t>(16, left - 16 * p);
                const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
                store_vec<kGrad>(o + 16 * p, g + 16 * p, stdv, os[p], mask);
            }
        }
    }
}

}  // namespace

void noise_blocks_avx512(float* out, const float* grad, float noise_std, uint64_t b0, int64_t nb,
                         uint64_t step, uint32_t k0, uint32_t k1) {
    if (grad)
        blocks<true>(out, grad, noise_std, b0, nb, step, k0, k1);
    else
        blocks<false>(out, nullptr, noise_std, b0, nb, step, k0, k1);
}

}  // namespace cpu
}  // namespace fastmlp

#endif  // FASTMLP_NOISE_AVX512
