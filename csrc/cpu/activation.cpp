// CPU activation_fwd / activation_bwd (issue 15) and the general activation
// epilogue of the CPU GEMM (act_epilogue_rows, called by cpu/gemm_driver.h on
// each finished tile row and by the scalar paths of cpu/gemm.cpp).
//
// One loop per activation code (a template, dispatched on the code outside the
// loop), over the kernel_math.h rules, so each loop is straight-line
// arithmetic the compiler turns into SIMD code (the host act_* building blocks
// are branch-free, see kernel_math.h). FASTMLP_SIMD_CLONES builds an AVX-512,
// an AVX2 and a baseline copy of each span function; everything they call is
// inlined into them.
//
// Dropout: the mask of element e is Philox4x32-10 of block e / 4, lane e % 4
// (kernel_math.h dropout_bits). A span is cut into pieces of kPiece elements;
// per piece one Philox call per 4 elements fills a small buffer of
// multipliers (0 or scale), then the activation loop multiplies by it. The
// mask bits are the same whatever the piece or thread boundaries, so the
// result does not depend on the thread count.
#include <cstdint>

#include "check.h"
#include "cpu/activation.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "gemm_epilogue.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

constexpr int64_t kPiece = 256;  // multipliers per piece: 1 KiB on the stack, in L1

#define FASTMLP_ALWAYS_INLINE inline __attribute__((always_inline))

// m[i] = the multiplier of element e0 + i, i < len <= kPiece. The Philox
// rounds are written out lane-parallel over the piece's blocks (structure of
// arrays), so the loop becomes SIMD code (32 x 32 -> 64-bit multiplies are
// vpmuludq); kernel_math.h's philox4x32_10 is the same function, one block at
// a time (tests/test_dropout.py holds the two to the same bits).
FASTMLP_ALWAYS_INLINE void dropout_piece(float* __restrict m, uint64_t e0, int64_t len,
                                         uint64_t step, const DropoutSpec& d) {
    constexpr int64_t kBlocks = kPiece / 4 + 2;
    uint32_t v0[kBlocks], v1[kBlocks], v2[kBlocks], v3[kBlocks];
    const uint64_t b0 = e0 >> 2;
    const int64_t nb = static_cast<int64_t>(((e0 + static_cast<uint64_t>(len) + 3) >> 2) - b0);
    const uint32_t s0 = static_cast<uint32_t>(step), s1 = static_cast<uint32_t>(step >> 32);
    for (int64_t q = 0; q < nb; ++q) {
        const uint64_t b = b0 + static_cast<uint64_t>(q);
        uint32_t c0 = static_cast<uint32_t>(b), c1 = static_cast<uint32_t>(b >> 32), c2 = s0,
                 c3 = s1;
        uint32_t k0 = d.key0, k1 = d.key1;
        for (int round = 0; round < 10; ++round) {  // kernel_math.h philox4x32_10
            const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * c0;
            const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c2;
            const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ c1 ^ k0;
            const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
            c1 = static_cast<uint32_t>(p1);
            c3 = static_cast<uint32_t>(p0);
            c0 = n0;
            c2 = n2;
            k0 += 0x9E3779B9u;
            k1 += 0xBB67AE85u;
        }
        v0[q] = c0;
        v1[q] = c1;
        v2[q] = c2;
        v3[q] = c3;
    }
    uint32_t bits[4 * kBlocks];
    for (int64_t q = 0; q < nb; ++q) {
        bits[4 * q] = v0[q];
        bits[4 * q + 1] = v1[q];
        bits[4 * q + 2] = v2[q];
        bits[4 * q + 3] = v3[q];
    }
    const uint32_t* __restrict src = bits + (e0 & 3u);
    const uint32_t threshold = d.threshold;  // locals: a select of two values, not a load
    const float scale = d.scale;             // under a condition (which stays scalar)
    for (int64_t i = 0; i < len; ++i) m[i] = src[i] < threshold ? 0.0f : scale;
}

