// The GEMM kernel family: one pipelined kernel template, two math policies.
//
//   C(m,n) = epilogue(alpha * op(A)(m,k) @ op(B)(k,n) + beta * C)
//
// Row-major, all four transposes, any shape and leading dimension. Only .cu
// files include this header; gemm_family_simt.cu and gemm_family_tf32.cu
// instantiate the configurations, gemm_family.cu holds the registry, the
// dispatch table and the split-K reduction.
//
// Structure (per block, tile BM x BN of C, k-slices of BK):
// - Shared memory holds STAGES k-slices of both operands, each k-major:
//   As[p][i] = op(A)(i0+i, p0+p), Bs[p][j] = op(B)(p0+p, j0+j). The
//   transposes are resolved by the loader (which index is contiguous in
//   global memory), so the math is the same for all four variants.
// - Global -> shared copies are cp.async (sm_80+), STAGES-1 slices in flight
//   ahead of the math. An operand whose contiguous index is the tile's row
//   or column dimension (op(A) with trans_a, op(B) without trans_b) lands
//   with 16-byte copies straight into the k-major tile; one whose contiguous
//   index is k has to be transposed on the way and lands with 4-byte copies
//   (consecutive threads take consecutive k, so global reads stay in full
//   32-byte sectors). 16-byte copies need a 16-byte aligned base and a
//   leading dimension that is a multiple of 4 floats; otherwise the same
//   operand takes the 4-byte path (a block-uniform run-time flag).
// - Edges are predicated: a copy of an element outside the matrix (or
//   outside this block's split-K range) is a zero-fill (cp.async src-size
//   0), so partial tiles add zeros and no tile size has to divide anything.
// - SIMT math (SimtCfg): warp tiling; each thread owns TM x TN accumulators
//   as (TM/4) x (TN/4) sub-tiles of 4 x 4, read from shared memory with
//   128-bit loads; a warp's lanes cover a contiguous LM*4 x LN*4 patch per
//   sub-tile, so a warp's A reads hit LM distinct 16-byte words (broadcast)
//   and its B reads LN consecutive ones: no bank conflicts.
// - TF32 math (Tf32Cfg): mma.sync.m16n8k8 (fp32 accumulate), fragments read
//   with 32-bit loads and rounded with cvt.rna.tf32.f32.
// - Split-K (gridDim.z > 1): each z-slice handles k_per_split values of k and
//   writes its raw partial tile to a workspace; gemm_splitk_reduce_f32 sums the
//   slices in fixed z order and applies alpha, beta and the epilogue. No
//   atomics: a run repeats bit for bit.
// - colsum of op(B) (the bias gradient fused into dW = X^T dY): the blocks of
//   the first block row (blockIdx.x == 0) also add up the B slices they
//   already hold in shared memory, in k order.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "check.h"
#include "fastmlp.h"
#include "gemm_family.h"
#include "kernel_math.h"
#include "launch.h"

// cp.async and mma.sync tf32 exist from sm_80 on. For older targets (sm_75
// in the portable build) the kernels compile to an empty body; the host side
// never launches them there (it checks the device's compute capability).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
#define FASTMLP_FAMILY_DEVICE 1
#else
#define FASTMLP_FAMILY_DEVICE 0
#endif

namespace fastmlp {
namespace cuda {
namespace family {

// Everything a family kernel needs, passed by value (kernel parameter space).
struct Params {
    int64_t m, n, k;
    float alpha, beta;
    const float* a;
    int64_t lda;
    const float* b;
    int64_t ldb;
    float* c;
    int64_t ldc;
    const float* bias;      // epilogue extras (GemmEpilogue)
    const float* mask;
    int64_t ld_mask;
    int relu;
    float* colsum;          // splits == 1: colsum_b; else the workspace's [z][n] partial sums
    float* colsum_out;      // colsum_b (the reduction writes it in split-K runs)
    float* partial;         // split-K: [z][m][n] raw partial products; else nullptr
    int64_t k_per_split;    // a multiple of BK
    int splits;             // gridDim.z
    int vec_a, vec_b;       // 16-byte copies allowed for op(A) / op(B)
    int vec_c;              // C, bias and mask allow 16-byte accesses (ldc, ld_mask % 4 == 0)
};

// ---- cp.async and mma wrappers --------------------------------------------------------
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte copy, src_bytes of them read (the rest zero-filled). .cg: bypass L1,
// the tile is read once per block.
__device__ __forceinline__ void cp_async16(float* dst, const float* src, int src_bytes) {
#if FASTMLP_FAMILY_DEVICE
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)),
                 "l"(src), "r"(src_bytes)
                 : "memory");
#endif
}

