// Internal interface of the CPU GEMM: the arguments of one call, and the
// driver compiled once per instruction set (gemm_avx512.cpp, gemm_avx2.cpp,
// gemm_generic.cpp). gemm.cpp validates the call and picks the driver for the
// CPU it runs on (see cpu/gemm.cpp for the rule and the override).
#pragma once

#include <cstdint>

#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {

// The Dense epilogue on one element C(i, j) = v, for the scalar paths (k == 0,
// the sum of k-slices); the same operations, in the same order, as the
// micro-kernel's vector epilogue. static: each instruction-set copy keeps its own.
// The general activation epilogue (ep.has_act / has_grad_act, issue 15) is not
// here: every path applies it to whole finished rows right after this, with
// cpu/activation.h's act_epilogue_rows (one loop per activation, vectorised).
static inline float epilogue_at(float v, const GemmEpilogue& ep, int64_t i, int64_t j) {
    if (ep.bias) v = v + ep.bias[j];
    if (ep.relu) v = fastmlp::relu(v);                                  // kernel_math.h
    if (ep.relu_mask) v = fastmlp::relu_grad(v, ep.relu_mask[i * ep.ld_mask + j]);
    return v;
}

// [issue 17] out[j] = sum_p row_scaled(b[p*ldb + j], s[p]) for j in [j0, j1),
// p = 0..k-1 in order: the column sums of a row-scaled B (GemmEpilogue::
// row_scale_k). In cpu/gemm_rowscale.cpp, compiled without FMA contraction so
// that each product is rounded before it is added (kernel_math.h row_scaled);
// with s = 1 the sums are bit for bit the unscaled driver's (same order).
void colsum_row_scaled(const float* b, int64_t ldb, const float* s, int64_t k, int64_t j0,
                       int64_t j1, float* out);

struct GemmArgs {
    bool trans_a, trans_b;
    int64_t m, n, k;
    float alpha;
    const float* a;
    int64_t lda;
    const float* b;
    int64_t ldb;
    float beta;
    float* c;
    int64_t ldc;
    GemmEpilogue ep;
    int threads;  // OpenMP threads to use (1: run on the calling thread)
};

// A driver computes C (and ep.colsum_b) for m, n >= 1, k >= 1; gemm.cpp
// handles the empty cases. Every C element is summed over p = 0..k-1 in a
// fixed order that depends on k and the instruction set only, not on the
// thread count: a run repeats bit for bit.
struct GemmDriver {
    const char* name;  // "avx512", "avx2", "generic"
    int mr, nr;        // the micro-kernel's register tile
    bool (*run)(const GemmArgs&);  // false: out of memory for packing buffers
};

#define FASTMLP_DECLARE_GEMM_DRIVER(ns) \
    namespace ns {                      \
    extern const GemmDriver driver;     \
    }
FASTMLP_DECLARE_GEMM_DRIVER(isa_generic)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMLP_X86_DRIVERS 1
FASTMLP_DECLARE_GEMM_DRIVER(isa_avx2)
FASTMLP_DECLARE_GEMM_DRIVER(isa_avx512)
#endif
#undef FASTMLP_DECLARE_GEMM_DRIVER

}  // namespace cpu
}  // namespace fastmlp