// y[i] = act(x[i]) (* m[i]); preact[i] = x[i] first when given. x may be y.
template <int A>
FASTMLP_ALWAYS_INLINE void fwd_loop(const float* x, float* y, float* __restrict preact,
                                    const float* __restrict m, int64_t len) {
    if (preact)
        for (int64_t i = 0; i < len; ++i) preact[i] = x[i];
    if (m) {
        for (int64_t i = 0; i < len; ++i) y[i] = act_forward<A>(x[i]) * m[i];
    } else {
        for (int64_t i = 0; i < len; ++i) y[i] = act_forward<A>(x[i]);
    }
}

// dx[i] = act_grad(dy[i] (* m[i]), saved[i]). dy may be dx.
template <int A, bool kFromInput>
FASTMLP_ALWAYS_INLINE void bwd_loop(const float* dy, const float* s, float* dx,
                                    const float* __restrict m, int64_t len) {
    if (m) {
        for (int64_t i = 0; i < len; ++i) {
            const float g = dy[i] * m[i];
            dx[i] = kFromInput ? act_grad_from_input<A>(g, s[i]) : act_grad_from_output<A>(g, s[i]);
        }
    } else {
        for (int64_t i = 0; i < len; ++i)
            dx[i] = kFromInput ? act_grad_from_input<A>(dy[i], s[i])
                               : act_grad_from_output<A>(dy[i], s[i]);
    }
}

template <int A>
FASTMLP_ALWAYS_INLINE void fwd_span_t(const float* x, float* y, float* preact, int64_t len,
                                      uint64_t e0, uint64_t step, const DropoutSpec& d) {
    if (d.threshold == 0) return fwd_loop<A>(x, y, preact, nullptr, len);
    float m[kPiece];
    for (int64_t o = 0; o < len; o += kPiece) {
        const int64_t l = len - o < kPiece ? len - o : kPiece;
        dropout_piece(m, e0 + static_cast<uint64_t>(o), l, step, d);
        fwd_loop<A>(x + o, y + o, preact ? preact + o : nullptr, m, l);
    }
}

template <int A, bool kFromInput>
FASTMLP_ALWAYS_INLINE void bwd_span_t(const float* dy, const float* s, float* dx, int64_t len,
                                      uint64_t e0, uint64_t step, const DropoutSpec& d) {
    if (d.threshold == 0) return bwd_loop<A, kFromInput>(dy, s, dx, nullptr, len);
    float m[kPiece];
    for (int64_t o = 0; o < len; o += kPiece) {
        const int64_t l = len - o < kPiece ? len - o : kPiece;
        dropout_piece(m, e0 + static_cast<uint64_t>(o), l, step, d);
        bwd_loop<A, kFromInput>(dy + o, s ? s + o : nullptr, dx + o, m, l);
    }
}

}  // namespace

// The activation forward of `len` contiguous elements whose first is element
// e0 of the dropout mask (act checked by the caller).
FASTMLP_SIMD_CLONES
void act_fwd_span(int act, const float* x, float* y, float* preact, int64_t len, uint64_t e0,
                  uint64_t step, const DropoutSpec& d) {
    with_act(act, [&](auto a) FASTMLP_ALWAYS_INLINE_LAMBDA { fwd_span_t<decltype(a)::value>(x, y, preact, len, e0, step, d); });
}

FASTMLP_SIMD_CLONES
void act_bwd_span(int act, bool from_input, const float* dy, const float* s, float* dx,
                  int64_t len, uint64_t e0, uint64_t step, const DropoutSpec& d) {
    // linear reads no saved value: dy stands in for a null one (never dereferenced)
    with_act_grad(act, from_input, [&](auto a, auto in) FASTMLP_ALWAYS_INLINE_LAMBDA {
        bwd_span_t<decltype(a)::value, decltype(in)::value>(dy, s ? s : dy, dx, len, e0, step, d);
    });
}

namespace {

uint64_t read_step(const DropoutSpec& d) {
    return d.threshold != 0 && d.step != nullptr ? static_cast<uint64_t>(*d.step) : 0u;
}

}  // namespace

