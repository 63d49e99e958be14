// The portable CPU GEMM driver: plain C++ "vectors" of 8 floats that the
// compiler maps onto whatever SIMD the baseline target has (SSE2 on x86-64,
// NEON on aarch64). Used on CPUs without AVX2 + FMA and on other
// architectures; also selectable for tests (FASTMLP_CPU_GEMM=generic).
#include "cpu/gemm_impl.h"

#define FASTMLP_GEMM_ISA isa_generic
#include "cpu/gemm_driver.h"

namespace fastmlp {
namespace cpu {
namespace isa_generic {
namespace {

struct S {
    static constexpr int W = 8;
    struct V {
        float x[W];
    };
    static constexpr int MR = 4, NV = 2;
    static constexpr int64_t KC = 256, MC = 64, NC = 1024;

    static FASTMLP_INLINE V zero() {
        V r;
        for (int l = 0; l < W; ++l) r.x[l] = 0.0f;
        return r;
    }
    static FASTMLP_INLINE V load(const float* p) {
        V r;
        for (int l = 0; l < W; ++l) r.x[l] = p[l];
        return r;
    }
    static FASTMLP_INLINE V load_n(const float* p, int cnt) {
        V r = zero();
        for (int l = 0; l < cnt; ++l) r.x[l] = p[l];
        return r;
    }
    static FASTMLP_INLINE void store(float* p, V v) {
        for (int l = 0; l < W; ++l) p[l] = v.x[l];
    }
    static FASTMLP_INLINE void store_n(float* p, V v, int cnt) {
        for (int l = 0; l < cnt; ++l) p[l] = v.x[l];
    }
    static FASTMLP_INLINE V set1(float s) {
        V r;
        for (int l = 0; l < W; ++l) r.x[l] = s;
        return r;
    }
    // a*b + c rounded twice (no fused multiply-add on the baseline target).
    static FASTMLP_INLINE V fma(V a, V b, V c) {
        for (int l = 0; l < W; ++l) c.x[l] += a.x[l] * b.x[l];
        return c;
    }
    static FASTMLP_INLINE V mul(V a, V b) {
        for (int l = 0; l < W; ++l) a.x[l] *= b.x[l];
        return a;
    }
    static FASTMLP_INLINE V add(V a, V b) {
        for (int l = 0; l < W; ++l) a.x[l] += b.x[l];
        return a;
    }
    static FASTMLP_INLINE V relu(V t) {
        for (int l = 0; l < W; ++l) t.x[l] = fastmlp::relu(t.x[l]);
        return t;
    }
    static FASTMLP_INLINE V where_pos(V m, V t) {
        for (int l = 0; l < W; ++l) t.x[l] = fastmlp::relu_grad(t.x[l], m.x[l]);
        return t;
    }
};

}  // namespace

const GemmDriver driver = {"generic", S::MR, S::NV * S::W, &Gemm<S>::run};

}  // namespace isa_generic
}  // namespace cpu
}  // namespace fastmlp
