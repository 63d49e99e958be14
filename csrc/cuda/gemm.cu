// GEMM on the GPU: C(m,n) = alpha * op(A)(m,k) @ op(B)(k,n) + beta * C,
// float32, row-major, all four transposes, any shape.
//
// One kernel, gemm_tiled_f32, in the style of siboehm/SGEMM_CUDA's
// "2D block tiling" step: each block computes a BM x BN tile of C; per step
// of BK along k it stages a BM x BK slice of op(A) and a BK x BN slice of
// op(B) in shared memory, and each thread accumulates a TM x TN micro-tile of
// C in registers (TM + TN shared-memory reads feed TM * TN FMAs). The next
// k-slice is fetched from global memory into registers while the current one
// is being multiplied, so global latency overlaps the FMAs.
//
// Row-major reasoning. With row-major storage element (r, c) of a matrix with
// leading dimension ld lives at r * ld + c, so
//   op(A)(i, p) = trans_a ? A[p * lda + i] : A[i * lda + p]
//   op(B)(p, j) = trans_b ? B[j * ldb + p] : B[p * ldb + j]
// The transposes only change which index is contiguous in memory; they are
// resolved in the global -> shared copy (TileLoader), so the inner product
// loop is the same for all four variants. Both shared tiles are stored
// k-major (As[p][i], Bs[p][j]): a thread's TM rows of op(A) and TN columns of
// op(B) at one p are then consecutive floats, read as float4.
//
// Determinism: every C element is one thread's fixed-order sum over p, so a
// run repeats bit for bit (no split-k, no atomics).

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "check.h"
#include "cuda/row_scale.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"

namespace fastmlp {
namespace cuda {
namespace {

using detail::ceil_div;

// The tile shape of gemm_tiled_f32, with the constraints the kernel relies on.
template <int BM_, int BN_, int BK_, int TM_, int TN_>
struct GemmTile {
    static constexpr int BM = BM_;   // rows of C per block
    static constexpr int BN = BN_;   // columns of C per block
    static constexpr int BK = BK_;   // k-slice staged in shared memory per step
    static constexpr int TM = TM_;   // rows of C per thread
    static constexpr int TN = TN_;   // columns of C per thread
    static constexpr int kThreadsN = BN / TN;   // threads along a tile row
    static constexpr int kThreads = (BM / TM) * (BN / TN);
    // Pad shared rows by 4 floats: keeps each row 16-byte aligned for the
    // float4 reads, and spreads the strided stores of a k-contiguous operand
    // (consecutive threads write consecutive p, i.e. rows BM + 4 floats apart)
    // over 8 banks instead of one.
    static constexpr int kPad = 4;

    static_assert(BM % TM == 0 && BN % TN == 0, "a block tile must split into whole thread micro-tiles");
    static_assert(TM % 4 == 0 && TN % 4 == 0, "micro-tiles are read from shared memory as float4");
    static_assert((BM + kPad) % 4 == 0 && (BN + kPad) % 4 == 0,
                  "padded shared rows must stay 16-byte aligned for float4 reads");
    static_assert(kThreads % 32 == 0, "whole warps only");
    static_assert(kThreads <= 1024, "CUDA allows at most 1024 threads per block");
    static_assert((BK * (BM + BN + 2 * kPad)) * 4 <= 48 * 1024,
                  "static shared memory is limited to 48 KiB");
};

// The shipped configuration: 64 x 64 tiles, k-slices of 16, 256 threads each
// computing 4 x 4 outputs. 64-wide tiles keep enough blocks in flight for the
// MLP's skinny products (e.g. 784 x 128 weights: 13 x 2 blocks); larger tiles
// would leave most of the 132 SMs idle there. Tuning is a later issue.
using GemmConfig = GemmTile<64, 64, 16, 4, 4>;

// Copies the BD x BK slice X(d0 .. d0+BD-1, p0 .. p0+BK-1) of one operand into
// registers (load) and then into a k-major shared tile S[p][d] (store).
// d is the operand's output dimension (i for op(A), j for op(B)), p the
// reduction dimension; element (d, p) is X[d * ld + p] when K_CONTIGUOUS, else
// X[p * ld + d]. Out-of-range elements (d >= D or p >= K) are zero-filled and
// never read, so partial tiles add nothing to the sums. With kScale [issue 17]
// element (d, p) is multiplied by scale[p] as it is loaded (kernel_math.h
// row_scaled: rounded, never fused), so the tile holds diag(scale) op(B).
//
// Thread mapping: consecutive threads take consecutive addresses along the
// contiguous dimension (coalesced global reads); each pass covers THREADS
// elements, kPerThread passes cover the slice.
template <int BD, int BK, int PAD, int THREADS, bool K_CONTIGUOUS>
struct TileLoader {
    static constexpr int kFastExtent = K_CONTIGUOUS ? BK : BD;   // along the contiguous dim
    static constexpr int kSlowExtent = K_CONTIGUOUS ? BD : BK;
    static constexpr int kSlowStep = THREADS / kFastExtent;      // slow-dim lines per pass
    static constexpr int kPerThread = (BD * BK) / THREADS;

