// [issue 17] The two kernels behind gemm_ex's row_scale_k (fastmlp.h
// GemmEpilogue) on CUDA, internal to the CUDA sources: gemm_ex routes a
// row-scaled call to them instead of the tuned family (gemm_ex.cu).
//
// gemm_row_scaled: gemm (cuda/gemm.cu) with C = alpha * op(A) diag(row_scale)
//   op(B) + beta * C: op(B)'s row p is scaled by row_scale[p] (k floats) as
//   the tiled kernel loads it into shared memory; no pass over B of its own.
// bias_grad_row_scaled: db(c) = sum_r dy(r, c) * scale[r] (cuda/elementwise.cu,
//   the bias_grad kernel with the scale applied as it reads dy).
// Each product is kernel_math.h's row_scaled (rounded to float32, never fused).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace fastmlp {
namespace cuda {

void gemm_row_scaled(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                     const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                     float* c, int64_t ldc, const float* row_scale, cudaStream_t stream);
void bias_grad_row_scaled(const float* dy, const float* scale, float* db, int64_t rows,
                          int64_t cols, cudaStream_t stream);

}  // namespace cuda
}  // namespace fastmlp