namespace {

// The epilogue of one finished GEMM tile, row by row, with the activation
// fixed: the switch on the code runs once per tile, not once per row, and the
// row loops are inlined into one SIMD clone (a tile row is only NR = 16..32
// floats, so per-row calls cost as much as the arithmetic).
template <int A>
FASTMLP_ALWAYS_INLINE void fwd_rows_t(const GemmEpilogue& ep, float* c, int64_t ldc, int64_t i0,
                                      int64_t rows, int64_t j0, int64_t cols, int64_t n,
                                      uint64_t step) {
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* ci = c + r * ldc;
        fwd_span_t<A>(ci, ci, ep.preact ? ep.preact + i * ep.ld_preact + j0 : nullptr, cols,
                      static_cast<uint64_t>(i * n + j0), step, ep.dropout);
    }
}

template <int A, bool kFromInput>
FASTMLP_ALWAYS_INLINE void bwd_rows_t(const GemmEpilogue& ep, float* c, int64_t ldc, int64_t i0,
                                      int64_t rows, int64_t j0, int64_t cols, int64_t n,
                                      uint64_t step) {
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t i = i0 + r;
        float* ci = c + r * ldc;
        // linear reads no saved value: ci stands in for a null one
        const float* s = ep.saved ? ep.saved + i * ep.ld_saved + j0 : ci;
        bwd_span_t<A, kFromInput>(ci, s, ci, cols, static_cast<uint64_t>(i * n + j0), step,
                                  ep.grad_dropout);
    }
}

FASTMLP_SIMD_CLONES
void fwd_rows(const GemmEpilogue& ep, float* c, int64_t ldc, int64_t i0, int64_t rows,
              int64_t j0, int64_t cols, int64_t n, uint64_t step) {
    with_act(ep.act, [&](auto a) FASTMLP_ALWAYS_INLINE_LAMBDA {
        fwd_rows_t<decltype(a)::value>(ep, c, ldc, i0, rows, j0, cols, n, step);
    });
}

FASTMLP_SIMD_CLONES
void bwd_rows(const GemmEpilogue& ep, float* c, int64_t ldc, int64_t i0, int64_t rows,
              int64_t j0, int64_t cols, int64_t n, uint64_t step) {
    with_act_grad(ep.grad_act, ep.saved_is_input, [&](auto a, auto in) FASTMLP_ALWAYS_INLINE_LAMBDA {
        bwd_rows_t<decltype(a)::value, decltype(in)::value>(ep, c, ldc, i0, rows, j0, cols, n,
                                                            step);
    });
}

}  // namespace

void act_epilogue_rows(const GemmEpilogue& ep, float* c, int64_t ldc, int64_t i0,
                       int64_t rows, int64_t j0, int64_t cols, int64_t n) {
    if (ep.has_act()) fwd_rows(ep, c, ldc, i0, rows, j0, cols, n, read_step(ep.dropout));
    if (ep.has_grad_act()) bwd_rows(ep, c, ldc, i0, rows, j0, cols, n, read_step(ep.grad_dropout));
}

void activation_fwd(const float* x, float* y, int64_t rows, int64_t cols, int act,
                    const DropoutSpec& dropout) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_activation_call("activation_fwd", rows, cols, act, dropout);
    const int64_t size = rows * cols;
    if (size == 0) return;
    FASTMLP_CHECK(x && y, "activation_fwd: null pointer");
    const uint64_t step = read_step(dropout);
    // The flat index is the mask's element index e = row * cols + col.
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        act_fwd_span(act, x + i0, y + i0, nullptr, i1 - i0, static_cast<uint64_t>(i0), step,
                     dropout);
    });
}

void activation_bwd(const float* dy, const float* saved, float* dx, int64_t rows, int64_t cols,
                    int act, bool saved_is_input, const DropoutSpec& dropout) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_activation_call("activation_bwd", rows, cols, act, dropout);
    FASTMLP_CHECK(saved_is_input || !act_needs_input(act),
                  "activation_bwd: the derivative of activation " << act
                      << " needs the input (saved_is_input)");
    const int64_t size = rows * cols;
    if (size == 0) return;
    FASTMLP_CHECK(dy && dx && (saved || act == kActLinear), "activation_bwd: null pointer");
    const uint64_t step = read_step(dropout);
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        act_bwd_span(act, saved_is_input, dy + i0, saved ? saved + i0 : nullptr, dx + i0, i1 - i0,
                     static_cast<uint64_t>(i0), step, dropout);
    });
}

}  // namespace cpu
}  // namespace fastmlp
