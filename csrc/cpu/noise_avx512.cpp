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
// variable), which -W(maybe-)uninitialized reports at every inlined use.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include <immintrin.h>

#include <algorithm>

#include "kernel_math.h"

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

// The round keys of philox4x32_10: the key schedule's Weyl sequence.
struct PhiloxKeys {
    uint32_t k0[10], k1[10];
    PhiloxKeys(uint32_t a, uint32_t b) {
        for (int round = 0; round < 10; ++round) {
            k0[round] = a;
            k1[round] = b;
            a += 0x9E3779B9u;
            b += 0xBB67AE85u;
        }
    }
};

// philox4x32_10 on kSets x 16 counters (v[s][0 .. 3]: the four words of set s,
// lane by lane). The 32x32->64 products: vpmuludq multiplies the even u32
// lanes, and the odd lanes moved down to even positions; the high and low
// halves then go back to their lanes by masked in-lane swaps (one instruction
// each). A round of one set is a chain of dependent instructions (shift,
// multiply, swap, xor); the sets' independent chains run interleaved.
template <int kSets>
FASTMLP_V void philox16(__m512i (&v)[kSets][4], const PhiloxKeys& keys) {
    constexpr __mmask16 kEven = 0x5555, kOdd = 0xAAAA;
    const __m512i m0 = set1(0xD2511F53u), m1 = set1(0xCD9E8D57u);
#pragma GCC unroll 10
    for (int round = 0; round < 10; ++round) {
#pragma GCC unroll 4
        for (int s = 0; s < kSets; ++s) {
            const __m512i e0 = _mm512_mul_epu32(v[s][0], m0);                        // even lanes' p0
            const __m512i o0 = _mm512_mul_epu32(_mm512_srli_epi64(v[s][0], 32), m0);  // odd lanes' p0
            const __m512i e1 = _mm512_mul_epu32(v[s][2], m1);
            const __m512i o1 = _mm512_mul_epu32(_mm512_srli_epi64(v[s][2], 32), m1);
            // hi: the even lanes take e's odd words; lo: the odd lanes take o's even words.
            const __m512i hi0 = _mm512_mask_shuffle_epi32(o0, kEven, e0, _MM_PERM_CDAB);
            const __m512i lo0 = _mm512_mask_shuffle_epi32(e0, kOdd, o0, _MM_PERM_CDAB);
            const __m512i hi1 = _mm512_mask_shuffle_epi32(o1, kEven, e1, _MM_PERM_CDAB);
            const __m512i lo1 = _mm512_mask_shuffle_epi32(e1, kOdd, o1, _MM_PERM_CDAB);
            const __m512i n0 = xor3(hi1, v[s][1], set1(keys.k0[round]));
            const __m512i n2 = xor3(hi0, v[s][3], set1(keys.k1[round]));
            v[s][0] = n0;
            v[s][1] = lo1;
            v[s][2] = n2;
            v[s][3] = lo0;
        }
    }
}

// noise_uniform_odd: ((bits >> 8) << 1) | 1, i.e. (bits >> 7) | 1.
FASTMLP_V __m512i uniform_odd(__m512i bits) {
    return _mm512_or_si512(_mm512_srli_epi32(bits, 7), set1(1u));
}