    static_assert(THREADS % kFastExtent == 0,
                  "the threads must cover whole lines of the contiguous tile dimension");
    static_assert(kSlowExtent % kSlowStep == 0,
                  "the passes must cover the tile's other dimension exactly");
    static_assert(kPerThread * THREADS == BD * BK, "every tile element is copied exactly once");

    int fast;   // this thread's index along the contiguous dimension
    int slow;   // its first index along the other dimension
    float reg[kPerThread];

    __device__ __forceinline__ explicit TileLoader(int tid)
        : fast(tid % kFastExtent), slow(tid / kFastExtent) {}

    template <bool kScale = false>
    __device__ __forceinline__ void load(const float* __restrict__ X, int64_t ld, int64_t d0,
                                         int64_t p0, int64_t D, int64_t K,
                                         const float* __restrict__ scale = nullptr) {
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) {
            const int s = slow + r * kSlowStep;
            const int64_t d = d0 + (K_CONTIGUOUS ? s : fast);
            const int64_t p = p0 + (K_CONTIGUOUS ? fast : s);
            float v = 0.0f;
            // 64-bit offsets: d * ld exceeds 2^31 for matrices over 8 GiB.
            if (d < D && p < K) {
                v = X[K_CONTIGUOUS ? d * ld + p : p * ld + d];
                if (kScale) v = row_scaled(v, scale[p]);  // p < K: in bounds
            }
            reg[r] = v;
        }
    }

