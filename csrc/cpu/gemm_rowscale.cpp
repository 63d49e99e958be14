// [issue 17] The column sums of a row-scaled B for the CPU GEMM (cpu/gemm_impl.h
// colsum_row_scaled). A file of its own because it is compiled with
// -ffp-contract=off (CMakeLists.txt): contracted, `sum += b * s` would become
// one FMA and skip the rounding of the product that GemmEpilogue::row_scale_k
// promises (and that the GPU's column sum makes with __fmul_rn).
#include "cpu/gemm_impl.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {

void colsum_row_scaled(const float* b, int64_t ldb, const float* s, int64_t k, int64_t j0,
                       int64_t j1, float* out) {
    float* __restrict o = out;
    for (int64_t j = j0; j < j1; ++j) o[j] = 0.0f;
    for (int64_t p = 0; p < k; ++p) {
        const float* __restrict row = b + p * ldb;
        const float sp = s[p];
        for (int64_t j = j0; j < j1; ++j) o[j] += row_scaled(row[j], sp);
    }
}

}  // namespace cpu
}  // namespace fastmlp
