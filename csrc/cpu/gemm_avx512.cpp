// The CPU GEMM driver for AVX-512 (x86-64-v4): 16-float vectors, an 8 x 32
// register tile (16 zmm accumulators + 2 B vectors + 1 broadcast of the 32
// registers). Compiled with -mavx512f -mavx512vl -mavx512dq -mavx512bw -mfma
// (CMakeLists.txt); only run when the CPU reports AVX-512 (cpu/gemm.cpp).
#include "cpu/gemm_impl.h"

#ifdef FASTMLP_X86_DRIVERS
#include <immintrin.h>

#define FASTMLP_GEMM_ISA isa_avx512
#include "cpu/gemm_driver.h"

namespace fastmlp {
namespace cpu {
namespace isa_avx512 {
namespace {

struct S {
    using V = __m512;
    static constexpr int W = 16;
    // 8 x 32: per k, 2 vector loads + 8 broadcasts feed 16 FMAs; 16
    // independent accumulators cover the FMA latency (4 cycles x 2 pipes) with
    // room to spare. MC x KC of A (96 KiB) sits in L2; a B micro-panel
    // (KC x 32 floats, 48 KiB) streams through L1.
    static constexpr int MR = 8, NV = 2;
    static constexpr int64_t KC = 384, MC = 64, NC = 1024;

    static FASTMLP_INLINE V zero() { return _mm512_setzero_ps(); }
    static FASTMLP_INLINE __mmask16 first(int cnt) { return static_cast<__mmask16>((1u << cnt) - 1u); }
    static FASTMLP_INLINE V load(const float* p) { return _mm512_loadu_ps(p); }
    static FASTMLP_INLINE V load_n(const float* p, int cnt) { return _mm512_maskz_loadu_ps(first(cnt), p); }
    static FASTMLP_INLINE void store(float* p, V v) { _mm512_storeu_ps(p, v); }
    static FASTMLP_INLINE void store_n(float* p, V v, int cnt) { _mm512_mask_storeu_ps(p, first(cnt), v); }
    static FASTMLP_INLINE V set1(float x) { return _mm512_set1_ps(x); }
    static FASTMLP_INLINE V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
    static FASTMLP_INLINE V mul(V a, V b) { return _mm512_mul_ps(a, b); }
    static FASTMLP_INLINE V add(V a, V b) { return _mm512_add_ps(a, b); }
    // max returns its second operand when either is NaN, and the first
    // when both are zeros: max(0, t) is kernel_math.h's relu(t) = t < 0 ? 0 : t
    // lane by lane (NaN and -0 pass through).
    static FASTMLP_INLINE V relu(V t) { return _mm512_max_ps(zero(), t); }
    // relu_grad(t, m) = m <= 0 ? 0 : t: "not less or equal, unordered" keeps t
    // where m is NaN.
    static FASTMLP_INLINE V where_pos(V m, V t) {
        return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(m, zero(), _CMP_NLE_UQ), t);
    }
};

}  // namespace

const GemmDriver driver = {"avx512", S::MR, S::NV * S::W, &Gemm<S>::run};

}  // namespace isa_avx512
}  // namespace cpu
}  // namespace fastmlp
#endif