// 4-byte copy (src_bytes 0 or 4). .ca: the neighbours along k of this element
// are fetched by other copies of the same block, so L1 serves the sector twice.
__device__ __forceinline__ void cp_async4(float* dst, const float* src, int src_bytes) {
#if FASTMLP_FAMILY_DEVICE
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(src_bytes)
                 : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if FASTMLP_FAMILY_DEVICE
    asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if FASTMLP_FAMILY_DEVICE
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

__device__ __forceinline__ uint32_t to_tf32(float x) {
    uint32_t r = 0;
#if FASTMLP_FAMILY_DEVICE
    // Round to nearest (ties away): the tensor core would otherwise truncate
    // the low 13 mantissa bits, doubling the error and biasing it.
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
#else
    (void)x;
#endif
    return r;
}

// d += a(16x8, row) * b(8x8, col), fp32 accumulate. Fragment layout (PTX ISA,
// m16n8k8 .tf32), g = lane / 4, t = lane % 4:
//   a0 (g, t) a1 (g+8, t) a2 (g, t+4) a3 (g+8, t+4);  b0 (k=t, n=g) b1 (k=t+4, n=g);
//   d0 (g, 2t) d1 (g, 2t+1) d2 (g+8, 2t) d3 (g+8, 2t+1).
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]) {
#if FASTMLP_FAMILY_DEVICE
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    (void)d; (void)a; (void)b;
#endif
}

// ---- global -> shared tile loader -------------------------------------------------------
// Copies the BD x BK slices X(d0 + d, p0 + p) (d < BD, p < BK) of one operand
// into the k-major shared tile S[p * LDS + d]; elements with d0 + d >= D or
// p0 + p >= p_end are zero-filled. Element (d, p) is X[d * ld + p] when
// K_CONTIG, else X[p * ld + d].
//
// The loader is built once per thread and keeps only a running pointer, one
// 64-bit stride and the row/column validity (which no k-slice changes): the
// addresses of the next slice are a fixed step away, so the main loop spends
// no registers on per-element 64-bit addresses.
template <int BD, int BK, int LDS, int THREADS, bool K_CONTIG>
struct TileLoader {
    // K_CONTIG: KF consecutive threads take KF consecutive k of one row, the
    // next KF threads the next row. Their shared stores land at
    // p * LDS + d: with LDS = 4 (mod 32) and KF = 8, or LDS = 8 (mod 32) and
    // KF = 4, the 32 lanes of a warp hit 32 distinct banks.
    static constexpr int kLdsMod = LDS % 32;
    static_assert(kLdsMod == 4 || kLdsMod == 8, "the shared row stride must be 4 or 8 (mod 32) floats");
    static constexpr int KF = 32 / kLdsMod;
    static_assert(BD % 4 == 0 && LDS % 4 == 0, "16-byte copies need 4-float granularity");

    // K_CONTIG mapping: thread -> (row dl + i*kRowsK, k pf + j*KF).
    static constexpr int kRowsK = THREADS / KF;
    static constexpr int kRowItersK = BD / kRowsK;
    static constexpr int kKItersK = BK / KF;
    // D_CONTIG scalar mapping: thread -> (column tid % BD, k tid / BD + j*kKStepS).
    static constexpr int kKStepS = THREADS / BD;
    static constexpr int kKItersS = BK / (kKStepS > 0 ? kKStepS : 1);
    // D_CONTIG 16-byte mapping: thread -> (columns 4*(tid % (BD/4)) .. +3, k tid / (BD/4) + j*kKStepV).
    static constexpr int kKStepV = THREADS / (BD / 4);
    static constexpr int kKItersV = BK / (kKStepV > 0 ? kKStepV : 1);

    static_assert(!K_CONTIG || (BK % KF == 0 && THREADS % KF == 0 && BD % kRowsK == 0),
                  "transposing copy: whole k-runs, and the thread rows must tile BD");
    static_assert(K_CONTIG || (THREADS % BD == 0 && BK % kKStepS == 0),
                  "4-byte copy: the threads must cover whole tile rows and split BK evenly");
    static_assert(K_CONTIG || (THREADS % (BD / 4) == 0 && BK % kKStepV == 0),
                  "16-byte copy: the threads must cover whole tile rows and split BK evenly");

