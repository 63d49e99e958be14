// CPU GEMM: C = alpha * op(A) @ op(B) + beta * C, float32, row-major.
//
// A cache-blocked loop nest the compiler vectorises (a tuned, packed
// micro-kernel is a later issue). C is cut into MC x NC tiles, one OpenMP
// task each; K is walked in KC slices so the B slice (KC x NC floats) stays in
// L2 while MC rows of A stream past it. Each C element is one thread's running
// sum over k = 0..K-1 in order, so the result does not depend on the thread
// count: a run repeats bit for bit.
#include <algorithm>
#include <cstring>

#include "check.h"
#include "cpu/parallel.h"
#include "fastmlp.h"

namespace fastmlp {
namespace cpu {
namespace {

constexpr int64_t MC = 64;   // rows of C per tile
constexpr int64_t NC = 256;  // columns of C per tile: one accumulator row = 1 KiB
constexpr int64_t KC = 256;  // depth of a B slice: KC x NC x 4 B = 256 KiB (L2)
constexpr int64_t MR = 4;    // rows updated together, so each B load feeds 4 FMAs
static_assert(MC % MR == 0, "a tile's full row groups must cover MC");

// acc[r][0..nc) += sum_p op(A)(i0 + r, p0 + p) * brow_p[0..nc) for r < mr, p < kc.
// op(A)(i, p) is A[i*lda + p], or A[p*lda + i] when A is stored transposed;
// only scalars of A are read here, so the transpose costs no packing.
FASTMLP_SIMD_CLONES
void tile_update(bool trans_a, const float* a, int64_t lda, int64_t i0, int64_t mr,
                 int64_t p0, int64_t kc, const float* bp, int64_t bstride,
                 float* acc, int64_t nc) {
    auto opa = [&](int64_t i, int64_t p) {
        return trans_a ? a[p * lda + i] : a[i * lda + p];
    };
    int64_t r = 0;
    for (; r + MR <= mr; r += MR) {
        float* __restrict c0 = acc + (r + 0) * NC;
        float* __restrict c1 = acc + (r + 1) * NC;
        float* __restrict c2 = acc + (r + 2) * NC;
        float* __restrict c3 = acc + (r + 3) * NC;
        for (int64_t p = 0; p < kc; ++p) {
            const float a0 = opa(i0 + r + 0, p0 + p), a1 = opa(i0 + r + 1, p0 + p);
            const float a2 = opa(i0 + r + 2, p0 + p), a3 = opa(i0 + r + 3, p0 + p);
            const float* __restrict brow = bp + p * bstride;
            for (int64_t j = 0; j < nc; ++j) {
                const float bj = brow[j];
                c0[j] += a0 * bj;
                c1[j] += a1 * bj;
                c2[j] += a2 * bj;
                c3[j] += a3 * bj;
            }
        }
    }
    for (; r < mr; ++r) {  // the last < MR rows of a tile
        float* __restrict c0 = acc + r * NC;
        for (int64_t p = 0; p < kc; ++p) {
            const float a0 = opa(i0 + r, p0 + p);
            const float* __restrict brow = bp + p * bstride;
            for (int64_t j = 0; j < nc; ++j) c0[j] += a0 * brow[j];
        }
    }
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
          float* c, int64_t ldc) {
    FASTMLP_CHECK(m >= 0 && n >= 0 && k >= 0,
                  "gemm: sizes must be >= 0, got m=" << m << " n=" << n << " k=" << k);
    FASTMLP_CHECK(lda >= std::max<int64_t>(1, trans_a ? m : k), "gemm: lda too small: " << lda);
    FASTMLP_CHECK(ldb >= std::max<int64_t>(1, trans_b ? k : n), "gemm: ldb too small: " << ldb);
    FASTMLP_CHECK(ldc >= std::max<int64_t>(1, n), "gemm: ldc too small: " << ldc);
    if (m == 0 || n == 0) return;
    FASTMLP_CHECK(c != nullptr && (k == 0 || (a != nullptr && b != nullptr)),
                  "gemm: null pointer");

    const int64_t mt = (m + MC - 1) / MC, nt = (n + NC - 1) / NC;
    const bool parallel = m * n * std::max<int64_t>(k, 1) >= FASTMLP_PAR_MIN * 16;
    FASTMLP_OMP(omp parallel for schedule(static) if (parallel))
    for (int64_t t = 0; t < mt * nt; ++t) {
        // Per-thread scratch, reused across calls: kernels never allocate.
        alignas(64) static thread_local float acc[MC * NC];
        alignas(64) static thread_local float bpack[KC * NC];
        const int64_t i0 = (t / nt) * MC, j0 = (t % nt) * NC;
        const int64_t mr = std::min(MC, m - i0), nc = std::min(NC, n - j0);
        for (int64_t r = 0; r < mr; ++r) std::memset(acc + r * NC, 0, nc * sizeof(float));
        for (int64_t p0 = 0; p0 < k; p0 += KC) {
            const int64_t kc = std::min(KC, k - p0);
            const float* bp;
            int64_t bstride;
            if (!trans_b) {  // op(B)(p, j) = B[p*ldb + j]: rows already contiguous
                bp = b + p0 * ldb + j0;
                bstride = ldb;
            } else {         // op(B)(p, j) = B[j*ldb + p]: pack the slice row-major
                for (int64_t j = 0; j < nc; ++j)
                    for (int64_t p = 0; p < kc; ++p)
                        bpack[p * NC + j] = b[(j0 + j) * ldb + p0 + p];
                bp = bpack;
                bstride = NC;
            }
            tile_update(trans_a, a, lda, i0, mr, p0, kc, bp, bstride, acc, nc);
        }
        for (int64_t r = 0; r < mr; ++r) {
            float* crow = c + (i0 + r) * ldc + j0;
            const float* arow = acc + r * NC;
            if (beta == 0.0f) {  // C is write-only: NaN in C must not leak (BLAS rule)
                for (int64_t j = 0; j < nc; ++j) crow[j] = alpha * arow[j];
            } else {
                for (int64_t j = 0; j < nc; ++j) crow[j] = alpha * arow[j] + beta * crow[j];
            }
        }
    }
}

void gemm_ex(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
             const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
             int64_t ldc, const GemmEpilogue& ep, Precision) {
    FASTMLP_CHECK(ep.colsum_b == nullptr || !trans_b, "gemm_ex: colsum_b needs trans_b == false");
    FASTMLP_CHECK(ep.relu_mask == nullptr || ep.ld_mask >= n,
                  "gemm_ex: ld_mask must be >= n=" << n << ", got " << ep.ld_mask);
    gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    if (ep.colsum_b != nullptr) {
        for (int64_t j = 0; j < n; ++j) ep.colsum_b[j] = 0.0f;
        for (int64_t p = 0; p < k; ++p)
            for (int64_t j = 0; j < n; ++j) ep.colsum_b[j] += b[p * ldb + j];
    }
    for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
            float t = c[i * ldc + j];
            if (ep.bias) t += ep.bias[j];
            if (ep.relu) t = t > 0.0f ? t : 0.0f;
            if (ep.relu_mask) t = ep.relu_mask[i * ep.ld_mask + j] > 0.0f ? t : 0.0f;
            c[i * ldc + j] = t;
        }
}

int num_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

}  // namespace cpu
}  // namespace fastmlp
