// CPU GEMM: C = alpha * op(A) @ op(B) + beta * C (+ the Dense epilogue),
// float32, row-major. Checks the call, handles the empty cases, and runs the
// packed, register-blocked driver (cpu/gemm_driver.h) compiled for the best
// instruction set this CPU has: AVX-512, else AVX2 + FMA, else portable C++.
// The choice is made once, from the CPU's features (no -march=native: one
// wheel runs everywhere); FASTMLP_CPU_GEMM=avx512|avx2|generic overrides it
// (an unsupported choice is an error), and fastmlp._C.cpu.set_gemm_isa lets
// the tests run every driver this CPU can.
#include <cstdlib>
#include <cstring>
#include <string>

#include "cpu/fpenv.h"
#include "check.h"
#include "cpu/activation.h"
#include "cpu/gemm_impl.h"
#include "gemm_epilogue.h"
#include "cpu/parallel.h"
#include "fastmlp.h"

namespace fastmlp {
namespace cpu {
namespace {

bool isa_supported(const GemmDriver* d) {
#ifdef FASTMLP_X86_DRIVERS
    __builtin_cpu_init();
    if (d == &isa_avx512::driver)
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
               __builtin_cpu_supports("fma") && __builtin_cpu_supports("avx2");
    if (d == &isa_avx2::driver) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#endif
    return d == &isa_generic::driver;
}

const GemmDriver* const kDrivers[] = {
#ifdef FASTMLP_X86_DRIVERS
    &isa_avx512::driver, &isa_avx2::driver,
#endif
    &isa_generic::driver};

const GemmDriver* find_driver(const std::string& name) {
    for (const GemmDriver* d : kDrivers)
        if (name == d->name) return d;
    return nullptr;
}

std::string driver_names() {
    std::string s;
    for (const GemmDriver* d : kDrivers) s += std::string(s.empty() ? "" : ", ") + d->name;
    return s;
}

const GemmDriver* best_driver() {
    for (const GemmDriver* d : kDrivers)
        if (isa_supported(d)) return d;
    return &isa_generic::driver;
}

const GemmDriver*& current_driver() {
    static const GemmDriver* d = [] {
        const char* env = std::getenv("FASTMLP_CPU_GEMM");
        if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return best_driver();
        const GemmDriver* want = find_driver(env);
        FASTMLP_CHECK(want != nullptr, "FASTMLP_CPU_GEMM=" << env << " is not one of: auto, "
                                                            << driver_names());
        FASTMLP_CHECK(isa_supported(want),
                      "FASTMLP_CPU_GEMM=" << env << ": this CPU does not support it");
        return want;
    }();
    return d;
}

// Below this many multiply-adds a GEMM runs on the calling thread: handing a
// chunk to a spinning worker costs about a microsecond, about what one core
// needs for 2^17 FMAs (measured: the 128 -> 10 layer's products at batch 128,
// 1.6e5 FMAs, 1.45x faster on 2 threads than on 1).
constexpr int64_t kParallelMinFmas = int64_t(1) << 17;

// k == 0: C = beta * C (zeros when beta == 0) and the epilogue; rare, scalar.
void gemm_k0(const GemmArgs& g) {
    for (int64_t i = 0; i < g.m; ++i)
        for (int64_t j = 0; j < g.n; ++j) {
            float& cij = g.c[i * g.ldc + j];
            cij = epilogue_at(g.beta == 0.0f ? 0.0f : g.beta * cij, g.ep, i, j);
        }
    act_epilogue_rows(g.ep, g.c, g.ldc, 0, g.m, 0, g.n, g.n);  // [issue 15] cpu/activation.h
    if (g.ep.colsum_b)
        for (int64_t j = 0; j < g.n; ++j) g.ep.colsum_b[j] = 0.0f;
}

}  // namespace

std::string gemm_isa() { return current_driver()->name; }

std::string set_gemm_isa(const std::string& name) {
    const GemmDriver* want = name == "auto" ? best_driver() : find_driver(name);
    FASTMLP_CHECK(want != nullptr, "set_gemm_isa: '" << name << "' is not one of: auto, "
                                                     << driver_names());
    FASTMLP_CHECK(isa_supported(want), "set_gemm_isa: this CPU does not support '" << name << "'");
    std::string old = current_driver()->name;
    current_driver() = want;
    return old;
}

std::string gemm_isas_supported() {
    std::string s;
    for (const GemmDriver* d : kDrivers)
        if (isa_supported(d)) s += std::string(s.empty() ? "" : ",") + d->name;
    return s;
}

void gemm_ex(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
             const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
             int64_t ldc, const GemmEpilogue& ep_in, Precision) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    FASTMLP_CHECK(m >= 0 && n >= 0 && k >= 0,
                  "gemm: sizes must be >= 0, got m=" << m << " n=" << n << " k=" << k);
    FASTMLP_CHECK(lda >= (trans_a ? m : k) && lda >= 1, "gemm: lda too small: " << lda);
    FASTMLP_CHECK(ldb >= (trans_b ? k : n) && ldb >= 1, "gemm: ldb too small: " << ldb);
    FASTMLP_CHECK(ldc >= n && ldc >= 1, "gemm: ldc too small: " << ldc);
    // [issue 15] the activation fields checked, and moved onto the relu fast
    // paths where those compute the same (gemm_epilogue.h).
    const GemmEpilogue ep = normalize_act_epilogue(ep_in, n);
    // colsum_b, relu_mask, row_scale_k [issue 17]: the checks CUDA makes too.
    check_gemm_epilogue(ep, trans_b, m, n, k, c, ldc);
    if (n == 0) return;
    if (m == 0 && ep.colsum_b == nullptr) return;
    FASTMLP_CHECK((m == 0 || c != nullptr) && (k == 0 || (a != nullptr && b != nullptr)),
                  "gemm: null pointer");
    GemmArgs g{trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, 1};
    if (k == 0) return gemm_k0(g);
    if (m == 0) {  // only the column sums of B are asked for
        g.m = 0;
        if (ep.row_scale_k) return colsum_row_scaled(b, ldb, ep.row_scale_k, k, 0, n, ep.colsum_b);
        for (int64_t j = 0; j < n; ++j) ep.colsum_b[j] = 0.0f;
        for (int64_t p = 0; p < k; ++p)
            for (int64_t j = 0; j < n; ++j) ep.colsum_b[j] += b[p * ldb + j];
        return;
    }
    if (m * n * k >= kParallelMinFmas) g.threads = num_threads();
    const bool ok = current_driver()->run(g);
    FASTMLP_CHECK(ok, "gemm: out of memory for the packing buffers (m=" << m << " n=" << n
                                                                       << " k=" << k << ")");
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
          const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
          int64_t ldc) {
    gemm_ex(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, GemmEpilogue{},
            Precision::kFp32);
}



}  // namespace cpu
}  // namespace fastmlp