    const float* ptr;   // this thread's first element of the next slice
    int64_t ld;         // the strides below are compile-time multiples of it
    int k_off;          // k of that element relative to the slice's first k
    int dst;            // its offset in a stage's shared tile (floats)
    uint32_t valid;     // K_CONTIG: bit i = row i in range; D_CONTIG: columns in range (0..4)
    bool vec;

    __device__ __forceinline__ TileLoader(const float* X, int64_t ld_, int64_t d0, int64_t D,
                                          int64_t kb, bool vec_ok, int tid)
        : ld(ld_) {
        if (K_CONTIG) {
            const int pf = tid % KF, dl = tid / KF;
            ptr = X + (d0 + dl) * ld + kb + pf;
            k_off = pf;
            dst = pf * LDS + dl;
            valid = 0;
#pragma unroll
            for (int i = 0; i < kRowItersK; ++i)
                if (d0 + dl + i * kRowsK < D) valid |= 1u << i;
            vec = false;
        } else if (vec_ok) {
            const int dc = (tid % (BD / 4)) * 4, pl = tid / (BD / 4);
            ptr = X + (kb + pl) * ld + d0 + dc;
            k_off = pl;
            dst = pl * LDS + dc;
            const int64_t left = D - (d0 + dc);
            valid = left <= 0 ? 0u : (left >= 4 ? 4u : static_cast<uint32_t>(left));
            vec = true;
        } else {
            const int dl = tid % BD, pl = tid / BD;
            ptr = X + (kb + pl) * ld + d0 + dl;
            k_off = pl;
            dst = pl * LDS + dl;
            valid = d0 + dl < D ? 1u : 0u;
            vec = false;
        }
    }

    // Copies the next slice into the tile at S. `slice_left` = how many k of
    // this block's range remain from the slice's first k on: k beyond it is
    // zero-filled. `fallback` is any valid global address (a zero-byte copy
    // reads nothing).
    __device__ __forceinline__ void load(float* S, int slice_left, const float* fallback) {
        // k still in range from this thread's first element on (k < 2^30: run_config checks).
        const int k_left = slice_left - k_off;
        const int64_t step = K_CONTIG ? kRowsK * ld : (vec ? kKStepV : kKStepS) * ld;
        float* s = S + dst;
        if (K_CONTIG) {
            const float* q = ptr;
#pragma unroll
            for (int i = 0; i < kRowItersK; ++i) {
                const bool row_ok = (valid >> i) & 1u;
#pragma unroll
                for (int j = 0; j < kKItersK; ++j) {
                    const bool ok = row_ok && j * KF < k_left;
                    cp_async4(s + j * KF * LDS + i * kRowsK, ok ? q + j * KF : fallback, ok ? 4 : 0);
                }
                q += step;
            }
        } else if (vec) {
            const float* q = ptr;
#pragma unroll
            for (int j = 0; j < kKItersV; ++j) {
                const int bytes = j * kKStepV < k_left ? static_cast<int>(valid) * 4 : 0;
                cp_async16(s + j * kKStepV * LDS, bytes ? q : fallback, bytes);
                q += step;
            }
        } else {
            const float* q = ptr;
#pragma unroll
            for (int j = 0; j < kKItersS; ++j) {
                const bool ok = valid && j * kKStepS < k_left;
                cp_async4(s + j * kKStepS * LDS, ok ? q : fallback, ok ? 4 : 0);
                q += step;
            }
        }
        ptr += K_CONTIG ? int64_t{BK} : BK * ld;
    }
};

// ---- epilogue -------------------------------------------------------------------------
template <int W> struct VecOf;
template <> struct VecOf<2> { using T = float2; };
template <> struct VecOf<4> { using T = float4; };

template <int W>
__device__ __forceinline__ void vec_load(const float* p, float (&v)[W]) {
    const typename VecOf<W>::T x = *reinterpret_cast<const typename VecOf<W>::T*>(p);
    const float* f = reinterpret_cast<const float*>(&x);
#pragma unroll
    for (int w = 0; w < W; ++w) v[w] = f[w];
}

template <int W>
__device__ __forceinline__ void vec_store(float* p, const float (&v)[W]) {
    typename VecOf<W>::T x;
    float* f = reinterpret_cast<float*>(&x);
#pragma unroll
    for (int w = 0; w < W; ++w) f[w] = v[w];
    *reinterpret_cast<typename VecOf<W>::T*>(p) = x;
}