    __device__ __forceinline__ void store(float (*S)[BD + PAD]) const {
#pragma unroll
        for (int r = 0; r < kPerThread; ++r) {
            const int s = slow + r * kSlowStep;
            // In range by construction: s < kSlowExtent, fast < kFastExtent.
            if (K_CONTIGUOUS) S[fast][s] = reg[r];
            else S[s][fast] = reg[r];
        }
    }
};

// C must not overlap A or B (as in BLAS): blocks write C while others still
// read A and B, and the __restrict__ qualifiers promise it.
// SCALE_B [issue 17]: op(B)'s row p is scaled by row_scale[p] (K floats) as
// its tiles are loaded: C = alpha * op(A) diag(row_scale) op(B) + beta * C.
template <class Cfg, bool TRANS_A, bool TRANS_B, bool SCALE_B>
__global__ void __launch_bounds__(Cfg::kThreads)
gemm_tiled_f32(int64_t M, int64_t N, int64_t K, float alpha, const float* __restrict__ A,
               int64_t lda, const float* __restrict__ B, int64_t ldb, float beta,
               float* __restrict__ C, int64_t ldc, const float* __restrict__ row_scale) {
    constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, TM = Cfg::TM, TN = Cfg::TN;
    constexpr int PAD = Cfg::kPad, THREADS = Cfg::kThreads;

    __shared__ __align__(16) float As[BK][BM + PAD];   // As[p][i] = op(A)(i0 + i, p0 + p)
    __shared__ __align__(16) float Bs[BK][BN + PAD];   // Bs[p][j] = op(B)(p0 + p, j0 + j)

    const int tid = static_cast<int>(threadIdx.x);
    // M tiles on x: gridDim.x allows 2^31 - 1 blocks, gridDim.y only 65535.
    const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BN;

    // op(A)(i, p) = trans_a ? A[p*lda + i] : A[i*lda + p]: k is contiguous
    // unless A is transposed.
    TileLoader<BM, BK, PAD, THREADS, !TRANS_A> a_tile(tid);
    // op(B)(p, j) = trans_b ? B[j*ldb + p] : B[p*ldb + j]: k is contiguous
    // only when B is transposed.
    TileLoader<BN, BK, PAD, THREADS, TRANS_B> b_tile(tid);

    // This thread's micro-tile: rows ty*TM .. +TM-1, columns tx*TN .. +TN-1.
    const int tx = tid % Cfg::kThreadsN;
    const int ty = tid / Cfg::kThreadsN;

    float acc[TM][TN];
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;

    const int64_t num_k_tiles = ceil_div(K, BK);   // >= 1: the launcher handles K == 0

    a_tile.load(A, lda, i0, 0, M, K);
    b_tile.template load<SCALE_B>(B, ldb, j0, 0, N, K, row_scale);
    a_tile.store(As);
    b_tile.store(Bs);
    __syncthreads();   // the first tile is complete before anyone multiplies it

    for (int64_t t = 0; t < num_k_tiles; ++t) {
        // has_next is the same for the whole block, so the __syncthreads()
        // below are reached by all threads or by none.
        const bool has_next = t + 1 < num_k_tiles;
        if (has_next) {
            // Issue the next slice's global loads now; they land in registers
            // while the FMAs below run.
            const int64_t p_next = (t + 1) * BK;
            a_tile.load(A, lda, i0, p_next, M, K);
            b_tile.template load<SCALE_B>(B, ldb, j0, p_next, N, K, row_scale);
        }

#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], b[TN];
#pragma unroll
            for (int v = 0; v < TM / 4; ++v) {
                const float4 x = *reinterpret_cast<const float4*>(&As[kk][ty * TM + 4 * v]);
                a[4 * v + 0] = x.x; a[4 * v + 1] = x.y; a[4 * v + 2] = x.z; a[4 * v + 3] = x.w;
            }
#pragma unroll
            for (int v = 0; v < TN / 4; ++v) {
                const float4 x = *reinterpret_cast<const float4*>(&Bs[kk][tx * TN + 4 * v]);
                b[4 * v + 0] = x.x; b[4 * v + 1] = x.y; b[4 * v + 2] = x.z; b[4 * v + 3] = x.w;
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
        }

        if (has_next) {
            __syncthreads();   // all threads are done reading As/Bs before they are overwritten
            a_tile.store(As);
            b_tile.store(Bs);
            __syncthreads();   // the new tile is complete before anyone reads it
        }
    }

    // Epilogue: predicated stores; C is read only when beta != 0, so with
    // beta == 0 it is write-only and NaN/garbage in it never propagates.
#pragma unroll
    for (int i = 0; i < TM; ++i) {
        const int64_t row = i0 + ty * TM + i;
        if (row >= M) continue;
#pragma unroll
        for (int j = 0; j < TN; ++j) {
            const int64_t col = j0 + tx * TN + j;
            if (col >= N) continue;
            float* cp = C + row * ldc + col;
            float r = alpha * acc[i][j];
            if (beta != 0.0f) r = r + beta * (*cp);
            *cp = r;
        }
    }
}

// k == 0: op(A) @ op(B) is an m x n matrix of zeros, so C = beta * C; with
// beta == 0 C is written with zeros without being read (BLAS semantics).
// A rare path, so a flat grid-stride loop with a 64-bit division is fine.
__global__ void __launch_bounds__(256)
gemm_scale_c_f32(int64_t M, int64_t N, float beta, float* __restrict__ C, int64_t ldc) {
    const int64_t total = M * N;   // the launcher checked that it fits int64
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
         idx += stride) {
        const int64_t row = idx / N;
        const int64_t col = idx - row * N;
        float* cp = C + row * ldc + col;
        *cp = beta == 0.0f ? 0.0f : beta * (*cp);
    }
}

template <bool TRANS_A, bool TRANS_B>
void launch_gemm_tiled(int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                       const float* b, int64_t ldb, float beta, float* c, int64_t ldc,
                       const float* row_scale, cudaStream_t stream) {
    using Cfg = GemmConfig;
    const dim3 grid(static_cast<unsigned int>(ceil_div(m, Cfg::BM)),
                    static_cast<unsigned int>(ceil_div(n, Cfg::BN)));
    if (row_scale != nullptr)
        gemm_tiled_f32<Cfg, TRANS_A, TRANS_B, true><<<grid, Cfg::kThreads, 0, stream>>>(
            m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, row_scale);
    else
        gemm_tiled_f32<Cfg, TRANS_A, TRANS_B, false><<<grid, Cfg::kThreads, 0, stream>>>(
            m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nullptr);
    detail::check_launch();
}

// gemm, and gemm_row_scaled when row_scale is not null.
void gemm_impl(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
               int64_t ldc, const float* row_scale, cudaStream_t stream) {
    FASTMLP_CHECK(m >= 0 && n >= 0 && k >= 0,
                  "gemm: sizes must be non-negative, got m=" << m << " n=" << n << " k=" << k);
    // Row-major leading dimensions: a row of the stored matrix must fit.
    const int64_t a_cols = trans_a ? m : k;   // A is m x k, or k x m when transposed
    const int64_t b_cols = trans_b ? k : n;   // B is k x n, or n x k when transposed
    FASTMLP_CHECK(lda >= a_cols, "gemm: lda must be >= " << a_cols << " (the columns of A"
                                     << (trans_a ? ", trans_a" : "") << "), got " << lda);
    FASTMLP_CHECK(ldb >= b_cols, "gemm: ldb must be >= " << b_cols << " (the columns of B"
                                     << (trans_b ? ", trans_b" : "") << "), got " << ldb);
    FASTMLP_CHECK(ldc >= n, "gemm: ldc must be >= n=" << n << ", got " << ldc);
    if (m == 0 || n == 0) return;   // C is empty: nothing to write, no launch
    FASTMLP_CHECK(c != nullptr, "gemm: C is null");

    if (k == 0) {
        FASTMLP_CHECK(m <= std::numeric_limits<int64_t>::max() / n,
                      "gemm: m*n overflows int64 (m=" << m << ", n=" << n << ")");
        const unsigned int blocks = detail::grid_stride_blocks(m * n, 256);
        gemm_scale_c_f32<<<blocks, 256, 0, stream>>>(m, n, beta, c, ldc);
        detail::check_launch();
        return;
    }
    FASTMLP_CHECK(a != nullptr && b != nullptr, "gemm: A or B is null with k=" << k);
    FASTMLP_CHECK(ceil_div(m, GemmConfig::BM) <= std::numeric_limits<int32_t>::max(),
                  "gemm: m=" << m << " is too large for one launch");
    FASTMLP_CHECK(ceil_div(n, GemmConfig::BN) <= 65535,
                  "gemm: n=" << n << " is too large for one launch (at most "
                             << 65535LL * GemmConfig::BN << " columns)");

    if (!trans_a && !trans_b)
        launch_gemm_tiled<false, false>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, row_scale,
                                         stream);
    else if (!trans_a && trans_b)
        launch_gemm_tiled<false, true>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, row_scale,
                                        stream);
    else if (trans_a && !trans_b)
        launch_gemm_tiled<true, false>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, row_scale,
                                       stream);
    else
        launch_gemm_tiled<true, true>(m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, row_scale,
                                      stream);
}

}  // namespace

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc, cudaStream_t stream) {
    gemm_impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nullptr, stream);
}

void gemm_row_scaled(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                     const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                     float* c, int64_t ldc, const float* row_scale, cudaStream_t stream) {
    FASTMLP_CHECK(k == 0 || m == 0 || n == 0 || row_scale != nullptr,
                  "gemm_row_scaled: row_scale is null");
    gemm_impl(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, row_scale, stream);
}

}  // namespace cuda
}  // namespace fastmlp