// noise_minus_2log, lane by lane. The integer steps in fewer instructions,
// with the same values: y = bits(float(x)) + (2^23 - 0x3504f3) carries into
// the exponent field exactly when the mantissa is >= 0x3504f3, so the
// exponent field of y is k + 127 and E = y & 0xff800000 is the float 2^k;
// 2^-k is the float of bits (254 << 23) - E, the integer 2^k is E converted
// (exact), and k itself is getexp(E).
FASTMLP_V __m512 minus_2log(__m512i x) {
    const __m512i y = _mm512_add_epi32(_mm512_castps_si512(_mm512_cvtepi32_ps(x)),
                                       set1(0x800000u - 0x3504f3u));
    const __m512i e = _mm512_and_si512(y, set1(0xff800000u));                  // float 2^k
    const __m512 pow2k = _mm512_castsi512_ps(e);
    const __m512 inv2k = _mm512_castsi512_ps(_mm512_sub_epi32(set1(254u << 23), e));  // 2^-k
    const __m512 f = _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_sub_epi32(x, _mm512_cvtps_epi32(pow2k))), inv2k);
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
    const __m512 fe = _mm512_sub_ps(_mm512_getexp_ps(pow2k), set1f(25.0f));  // k - 25, exact
    __m512 y2 = _mm512_mul_ps(_mm512_mul_ps(p, f), ff);
    y2 = _mm512_fmadd_ps(fe, set1f(-2.12194440e-4f), y2);
    y2 = _mm512_fmadd_ps(set1f(-0.5f), ff, y2);
    y2 = _mm512_add_ps(f, y2);
    y2 = _mm512_fmadd_ps(fe, set1f(0.693359375f), y2);
    return _mm512_mul_ps(set1f(-2.0f), y2);
}

// noise_cos_sin, lane by lane. y = x + 2^22 carries into bit 23 exactly when
// the offset r is past 1/8 turn, so bits 23, 24 of y are q (after the
// recentring) and r - 2^22 = (y & 0x7fffff) - 2^22: t = that * 2^-25 is one
// exact fma. The negations are sign-bit flips (as the scalar unary minus),
// under masks: q & 1 is bit 23 of y, q >= 2 bit 24, q == 1 || q == 2 bit 24
// of y + 2^23.
FASTMLP_V void cos_sin(__m512i x, __m512& c, __m512& s) {
    const __m512i y = _mm512_add_epi32(x, set1(0x400000u));
    const __m512 t = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(y, set1(0x7fffffu))),
                                     set1f(2.98023223876953125e-8f), set1f(-0.125f));
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
    const __mmask16 odd = _mm512_test_epi32_mask(y, set1(1u << 23));
    const __mmask16 neg_c = _mm512_test_epi32_mask(_mm512_add_epi32(y, set1(1u << 23)), set1(1u << 24));
    const __mmask16 neg_s = _mm512_test_epi32_mask(y, set1(1u << 24));
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


// The 4 x 16 normals of one set (z[w]: word pair w / 2's z0 or z1, lane L),
// in block order, through the gradient step when kGrad; only the first `left`
// floats are written. Lane L = 4 g + p (128-bit group g, position p) holds
// block 4 p + g of the set, so that after the 4x4 transposes inside each
// 128-bit group (unpacklo / hi_ps + shuffle_ps), vector p holds blocks
// 4 p .. 4 p + 3 in order: no shuffle across groups.
template <bool kGrad>
FASTMLP_V void store16(float* out, const float* grad, __m512 stdv, const __m512 (&z)[4],
                       int64_t left) {
    const __m512 t0 = _mm512_unpacklo_ps(z[0], z[1]), t1 = _mm512_unpackhi_ps(z[0], z[1]);
    const __m512 t2 = _mm512_unpacklo_ps(z[2], z[3]), t3 = _mm512_unpackhi_ps(z[2], z[3]);
    const __m512 o[4] = {_mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)),
                         _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2))};
    if (left >= 64) {
#pragma GCC unroll 4
        for (int p = 0; p < 4; ++p) store_vec<kGrad>(out + 16 * p, grad + 16 * p, stdv, o[p], 0xffff);
    } else {
        for (int p = 0; 16 * p < left; ++p) {
            const int64_t cnt = std::min<int64_t>(16, left - 16 * p);
            const __mmask16 mask = static_cast<__mmask16>((1u << cnt) - 1u);
            store_vec<kGrad>(out + 16 * p, grad + 16 * p, stdv, o[p], mask);
        }
    }
}