// The full epilogue of one element: t = alpha * s + beta * C, + bias, ReLU, mask.
// With beta == 0, C is not read (BLAS: NaN in C does not propagate).
__device__ __forceinline__ float finish(const Params& p, float s, float c_old, float bias,
                                        float mask) {
    float t = p.alpha * s;
    if (p.beta != 0.0f) t += p.beta * c_old;
    if (p.bias) t += bias;
    if (p.relu) t = fastmlp::relu(t);             // kernel_math.h: NaN propagates
    if (p.mask) t = fastmlp::relu_grad(t, mask);
    return t;
}

// Writes W consecutive accumulators of row `row`, columns col .. col+W-1 (some
// may lie outside C): the finished values into C, or, in a split-K run, the
// raw sums into this z-slice's partial tile.
template <int W>
__device__ __forceinline__ void store_run(const Params& p, int64_t row, int64_t col,
                                          const float (&v)[W]) {
    if (row >= p.m || col >= p.n) return;
    const bool full = col + W <= p.n;
    if (p.partial) {
        float* dst = p.partial + (static_cast<int64_t>(blockIdx.z) * p.m + row) * p.n + col;
        // Slice z starts at z*m*n floats: 16-byte aligned when n % W == 0 (the
        // workspace itself comes 256-byte aligned from CuPy's pool).
        if (full && p.n % W == 0) {
            vec_store<W>(dst, v);
        } else {
#pragma unroll
            for (int w = 0; w < W; ++w)
                if (col + w < p.n) dst[w] = v[w];
        }
        return;
    }
    float* dst = p.c + row * p.ldc + col;
    if (full && p.vec_c) {
        float c_old[W] = {}, bias[W] = {}, mask[W] = {}, out[W];
        if (p.beta != 0.0f) vec_load<W>(dst, c_old);
        if (p.bias) vec_load<W>(p.bias + col, bias);
        if (p.mask) vec_load<W>(p.mask + row * p.ld_mask + col, mask);
#pragma unroll
        for (int w = 0; w < W; ++w) out[w] = finish(p, v[w], c_old[w], bias[w], mask[w]);
        vec_store<W>(dst, out);
    } else {
#pragma unroll
        for (int w = 0; w < W; ++w) {
            if (col + w >= p.n) break;
            const float c_old = p.beta != 0.0f ? dst[w] : 0.0f;
            const float bias = p.bias ? p.bias[col + w] : 0.0f;
            const float mask = p.mask ? p.mask[row * p.ld_mask + col + w] : 0.0f;
            dst[w] = finish(p, v[w], c_old, bias, mask);
        }
    }
}

// ---- SIMT FP32 math -----------------------------------------------------------------
// BM x BN block tile, WM x WN warp tiles, LM x LN lanes per warp (LM * LN = 32),
// each lane (WM / (4 LM)) x (WN / (4 LN)) sub-tiles of 4 x 4. MINB: blocks per SM
// the register budget is sized for (__launch_bounds__).
template <int BM_, int BN_, int BK_, int WM_, int WN_, int LM_, int LN_, int STAGES_, int MINB_>
struct SimtCfg {
    static constexpr bool kTf32 = false;
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, LM = LM_, LN = LN_;
    static constexpr int kStages = STAGES_, kMinBlocks = MINB_;
    static constexpr int kWarpsM = BM / WM, kWarpsN = BN / WN;
    static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
    static constexpr int kIterM = WM / (4 * LM), kIterN = WN / (4 * LN);
    static constexpr int TM = 4 * kIterM, TN = 4 * kIterN;
    // Rows padded by 4 floats: stride = 4 (mod 32), which keeps the rows
    // 16-byte aligned for the 128-bit reads and makes the transposing 4-byte
    // copies conflict-free (TileLoader).
    static constexpr int kLdA = BM + 4, kLdB = BN + 4;
    static constexpr int kStageFloats = BK * (kLdA + kLdB);
    static constexpr int kSmemBytes = kStages * kStageFloats * 4;

