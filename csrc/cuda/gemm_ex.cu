// gemm_ex on the GPU: the foundation's gemm followed by one elementwise pass
// for the epilogue (bias, ReLU, ReLU mask) and the bias_grad kernel for
// colsum_b. This composed path is the default dispatch: the fused kernel
// family (gemm_family.h) replaces it only where the current GPU's tuning
// table has an entry for the call's shape class, i.e. for configurations
// that benchmarks/tune_gemm.py verified on that GPU.
//
// Precision: kTf32 uses a TF32 tensor-core configuration only when the
// table lists one for the tf32 shape class; otherwise the call runs exactly
// like kFp32 (the table's fp32 entry, else the foundation). So TF32 is never
// used unless both the caller opted in and a GPU run verified the kernel.
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "check.h"
#include "fastmlp.h"
#include "gemm_family.h"
#include "kernel_math.h"
#include "launch.h"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kBlock = 256;

// C(i,j) = mask(relu(C(i,j) + bias[j])) for the extras that are present.
__global__ void __launch_bounds__(kBlock)
gemm_epilogue_f32(float* c, int64_t ldc, int64_t m, int64_t n, const float* __restrict__ bias,
                  bool relu, const float* __restrict__ mask, int64_t ld_mask) {
    const int64_t size = m * n;
    for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < size;
         e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
        const int64_t i = e / n, j = e - i * n;
        float t = c[i * ldc + j];
        if (bias) t += bias[j];
        if (relu) t = fastmlp::relu(t);  // kernel_math.h: NaN propagates
        if (mask) t = fastmlp::relu_grad(t, mask[i * ld_mask + j]);
        c[i * ldc + j] = t;
    }
}

}  // namespace

void gemm_ex(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
             const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
             int64_t ldc, const GemmEpilogue& ep, Precision precision, cudaStream_t stream) {
    FASTMLP_CHECK(ep.colsum_b == nullptr || !trans_b, "gemm_ex: colsum_b needs trans_b == false");
    FASTMLP_CHECK(ep.relu_mask == nullptr || ep.ld_mask >= n,
                  "gemm_ex: ld_mask must be >= n=" << n << ", got " << ep.ld_mask);
    // A tuned, GPU-verified configuration for this shape class, if the table has one.
    if (family::try_dispatch(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep,
                             precision, stream))
        return;
    gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, stream);
    if (ep.colsum_b != nullptr) {
        FASTMLP_CHECK(ldb == n || k <= 1, "gemm_ex: colsum_b needs ldb == n");
        bias_grad(b, ep.colsum_b, k, n, stream);
    }
    if (m == 0 || n == 0) return;
    if (ep.bias != nullptr || ep.relu || ep.relu_mask != nullptr) {
        FASTMLP_CHECK(m <= std::numeric_limits<int64_t>::max() / n, "gemm_ex: m*n overflows int64");
        gemm_epilogue_f32<<<detail::grid_stride_blocks(m * n, kBlock), kBlock, 0, stream>>>(
            c, ldc, m, n, ep.bias, ep.relu, ep.relu_mask, ep.ld_mask);
        detail::check_launch();
    }
}

}  // namespace cuda
}  // namespace fastmlp
