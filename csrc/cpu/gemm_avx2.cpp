// The CPU GEMM driver for AVX2 + FMA (x86-64-v3): 8-float vectors, a 6 x 16
// register tile (12 ymm accumulators + 2 B vectors + 1 broadcast of the 16
// registers). Compiled with -mavx2 -mfma (CMakeLists.txt); only run when the
// CPU reports both (cpu/gemm.cpp).
#include "cpu/gemm_impl.h"

#ifdef FASTMLP_X86_DRIVERS
#include <immintrin.h>

#define FASTMLP_GEMM_ISA isa_avx2
#include "cpu/gemm_driver.h"

namespace fastmlp {
namespace cpu {
namespace isa_avx2 {
namespace {

struct S {
    using V = __m256;
    static constexpr int W = 8;
    static constexpr int MR = 6, NV = 2;
    static constexpr int64_t KC = 256, MC = 72, NC = 1024;

    static FASTMLP_INLINE V zero() { return _mm256_setzero_ps(); }
    // Lanes [0, cnt) set: the sign bit of each 32-bit lane selects it.
    static FASTMLP_INLINE __m256i first(int cnt) {
        return _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    }
    static FASTMLP_INLINE V load(const float* p) { return _mm256_loadu_ps(p); }
    static FASTMLP_INLINE V load_n(const float* p, int cnt) { return _mm256_maskload_ps(p, first(cnt)); }
    static FASTMLP_INLINE void store(float* p, V v) { _mm256_storeu_ps(p, v); }
    static FASTMLP_INLINE void store_n(float* p, V v, int cnt) { _mm256_maskstore_ps(p, first(cnt), v); }
    static FASTMLP_INLINE V set1(float x) { return _mm256_set1_ps(x); }
    static FASTMLP_INLINE V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
    static FASTMLP_INLINE V mul(V a, V b) { return _mm256_mul_ps(a, b); }
    static FASTMLP_INLINE V add(V a, V b) { return _mm256_add_ps(a, b); }
    // max returns its second operand when either is NaN, and the first
    // when both are zeros: max(0, t) is kernel_math.h's relu(t) = t < 0 ? 0 : t
    // lane by lane (NaN and -0 pass through).
    static FASTMLP_INLINE V relu(V t) { return _mm256_max_ps(zero(), t); }
    // relu_grad(t, m) = m <= 0 ? 0 : t: "not less or equal, unordered" keeps t
    // where m is NaN.
    static FASTMLP_INLINE V where_pos(V m, V t) {
        return _mm256_and_ps(_mm256_cmp_ps(m, zero(), _CMP_NLE_UQ), t);
    }
};

}  // namespace

const GemmDriver driver = {"avx2", S::MR, S::NV * S::W, &Gemm<S>::run};

}  // namespace isa_avx2
}  // namespace cpu
}  // namespace fastmlp
#endif