    static_assert(LM * LN == 32, "a warp has 32 lanes");
    static_assert(BM % WM == 0 && BN % WN == 0, "whole warp tiles per block tile");
    static_assert(WM % (4 * LM) == 0 && WN % (4 * LN) == 0, "whole 4x4 sub-tiles per warp tile");
    static_assert(BM % 32 == 0 && BN % 32 == 0, "padded stride must be 4 (mod 32)");
    static_assert(kStages >= 2, "a pipeline needs at least two buffers");
    static_assert(BN <= kThreads, "the colsum needs one thread per tile column");
    static_assert(kThreads <= 1024, "CUDA block size limit");

    struct Acc { float v[TM][TN]; };

    struct Warp {
        int a_off, b_off;   // this lane's first row / column within the block tile
        __device__ __forceinline__ explicit Warp(int tid) {
            const int warp = tid / 32, lane = tid % 32;
            a_off = (warp / kWarpsN) * WM + (lane / LN) * 4;
            b_off = (warp % kWarpsN) * WN + (lane % LN) * 4;
        }
    };

    __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
            for (int j = 0; j < TN; ++j) acc.v[i][j] = 0.0f;
    }

    __device__ __forceinline__ static void compute(const float* As, const float* Bs, Acc& acc,
                                                   const Warp& w) {
#pragma unroll
        for (int kk = 0; kk < BK; ++kk) {
            float a[TM], b[TN];
#pragma unroll
            for (int im = 0; im < kIterM; ++im) {
                const float4 x = *reinterpret_cast<const float4*>(As + kk * kLdA + w.a_off + im * 4 * LM);
                a[4 * im + 0] = x.x; a[4 * im + 1] = x.y; a[4 * im + 2] = x.z; a[4 * im + 3] = x.w;
            }
#pragma unroll
            for (int in = 0; in < kIterN; ++in) {
                const float4 x = *reinterpret_cast<const float4*>(Bs + kk * kLdB + w.b_off + in * 4 * LN);
                b[4 * in + 0] = x.x; b[4 * in + 1] = x.y; b[4 * in + 2] = x.z; b[4 * in + 3] = x.w;
            }
#pragma unroll
            for (int i = 0; i < TM; ++i)
#pragma unroll
                for (int j = 0; j < TN; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
        }
    }

    __device__ __forceinline__ static void store(const Params& p, const Acc& acc, const Warp& w,
                                                 int64_t i0, int64_t j0) {
#pragma unroll
        for (int im = 0; im < kIterM; ++im)
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                const int64_t row = i0 + w.a_off + im * 4 * LM + r;
#pragma unroll
                for (int in = 0; in < kIterN; ++in) {
                    const float v[4] = {acc.v[4 * im + r][4 * in + 0], acc.v[4 * im + r][4 * in + 1],
                                        acc.v[4 * im + r][4 * in + 2], acc.v[4 * im + r][4 * in + 3]};
                    store_run<4>(p, row, j0 + w.b_off + in * 4 * LN, v);
                }
            }
    }
};

// ---- TF32 tensor-core math -----------------------------------------------------------
template <int BM_, int BN_, int BK_, int WM_, int WN_, int STAGES_, int MINB_>
struct Tf32Cfg {
    static constexpr bool kTf32 = true;
    static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_;
    static constexpr int kStages = STAGES_, kMinBlocks = MINB_;
    static constexpr int kWarpsM = BM / WM, kWarpsN = BN / WN;
    static constexpr int kThreads = 32 * kWarpsM * kWarpsN;
    static constexpr int MT = WM / 16, NT = WN / 8;   // mma tiles per warp
    static constexpr int TM = 0, TN = 0;
    // Rows padded by 8 floats: stride = 8 (mod 32), so a fragment read
    // (lane (g, t) reads row t, column g) hits bank 8t + g: all 32 distinct.
    static constexpr int kLdA = BM + 8, kLdB = BN + 8;
    static constexpr int kStageFloats = BK * (kLdA + kLdB);
    static constexpr int kSmemBytes = kStages * kStageFloats * 4;
    // Only LM/LN-free fields are needed by the registry.
    static constexpr int LM = 0, LN = 0;

    static_assert(BM % WM == 0 && BN % WN == 0, "whole warp tiles per block tile");
    static_assert(WM % 16 == 0 && WN % 8 == 0, "whole m16n8 tiles per warp tile");
    static_assert(BK % 8 == 0, "whole k8 steps per slice");
    static_assert(BM % 32 == 0 && BN % 32 == 0, "padded stride must be 8 (mod 32)");
    static_assert(kStages >= 2, "a pipeline needs at least two buffers");
    static_assert(BN <= kThreads, "the colsum needs one thread per tile column");