// kSets x 16 counter blocks per iteration; the last iteration computes whole
// sets and writes only the blocks asked for.
template <bool kGrad, int kSets>
void blocks(float* __restrict out, const float* __restrict grad, float noise_std, uint64_t b0,
            int64_t nb, uint64_t step, uint32_t k0, uint32_t k1) {
    const __m512i lane = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m512 stdv = set1f(noise_std);
    const PhiloxKeys keys(k0, k1);
    for (int64_t b = 0; b < nb; b += 16 * kSets) {
        __m512i v[kSets][4];
#pragma GCC unroll 4
        for (int s = 0; s < kSets; ++s) {
            const uint64_t base = b0 + static_cast<uint64_t>(b + 16 * s);
            // The 64-bit counter base + lane: the low word, and the high word
            // with the carry of the low one (lo < lane, unsigned).
            v[s][0] = _mm512_add_epi32(set1(static_cast<uint32_t>(base)), lane);
            const __mmask16 carry = _mm512_cmplt_epu32_mask(v[s][0], lane);
            const __m512i hi = set1(static_cast<uint32_t>(base >> 32));
            v[s][1] = _mm512_mask_add_epi32(hi, carry, hi, set1(1u));
            v[s][2] = set1(static_cast<uint32_t>(step));
            v[s][3] = set1(static_cast<uint32_t>(step >> 32));
        }
        philox16<kSets>(v, keys);
#pragma GCC unroll 4
        for (int s = 0; s < kSets; ++s) {
            const int64_t left = 4 * (nb - b - 16 * s);  // floats left to write
            if (left <= 0) break;
            __m512 z[4];
            box_muller16(v[s][0], v[s][1], z[0], z[1]);
            box_muller16(v[s][2], v[s][3], z[2], z[3]);
            float* o = out + 4 * (b + 16 * s);
            store16<kGrad>(o, kGrad ? grad + 4 * (b + 16 * s) : o, stdv, z, left);
        }
    }
}

// Four sets (64 blocks, 256 normals) per iteration: one set leaves the Philox
// chain's latency exposed (measured on Zen 4: 0.99 ns per normal with 1 set,
// 0.95 with 2, 0.81 with 3, 0.78 with 4; 0.69 with 4 after the shorter integer
// steps above; the generic loop: ~1.9).
constexpr int kSets = 4;

}  // namespace

void noise_blocks_avx512(float* out, const float* grad, float noise_std, uint64_t b0, int64_t nb,
                         uint64_t step, uint32_t k0, uint32_t k1) {
    if (grad)
        blocks<true, kSets>(out, grad, noise_std, b0, nb, step, k0, k1);
    else
        blocks<false, kSets>(out, nullptr, noise_std, b0, nb, step, k0, k1);
}

int64_t noise_box_muller_mismatches_avx512() {
    int64_t bad = 0;
    alignas(64) uint32_t w1[16], w2[16];
    alignas(64) float z0[16], z1[16];
    for (uint32_t u = 0; u < (1u << 25); u += 16) {
        for (uint32_t l = 0; l < 16; ++l) {
            // The top 25 bits: every value once (u + l, and its image under an
            // xor for the angle's word); the low 7: junk the uniforms drop.
            w1[l] = ((u + l) << 7) | ((u * 2654435761u + l) >> 25);
            w2[l] = (((u + l) ^ 0x1555555u) << 7) | (l * 9u);
        }
        __m512 a, b;
        box_muller16(_mm512_load_si512(w1), _mm512_load_si512(w2), a, b);
        _mm512_store_ps(z0, a);
        _mm512_store_ps(z1, b);
        for (int l = 0; l < 16; ++l) {
            float s0, s1;
            box_muller(w1[l], w2[l], &s0, &s1);
            bad += (float_as_bits(s0) != float_as_bits(z0[l])) ||
                   (float_as_bits(s1) != float_as_bits(z1[l]));
        }
    }
    return bad;
}

}  // namespace cpu
}  // namespace fastmlp

#endif  // FASTMLP_NOISE_AVX512
