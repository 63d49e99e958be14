// The CPU GEMM driver, written once and compiled per instruction set.
//
// Included only by gemm_avx512.cpp, gemm_avx2.cpp and gemm_generic.cpp, each
// compiled with its own -m flags and each defining a SIMD traits class S (the
// vector type, its width W and the ops below) before including this file.
// Everything here sits in an anonymous namespace: the three copies must never
// be merged by the linker (an AVX-512 copy of an inline function picked for
// the generic path would crash older CPUs), so this file includes no C++
// library header that instantiates templates, only <cstdint>/<cstdlib>, and
// uses the compiler's __atomic builtins rather than std::atomic.
//
// The scheme is BLIS's (Van Zee & van de Geijn, "BLIS: A Framework for Rapidly
// Instantiating BLAS Functionality", 2015):
//
//   for jc in N by NC:              thread's columns, NC at a time
//     for pc in K by KC:            one k-slice
//       B~ = op(B)[pc:+KC, jc:+NC]  packed into NR-wide k-major panels (or read
//                                   in place when op(B) rows are contiguous)
//       for ic in M by MC:
//         A~ = op(A)[ic:+MC, pc:+KC]  packed into MR-tall k-major panels (or read
//                                     in place, see below)
//         for jr in NC by NR: for ir in MC by MR:
//           micro-kernel: the MR x NR tile of C += A~panel(ir) * B~panel(jr)
//
// The micro-kernel keeps the MR x NR tile of C in MR * NV vector registers
// (NR = NV * W); per k it loads NV vectors of B, broadcasts MR scalars of A
// and issues MR * NV FMAs, so B and A traffic per FMA is 1/MR and 1/NV.
//
// Row-major reasoning. op(A)(i, p) is A[i*lda + p], or A[p*lda + i] with
// trans_a; op(B)(p, j) is B[p*ldb + j], or B[j*ldb + p] with trans_b.
//  - op(B) not transposed: the NR floats of a B panel row are contiguous in B
//    itself, so B can be read in place (b_rs = ldb); a transposed B is packed.
//  - op(A) transposed: the MR floats the micro-kernel broadcasts at one k are
//    contiguous in A ("A-cont", like a packed panel with stride lda); not
//    transposed, they are MR rows read at the same offset ("A-rows").
// Packing is still chosen for large, much reused operands: packed panels are
// contiguous (no TLB misses, no cache-set conflicts of power-of-two strides)
// and every load in the micro-kernel is a full vector. A C at most one vector
// wide (n <= W: the 128 -> 10 layer) takes a tile of its own (run_narrow).
//
// Edges without scalar code: a panel narrower than NR is zero-padded when
// packed, or read with masked loads in place; a panel shorter than MR is
// packed zero-padded (A-cont) or reads a valid row in place of the missing
// ones (A-rows), and the extra rows are never stored. C is written with
// masked stores.
//
// Determinism: the k-slices depend only on k and KC, and the micro-kernel
// sums p in order, so every C element's rounding is fixed whatever the
// thread count or the partition of C among threads.
#pragma once

#include <cstdint>
#include <cstdlib>

#include "cpu/activation.h"
#include "cpu/gemm_impl.h"
#include "cpu/parallel.h"