    struct Acc { float v[MT][NT][4]; };

    struct Warp {
        int a_off, b_off, g, t;
        __device__ __forceinline__ explicit Warp(int tid) {
            const int warp = tid / 32, lane = tid % 32;
            g = lane / 4;
            t = lane % 4;
            a_off = (warp / kWarpsN) * WM;
            b_off = (warp % kWarpsN) * WN;
        }
    };

    __device__ __forceinline__ static void zero(Acc& acc) {
#pragma unroll
        for (int i = 0; i < MT; ++i)
#pragma unroll
            for (int j = 0; j < NT; ++j)
#pragma unroll
                for (int r = 0; r < 4; ++r) acc.v[i][j][r] = 0.0f;
    }

    __device__ __forceinline__ static void compute(const float* As, const float* Bs, Acc& acc,
                                                   const Warp& w) {
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            uint32_t af[MT][4], bf[NT][2];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                const float* s = As + (kk + w.t) * kLdA + w.a_off + mt * 16 + w.g;
                af[mt][0] = to_tf32(s[0]);
                af[mt][1] = to_tf32(s[8]);
                af[mt][2] = to_tf32(s[4 * kLdA]);
                af[mt][3] = to_tf32(s[4 * kLdA + 8]);
            }
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const float* s = Bs + (kk + w.t) * kLdB + w.b_off + nt * 8 + w.g;
                bf[nt][0] = to_tf32(s[0]);
                bf[nt][1] = to_tf32(s[4 * kLdB]);
            }
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt) mma_tf32(acc.v[mt][nt], af[mt], bf[nt]);
        }
    }

    __device__ __forceinline__ static void store(const Params& p, const Acc& acc, const Warp& w,
                                                 int64_t i0, int64_t j0) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) {
                const int64_t row = i0 + w.a_off + mt * 16 + w.g;
                const int64_t col = j0 + w.b_off + nt * 8 + 2 * w.t;
                const float lo[2] = {acc.v[mt][nt][0], acc.v[mt][nt][1]};
                const float hi[2] = {acc.v[mt][nt][2], acc.v[mt][nt][3]};
                store_run<2>(p, row, col, lo);
                store_run<2>(p, row + 8, col, hi);
            }
    }
};

// ---- the kernel ------------------------------------------------------------------------
// C must not overlap A, B, bias or mask (as in BLAS); the Python layer checks.
template <class Cfg, bool TRANS_A, bool TRANS_B>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
gemm_family_f32(const Params p) {
#if FASTMLP_FAMILY_DEVICE
    constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, S = Cfg::kStages;
    extern __shared__ float4 smem_f4[];   // float4: 16-byte alignment for the copies
    float* smem = reinterpret_cast<float*>(smem_f4);

    const int tid = static_cast<int>(threadIdx.x);
    // M tiles on x: gridDim.x allows 2^31 - 1 blocks, y and z only 65535.
    const int64_t i0 = static_cast<int64_t>(blockIdx.x) * BM;
    const int64_t j0 = static_cast<int64_t>(blockIdx.y) * BN;
    const int64_t kb = static_cast<int64_t>(blockIdx.z) * p.k_per_split;
    const int64_t ke = p.k < kb + p.k_per_split ? p.k : kb + p.k_per_split;
    // k < 2^30 (run_config checks), so k counts fit an int. span >= 1: the
    // launcher sizes the grid so that every z-slice starts below k.
    const int span = static_cast<int>(ke - kb);
    const int ntiles = (span + BK - 1) / BK;

    // op(A)(i, p) = trans_a ? A[p*lda + i] : A[i*lda + p]; op(B)(p, j) =
    // trans_b ? B[j*ldb + p] : B[p*ldb + j].
    using LoadA = TileLoader<BM, BK, Cfg::kLdA, Cfg::kThreads, !TRANS_A>;
    using LoadB = TileLoader<BN, BK, Cfg::kLdB, Cfg::kThreads, TRANS_B>;
    LoadA load_a(p.a, p.lda, i0, p.m, kb, p.vec_a != 0, tid);
    LoadB load_b(p.b, p.ldb, j0, p.n, kb, p.vec_b != 0, tid);

    // Slices are loaded in order, tile t into buffer t % S.
    auto load_stage = [&](int stage, int tile) {
        float* As = smem + stage * Cfg::kStageFloats;
        const int left = span - tile * BK;
        load_a.load(As, left, p.a);
        load_b.load(As + BK * Cfg::kLdA, left, p.b);
    };

    // Prologue: S-1 slices in flight. Every thread commits exactly one group
    // per slot (empty when there is no tile), so wait_group counts line up.
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
        if (s < ntiles) load_stage(s, s);
        cp_async_commit();
    }

    typename Cfg::Acc acc;
    Cfg::zero(acc);
    const typename Cfg::Warp warp(tid);
    const bool do_colsum = p.colsum != nullptr && blockIdx.x == 0 && tid < BN;
    float csum = 0.0f;

    int stage = 0;   // = t % S
    for (int t = 0; t < ntiles; ++t) {
        // Groups committed so far: S-1+t; at most S-2 pending means slice t
        // has landed (for this thread's copies) ...
        cp_async_wait<S - 2>();
        // ... and after the barrier for everyone's. The barrier also means all
        // threads finished computing slice t-1, whose buffer the copy below reuses.
        __syncthreads();
        {
            const int tn = t + S - 1;
            int sn = stage + S - 1;
            sn = sn >= S ? sn - S : sn;
            if (tn < ntiles) load_stage(sn, tn);
            cp_async_commit();
        }
        const float* As = smem + stage * Cfg::kStageFloats;
        const float* Bs = As + BK * Cfg::kLdA;
        Cfg::compute(As, Bs, acc, warp);
        if (do_colsum) {
            // Zero-filled beyond k, so a partial slice adds nothing extra.
#pragma unroll
            for (int kk = 0; kk < BK; ++kk) csum += Bs[kk * Cfg::kLdB + tid];
        }
        stage = stage + 1 == S ? 0 : stage + 1;
    }
    cp_async_wait<0>();   // only empty groups remain; leave nothing in flight

    if (do_colsum && j0 + tid < p.n) p.colsum[static_cast<int64_t>(blockIdx.z) * p.n + j0 + tid] = csum;
    Cfg::store(p, acc, warp, i0, j0);
#endif
}

// ---- host side ---------------------------------------------------------------------------
// Raises the kernel's dynamic shared-memory limit (needed above 48 KiB) once
// per device; `done` holds one bit per device ordinal < 64.
template <class Kernel>
void allow_smem(Kernel kernel, int bytes, int device, std::atomic<uint64_t>& done) {
    if (bytes <= 48 * 1024) return;
    const uint64_t bit = device < 64 ? (uint64_t{1} << device) : 0;
    if (bit && (done.load(std::memory_order_acquire) & bit)) return;
    CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
    if (bit) done.fetch_or(bit, std::memory_order_acq_rel);
}

template <class Cfg>
struct Launcher {
    template <bool TA, bool TB>
    static void go(const Params& p, dim3 grid, cudaStream_t stream, int device) {
        static std::atomic<uint64_t> done{0};
        auto kernel = gemm_family_f32<Cfg, TA, TB>;
        allow_smem(kernel, Cfg::kSmemBytes, device, done);
        kernel<<<grid, Cfg::kThreads, Cfg::kSmemBytes, stream>>>(p);
        detail::check_launch();
    }

    static void launch(bool ta, bool tb, const Params& p, dim3 grid, cudaStream_t stream,
                       int device) {
        if (!ta && !tb) go<false, false>(p, grid, stream, device);
        else if (!ta && tb) go<false, true>(p, grid, stream, device);
        else if (ta && !tb) go<true, false>(p, grid, stream, device);
        else go<true, true>(p, grid, stream, device);
    }

    static ConfigInfo info(const char* name) {
        return ConfigInfo{name,        Cfg::kTf32, Cfg::BM, Cfg::BN,        Cfg::BK, Cfg::WM,
                          Cfg::WN,     Cfg::TM,    Cfg::TN, Cfg::kStages,   Cfg::kThreads,
                          Cfg::kSmemBytes, 80};
    }
};

// A registered configuration: what it is and how to launch it.
using LaunchFn = void (*)(bool, bool, const Params&, dim3, cudaStream_t, int);
struct Registered {
    ConfigInfo info;
    LaunchFn launch;
};

// Defined in gemm_family_simt.cu / gemm_family_tf32.cu.
std::vector<Registered> simt_configs();
std::vector<Registered> tf32_configs();

}  // namespace family
}  // namespace cuda
}  // namespace fastmlp