namespace fastmlp {
namespace cpu {
namespace FASTMLP_GEMM_ISA {
namespace {

#define FASTMLP_INLINE inline __attribute__((always_inline))

inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Per-thread packing buffers, grown on first use and kept (kernels do not
// allocate per call). 64-byte aligned for full-vector loads.
struct Scratch {
    float* p = nullptr;
    int64_t n = 0;
    ~Scratch() { std::free(p); }
    // Null when out of memory (the caller reports it after the parallel
    // region: an exception must not cross an OpenMP region).
    float* get(int64_t floats) {
        if (floats > n) {
            std::free(p);
            const int64_t bytes = cdiv(floats * 4, 64) * 64;
            p = static_cast<float*>(std::aligned_alloc(64, static_cast<size_t>(bytes)));
            n = p ? floats : 0;
        }
        return p;
    }
};
thread_local Scratch tl_a, tl_b, tl_edge, tl_nb, tl_sk;

template <class S>
struct Gemm {
    using V = typename S::V;
    static constexpr int W = S::W, MR = S::MR, NV = S::NV, NR = S::NV * S::W;
    static constexpr int64_t KC = S::KC, MC = S::MC, NC = S::NC;
    static_assert(MC % MR == 0 && NC % NR == 0, "blocks hold whole micro-panels");

    // How a finished micro-tile goes into C: t = alpha*acc + beta*C (C not
    // read when beta == 0), then the epilogue on the last k-slice.
    struct Update {
        float alpha, beta;
        const float* bias;     // at the tile's first column, or null
        bool relu;
        const float* mask;     // at the tile's origin, or null
        int64_t ld_mask;
    };

    static FASTMLP_INLINE V finish(V t, int i, int v, int cnt, const Update& u) {
        if (u.bias) t = S::add(t, cnt == W ? S::load(u.bias + v * W) : S::load_n(u.bias + v * W, cnt));
        if (u.relu) t = S::relu(t);
        if (u.mask) {
            const float* mk = u.mask + i * u.ld_mask + v * W;
            t = S::where_pos(cnt == W ? S::load(mk) : S::load_n(mk, cnt), t);
        }
        return t;
    }

    // One MR x NR tile: C[0:mr, 0:nr] (+)= A-panel @ B-panel over kc.
    //   kACont: A at (i, p) is a[p*a_ld + i] (packed panel, or op(A) = A^T in
    //           place); otherwise a[i*a_ld + p] (op(A) = A in place).
    //   kMaskB: the B panel is read in place and is narrower than NR.
    //   R x NVT: the tile's rows and vectors (the narrow tile: 2*MR x 1).
    template <bool kACont, bool kMaskB, int R = MR, int NVT = NV>
    static void tile(int64_t kc, const float* __restrict a, int64_t a_ld,
                     const float* __restrict b, int64_t b_rs, float* c, int64_t ldc, int mr,
                     int nr, const Update& u) {
        V acc[R][NVT];
#pragma GCC unroll 16
        for (int i = 0; i < R; ++i)
#pragma GCC unroll 8
            for (int v = 0; v < NVT; ++v) acc[i][v] = S::zero();
        int cnt[NVT];
#pragma GCC unroll 8
        for (int v = 0; v < NVT; ++v) {
            const int left = nr - v * W;
            cnt[v] = left >= W ? W : (left > 0 ? left : 0);
        }
        if (kACont) {
            for (int64_t p = 0; p < kc; ++p) {
                V bv[NVT];
#pragma GCC unroll 8
                for (int v = 0; v < NVT; ++v)
                    bv[v] = !kMaskB || cnt[v] == W ? S::load(b + v * W)
                            : cnt[v] > 0           ? S::load_n(b + v * W, cnt[v])
                                                   : S::zero();
#pragma GCC unroll 16
                for (int i = 0; i < R; ++i) {
                    const V ai = S::set1(a[i]);
#pragma GCC unroll 8
                    for (int v = 0; v < NVT; ++v) acc[i][v] = S::fma(ai, bv[v], acc[i][v]);
                }
                a += a_ld;
                b += b_rs;
            }
        } else {
            const float* ar[R];
#pragma GCC unroll 16
            for (int i = 0; i < R; ++i) ar[i] = a + (i < mr ? i : 0) * a_ld;
            for (int64_t p = 0; p < kc; ++p) {
                V bv[NVT];
#pragma GCC unroll 8
                for (int v = 0; v < NVT; ++v)
                    bv[v] = !kMaskB || cnt[v] == W ? S::load(b + v * W)
                            : cnt[v] > 0           ? S::load_n(b + v * W, cnt[v])
                                                   : S::zero();
#pragma GCC unroll 16
                for (int i = 0; i < R; ++i) {
                    const V ai = S::set1(ar[i][p]);
#pragma GCC unroll 8
                    for (int v = 0; v < NVT; ++v) acc[i][v] = S::fma(ai, bv[v], acc[i][v]);
                }
                b += b_rs;
            }
        }
        const V alpha = S::set1(u.alpha), beta = S::set1(u.beta);
        const bool epi = u.bias || u.relu || u.mask;
#pragma GCC unroll 16
        for (int i = 0; i < R; ++i) {
            if (i >= mr) break;
            float* ci = c + i * ldc;
#pragma GCC unroll 8
            for (int v = 0; v < NVT; ++v) {
                if (cnt[v] == 0) break;
                V t = S::mul(alpha, acc[i][v]);
                if (cnt[v] == W) {
                    if (u.beta != 0.0f) t = S::fma(beta, S::load(ci + v * W), t);
                    if (epi) t = finish(t, i, v, W, u);
                    S::store(ci + v * W, t);
                } else {
                    if (u.beta != 0.0f) t = S::fma(beta, S::load_n(ci + v * W, cnt[v]), t);
                    if (epi) t = finish(t, i, v, cnt[v], u);
                    S::store_n(ci + v * W, t, cnt[v]);
                }
            }
        }
    }

    // op(A)[i0:i0+mc, p0:p0+kc] -> MR-tall k-major panels, zero-padded.
    static void pack_a(const GemmArgs& g, int64_t i0, int64_t mc, int64_t p0, int64_t kc,
                       float* dst) {
        for (int64_t ir = 0; ir < mc; ir += MR, dst += kc * MR) {
            const int64_t mr = imin(MR, mc - ir);
            if (g.trans_a) {  // op(A)(i, p) = A[p*lda + i]: MR contiguous floats per p
                const float* src = g.a + p0 * g.lda + i0 + ir;
                for (int64_t p = 0; p < kc; ++p) {
                    float* d = dst + p * MR;
                    for (int64_t i = 0; i < mr; ++i) d[i] = src[p * g.lda + i];
                    for (int64_t i = mr; i < MR; ++i) d[i] = 0.0f;
                }
            } else {          // op(A)(i, p) = A[i*lda + p]: a transpose, row by row
                for (int64_t i = 0; i < MR; ++i) {
                    if (i < mr) {
                        const float* src = g.a + (i0 + ir + i) * g.lda + p0;
                        for (int64_t p = 0; p < kc; ++p) dst[p * MR + i] = src[p];
                    } else {
                        for (int64_t p = 0; p < kc; ++p) dst[p * MR + i] = 0.0f;
                    }
                }
            }
        }
    }

    // op(B)[p0:p0+kc, j0:j0+nc] -> NR-wide k-major panels, zero-padded; with
    // row_scale_k [issue 17] each row p scaled by s[p] on the way (the packed
    // panel stores the rounded product, kernel_math.h row_scaled).
    static void pack_b(const GemmArgs& g, int64_t p0, int64_t kc, int64_t j0, int64_t nc,
                       float* dst) {
        if (g.ep.row_scale_k) return pack_b_scaled(g, p0, kc, j0, nc, dst);
        for (int64_t jr = 0; jr < nc; jr += NR, dst += kc * NR) {
            const int64_t nr = imin(NR, nc - jr);
            if (!g.trans_b) {  // rows of op(B) are contiguous in B
                const float* src = g.b + p0 * g.ldb + j0 + jr;
                for (int64_t p = 0; p < kc; ++p) {
                    float* d = dst + p * NR;
                    for (int64_t j = 0; j < nr; ++j) d[j] = src[p * g.ldb + j];
                    for (int64_t j = nr; j < NR; ++j) d[j] = 0.0f;
                }
            } else {           // op(B)(p, j) = B[j*ldb + p]: a transpose, row by row
                for (int64_t j = 0; j < NR; ++j) {
                    if (j < nr) {
                        const float* src = g.b + (j0 + jr + j) * g.ldb + p0;
                        for (int64_t p = 0; p < kc; ++p) dst[p * NR + j] = src[p];
                    } else {
                        for (int64_t p = 0; p < kc; ++p) dst[p * NR + j] = 0.0f;
                    }
                }
            }
        }
    }

    static void pack_b_scaled(const GemmArgs& g, int64_t p0, int64_t kc, int64_t j0, int64_t nc,
                              float* dst) {
        const float* __restrict s = g.ep.row_scale_k + p0;
        for (int64_t jr = 0; jr < nc; jr += NR, dst += kc * NR) {
            const int64_t nr = imin(NR, nc - jr);
            if (!g.trans_b) {
                const float* src = g.b + p0 * g.ldb + j0 + jr;
                for (int64_t p = 0; p < kc; ++p) {
                    float* d = dst + p * NR;
                    const float sp = s[p];
                    for (int64_t j = 0; j < nr; ++j) d[j] = row_scaled(src[p * g.ldb + j], sp);
                    for (int64_t j = nr; j < NR; ++j) d[j] = 0.0f;
                }
            } else {
                for (int64_t j = 0; j < NR; ++j) {
                    if (j < nr) {
                        const float* src = g.b + (j0 + jr + j) * g.ldb + p0;
                        for (int64_t p = 0; p < kc; ++p) dst[p * NR + j] = row_scaled(src[p], s[p]);
                    } else {
                        for (int64_t p = 0; p < kc; ++p) dst[p * NR + j] = 0.0f;
                    }
                }
            }
        }
    }

    // The k-slice length: at most KC, and the slices as even as possible so
    // the last one is not a sliver (depends on k only: see Determinism).
    static int64_t slice_len(int64_t k) {
        const int64_t slices = cdiv(k, KC);
        return cdiv(cdiv(k, slices), 4) * 4;
    }

    // C[i0:i1, j0:j1] for one thread.
    // Returns false when a packing buffer could not be allocated.
    static bool block(const GemmArgs& g, int64_t i0, int64_t i1, int64_t j0, int64_t j1,
                      bool pack_a_, bool pack_b_) {
        const int64_t ks = slice_len(g.k);
        const int64_t n_cols = j1 - j0;
        float* bbuf = pack_b_ ? tl_b.get(ks * imin(NC, cdiv(n_cols, NR) * NR)) : nullptr;
        float* abuf = pack_a_ ? tl_a.get(ks * imin(MC, cdiv(i1 - i0, MR) * MR)) : nullptr;
        float* ebuf = (!pack_a_ && g.trans_a) ? tl_edge.get(ks * MR) : nullptr;
        if ((pack_b_ && !bbuf) || (pack_a_ && !abuf) || (!pack_a_ && g.trans_a && !ebuf))
            return false;
        for (int64_t jc = j0; jc < j1; jc += NC) {
            const int64_t nc = imin(NC, j1 - jc);
            for (int64_t pc = 0; pc < g.k; pc += ks) {
                const int64_t kc = imin(ks, g.k - pc);
                const bool first = pc == 0, last = pc + kc == g.k;
                if (pack_b_) pack_b(g, pc, kc, jc, nc, bbuf);
                for (int64_t ic = i0; ic < i1; ic += MC) {
                    const int64_t mc = imin(MC, i1 - ic);
                    if (pack_a_) pack_a(g, ic, mc, pc, kc, abuf);
                    for (int64_t jr = 0; jr < nc; jr += NR) {
                        const int nr = static_cast<int>(imin(NR, nc - jr));
                        const float* bp;
                        int64_t b_rs;
                        if (pack_b_) {
                            bp = bbuf + (jr / NR) * kc * NR;
                            b_rs = NR;
                        } else {
                            bp = g.b + pc * g.ldb + jc + jr;
                            b_rs = g.ldb;
                        }
                        const bool mask_b = !pack_b_ && nr < NR;
                        Update u;
                        u.alpha = g.alpha;
                        u.beta = first ? g.beta : 1.0f;
                        u.bias = (last && g.ep.bias) ? g.ep.bias + jc + jr : nullptr;
                        u.relu = last && g.ep.relu;
                        u.ld_mask = g.ep.ld_mask;
                        for (int64_t ir = 0; ir < mc; ir += MR) {
                            const int mr = static_cast<int>(imin(MR, mc - ir));
                            float* ct = g.c + (ic + ir) * g.ldc + jc + jr;
                            u.mask = (last && g.ep.relu_mask)
                                         ? g.ep.relu_mask + (ic + ir) * g.ep.ld_mask + jc + jr
                                         : nullptr;
                            if (pack_a_) {
                                const float* ap = abuf + (ir / MR) * kc * MR;
                                if (mask_b) tile<true, true>(kc, ap, MR, bp, b_rs, ct, g.ldc, mr, nr, u);
                                else tile<true, false>(kc, ap, MR, bp, b_rs, ct, g.ldc, mr, nr, u);
                            } else if (g.trans_a) {
                                const float* ap = g.a + pc * g.lda + ic + ir;
                                int64_t a_ld = g.lda;
                                if (mr < MR) {  // a short panel in place would read past A's end
                                    pack_a(g, ic + ir, mr, pc, kc, ebuf);
                                    ap = ebuf;
                                    a_ld = MR;
                                }
                                if (mask_b) tile<true, true>(kc, ap, a_ld, bp, b_rs, ct, g.ldc, mr, nr, u);
                                else tile<true, false>(kc, ap, a_ld, bp, b_rs, ct, g.ldc, mr, nr, u);
                            } else {
                                const float* ap = g.a + (ic + ir) * g.lda + pc;
                                if (mask_b) tile<false, true>(kc, ap, g.lda, bp, b_rs, ct, g.ldc, mr, nr, u);
                                else tile<false, false>(kc, ap, g.lda, bp, b_rs, ct, g.ldc, mr, nr, u);
                            }
                        }
                    }
                    // [issue 15] The activation epilogue (cpu/activation.cpp: its loops
                    // vectorised per activation, compiled once for every driver) once
                    // per finished MC x NC block (<= 256 KB: still in L2) rather than
                    // per micro-tile inside tile(): its
                    // rows are then up to NC long, and the vector loops over them
                    // (erf, exp polynomials, the dropout Philox) run at the speed of
                    // the standalone kernel; per 8 x 32 tile they ran 2x slower
                    // (gelu' in dX at 1024 x 784: 1.7 ms over the GEMM vs 0.8 ms).
                    if (last && (g.ep.has_act() || g.ep.has_grad_act()))
                        act_epilogue_rows(g.ep, g.c + ic * g.ldc + jc, g.ldc, ic, mc, jc, nc,
                                          g.n);
                }
            }
        }
        return true;
    }

    // colsum_b[j] = sum_p B[p*ldb + j] for j in [j0, j1), p in order (each term
    // times row_scale_k[p] when set [issue 17]: cpu/gemm_rowscale.cpp).
    static void colsum(const GemmArgs& g, int64_t j0, int64_t j1) {
        if (g.ep.row_scale_k)
            return colsum_row_scaled(g.b, g.ldb, g.ep.row_scale_k, g.k, j0, j1, g.ep.colsum_b);
        float* __restrict s = g.ep.colsum_b;
        for (int64_t j = j0; j < j1; ++j) s[j] = 0.0f;
        for (int64_t p = 0; p < g.k; ++p) {
            const float* __restrict row = g.b + p * g.ldb;
            for (int64_t j = j0; j < j1; ++j) s[j] += row[j];
        }
    }

    // -- narrow C: n <= W, one vector per row ------------------------------------
    //
    // The 128 -> 10 layer's products (X@W: n = 10; dW: 128 x 10) would waste most
    // of an NR-wide tile on padding columns. Here the tile is RN rows x one vector
    // (tile<..., RN, 1>): per k, one masked load of B's row (in place; a
    // transposed B is packed first), RN broadcasts of A read in place, RN FMAs;
    // RN accumulators hide the FMA latency. Every C
    // element sums p = 0..k-1 in order in one accumulator: deterministic, and
    // independent of the thread count (threads take row bands).
    static constexpr int RN = 2 * MR;

    static bool run_narrow(const GemmArgs& g) {
        // op(B)'s rows are read in place with masked loads; a transposed B is
        // packed first into k x W (k*n floats: small next to the m*k*n work),
        // and so is a row-scaled one [issue 17], each row times s[p] (the
        // tile then reads the same values the unscaled call would, times s).
        const float* bp = g.b;
        int64_t b_rs = g.ldb;
        const float* __restrict rs = g.ep.row_scale_k;
        if (g.trans_b || rs) {
            float* pk = tl_nb.get(g.k * W);
            if (pk == nullptr) return false;
            if (!g.trans_b) {  // one masked vector per row: s[p] * B's row (row_scaled)
                for (int64_t p = 0; p < g.k; ++p)
                    S::store(pk + p * W, S::mul(S::load_n(g.b + p * g.ldb, int(g.n)), S::set1(rs[p])));
            } else {
                for (int64_t j = 0; j < g.n; ++j) {
                    const float* __restrict src = g.b + j * g.ldb;
                    if (rs)
                        for (int64_t p = 0; p < g.k; ++p) pk[p * W + j] = row_scaled(src[p], rs[p]);
                    else
                        for (int64_t p = 0; p < g.k; ++p) pk[p * W + j] = src[p];
                }
            }
            bp = pk;
            b_rs = W;
        }
        const int64_t tiles = cdiv(g.m, RN);
        const bool act = g.ep.has_act() || g.ep.has_grad_act();
        const int64_t want = g.threads > 1 ? int64_t(g.threads) * kChunksPerThread : 1;
        const int64_t parts = tiles < want ? tiles : want;
        bool ok = true;
        auto chunk = [&](int64_t t) {
            const int64_t t0 = tiles * t / parts, t1 = tiles * (t + 1) / parts;
            float* edge = nullptr;
            for (int64_t tile_i = t0; tile_i < t1; ++tile_i) {
                const int64_t i0 = tile_i * RN;
                const int mr = static_cast<int>(imin(RN, g.m - i0));
                Update u;
                u.alpha = g.alpha;
                u.beta = g.beta;
                u.bias = g.ep.bias;
                u.relu = g.ep.relu;
                u.ld_mask = g.ep.ld_mask;
                u.mask = g.ep.relu_mask ? g.ep.relu_mask + i0 * g.ep.ld_mask : nullptr;
                float* ct = g.c + i0 * g.ldc;
                if (!g.trans_a) {
                    tile<false, true, RN, 1>(g.k, g.a + i0 * g.lda, g.lda, bp, b_rs, ct, g.ldc, mr, int(g.n), u);
                } else if (mr == RN) {
                    tile<true, true, RN, 1>(g.k, g.a + i0, g.lda, bp, b_rs, ct, g.ldc, mr, int(g.n), u);
                } else {  // a short panel of A^T in place would read past A's end: pack it
                    if (edge == nullptr) edge = tl_edge.get(g.k * RN);
                    if (edge == nullptr) {
                        __atomic_store_n(&ok, false, __ATOMIC_RELAXED);
                        return;
                    }
                    for (int64_t p = 0; p < g.k; ++p)
                        for (int i = 0; i < RN; ++i)
                            edge[p * RN + i] = i < mr ? g.a[p * g.lda + i0 + i] : 0.0f;
                    tile<true, true, RN, 1>(g.k, edge, RN, bp, b_rs, ct, g.ldc, mr, int(g.n), u);
                }
                if (act)  // [issue 15] the activation epilogue on these rows, while in L1
                    act_epilogue_rows(g.ep, ct, g.ldc, i0, mr, 0, g.n, g.n);
            }
        };
        parallel_chunks(parts, g.threads, chunk);
        if (g.ep.colsum_b && rs) {
            // [issue 17] The column sums of the scaled B from its packed copy: one
            // vector add per row, p in order (lane j is column j), so the bits of
            // colsum_row_scaled without a second pass over B. Only additions of
            // stored products here: nothing can be fused into an FMA.
            V acc = S::zero();
            for (int64_t p = 0; p < g.k; ++p) acc = S::add(acc, S::load(bp + p * W));
            S::store_n(g.ep.colsum_b, acc, int(g.n));
        } else if (g.ep.colsum_b) {
            colsum(g, 0, g.n);
        }
        return __atomic_load_n(&ok, __ATOMIC_RELAXED);
    }

    // -- few rows, deep k: threads take k-slices ---------------------------------
    //
    // The 784 -> 128 layer's X@W at batch 32: C is 32 x 128 (4 row panels), W is
    // 784 x 128. Splitting C's columns among threads has every thread read half
    // of every row of W, so each cache line of W lives in both cores' caches,
    // and the optimizer's write to W right after (the other core's half of the
    // rows) pays a cross-core invalidation per line -- Adam over 100k parameters
    // took 4x longer after such a GEMM than alone. Here thread t computes whole
    // k-slices (rows of W): slice 0 into C, slice i > 0 into a scratch C_i, then
    // C_i are added in slice order and the epilogue applied. That is exactly the
    // arithmetic of the sequential slice loop (t = alpha*acc_i + C, the epilogue
    // on the last), so the bits do not change.
    static bool run_splitk(const GemmArgs& g) {
        const int64_t ks = slice_len(g.k), slices = cdiv(g.k, ks);
        float* part = tl_sk.get((slices - 1) * g.m * g.n);
        if (part == nullptr) return false;
        bool ok = true;
        auto chunk = [&](int64_t i) {
            const int64_t pc = i * ks;
            GemmArgs h = g;
            h.k = imin(ks, g.k - pc);
            h.a = g.trans_a ? g.a + pc * g.lda : g.a + pc;
            h.b = g.trans_b ? g.b + pc : g.b + pc * g.ldb;
            h.ep = GemmEpilogue();
            // [issue 17] the slice's rows of the scale (run_direct packs B scaled)
            h.ep.row_scale_k = g.ep.row_scale_k ? g.ep.row_scale_k + pc : nullptr;
            h.threads = 1;
            if (i > 0) {
                h.c = part + (i - 1) * g.m * g.n;
                h.ldc = g.n;
                h.beta = 0.0f;
            }
            if (!run_direct(h)) __atomic_store_n(&ok, false, __ATOMIC_RELAXED);
        };
        parallel_chunks(slices, g.threads, chunk);
        if (!__atomic_load_n(&ok, __ATOMIC_RELAXED)) return false;
        const GemmEpilogue& ep = g.ep;
        for (int64_t i = 1; i < slices; ++i) {
            const float* __restrict pi = part + (i - 1) * g.m * g.n;
            const bool last = i == slices - 1;
            for (int64_t r = 0; r < g.m; ++r) {
                float* __restrict cr = g.c + r * g.ldc;
                const float* __restrict pr = pi + r * g.n;
                if (!last) {
                    for (int64_t j = 0; j < g.n; ++j) cr[j] = pr[j] + cr[j];
                    continue;
                }
                for (int64_t j = 0; j < g.n; ++j) cr[j] = epilogue_at(pr[j] + cr[j], ep, r, j);
                if (ep.has_act() || ep.has_grad_act())  // [issue 15]
                    act_epilogue_rows(ep, cr, g.ldc, r, 1, 0, g.n, g.n);
            }
        }
        if (ep.colsum_b) colsum(g, 0, g.n);
        return true;
    }

    // Returns false when out of memory for the packing buffers.
    static bool run(const GemmArgs& g) {
        if (g.n <= W) return run_narrow(g);
        if (g.threads > 1 && g.m <= 16 * MR && g.k > slice_len(g.k)) return run_splitk(g);
        return run_direct(g);
    }

    static bool run_direct(const GemmArgs& g) {
        const int64_t mp = cdiv(g.m, MR), np = cdiv(g.n, NR);
        // Pack B when it must be transposed, or when it is large and reused by
        // many row panels; pack A when it is large and not already in panel
        // order (see the header comment).
        // A row-scaled B [issue 17] is always packed: the scaling happens there.
        const bool pack_b_ = g.trans_b || g.ep.row_scale_k != nullptr ||
                             (g.k * g.n >= (int64_t(1) << 16) && mp >= 8);
        // A in place is op(A)'s rows, read as MR streams: measured faster than
        // packing it unless it is reused by many column panels (AMD EPYC, Zen 4:
        // 784->128 X@W at batch 8192 went from 0.77x to 1.1x NumPy's SkylakeX
        // kernel; 1024^3 from 0.97x to 1.0-1.2x).
        const bool pack_a_ = !g.trans_a ? (g.k * g.m >= (int64_t(1) << 16) && np >= 64)
                                        : (g.k * g.m >= (int64_t(1) << 18) && np >= 8);
        // Threads split C into bands along its longer side: a column band packs
        // its own B panels but needs all of op(A) (packed once per band when A is
        // packed), a row band the reverse. Splitting the longer side shares the
        // smaller operand (e.g. the forward X@W of a 784->128 layer at batch 8192:
        // row bands, each packing a slice of X, all reading W).
        const bool by_cols = g.threads <= 1 ? true
                             : np >= g.threads && (np * NR >= mp * MR || mp < g.threads);
        // Chunk t owns a column (or row) band of C and the matching share of the
        // column sums. A thread that is not running when the loop starts leaves
        // its chunks to the others (cpu/parallel.h). Several chunks per thread
        // bound what a thread descheduled mid-chunk holds up, except when each
        // chunk would pack its own copy of the shared operand.
        const bool copies = by_cols ? pack_a_ : pack_b_;
        const int64_t bands = by_cols ? np : mp;
        const int64_t want = g.threads > 1 && !copies ? int64_t(g.threads) * kChunksPerThread
                                                      : int64_t(g.threads);
        const int64_t parts = bands < want ? bands : want;
        bool ok = true;
        auto chunk = [&](int64_t t) {
            bool mine = true;
            if (by_cols) {
                const int64_t p0 = np * t / parts, p1 = np * (t + 1) / parts;
                if (p1 > p0) mine = block(g, 0, g.m, p0 * NR, imin(g.n, p1 * NR), pack_a_, pack_b_);
            } else {
                const int64_t p0 = mp * t / parts, p1 = mp * (t + 1) / parts;
                if (p1 > p0) mine = block(g, p0 * MR, imin(g.m, p1 * MR), 0, g.n, pack_a_, pack_b_);
            }
            if (!mine) __atomic_store_n(&ok, false, __ATOMIC_RELAXED);
            if (g.ep.colsum_b) {
                const int64_t c0 = g.n * t / parts, c1 = g.n * (t + 1) / parts;
                if (c1 > c0) colsum(g, c0, c1);
            }
        };
        parallel_chunks(parts, g.threads, chunk);
        return __atomic_load_n(&ok, __ATOMIC_RELAXED);
    }
};

}  // namespace
}  // namespace FASTMLP_GEMM_ISA
}  // namespace cpu
}  // namespace fastmlp
