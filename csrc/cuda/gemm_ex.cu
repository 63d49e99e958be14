// gemm_ex on the GPU: the foundation's gemm followed by one elementwise pass
// for the epilogue (bias, ReLU, ReLU mask; or bias and the general activation /
// dropout epilogue of issue 15) and the bias_grad kernel for colsum_b. This composed path is the default dispatch: the fused kernel
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
#include "cuda/row_scale.h"
#include "fastmlp.h"
#include "gemm_epilogue.h"
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

// [issue 15] The general epilogue, one kernel per activation code (the
// switch runs on the host). A thread takes 4 consecutive elements e = i*n + j
// of C (row-major over (m, n), so a group may wrap onto the next row): their
// dropout bits are the 4 lanes of one Philox call (kernel_math.h). The step is
// read from device memory. Forward (has_act):
//   t = C(i,j) (+ bias[j]); preact(i,j) = t; C(i,j) = act(t) * multiplier(e)
// Backward (has_grad_act):
//   t = C(i,j) (+ bias[j]); t *= multiplier(e); C(i,j) = act_grad(t, saved(i,j))
template <int A, int kMode>  // kMode: 0 forward, 1 backward from the output, 2 from the input
__global__ void __launch_bounds__(kBlock)
gemm_act_epilogue_f32(float* c, int64_t ldc, int64_t m, int64_t n, const float* __restrict__ bias,
                      float* __restrict__ preact, int64_t ld_preact,
                      const float* __restrict__ saved, int64_t ld_saved, DropoutSpec d) {
    const bool drop = d.threshold != 0;
    const uint64_t step = drop ? static_cast<uint64_t>(*d.step) : 0u;
    const int64_t size = m * n, groups = (size + 3) >> 2;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t g = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; g < groups;
         g += stride) {
        Philox4 r{{0u, 0u, 0u, 0u}};
        if (drop)
            r = philox4x32_10(Philox4{{static_cast<uint32_t>(g), static_cast<uint32_t>(g >> 32),
                                       static_cast<uint32_t>(step),
                                       static_cast<uint32_t>(step >> 32)}},
                              d.key0, d.key1);
        int64_t i = (4 * g) / n, j = 4 * g - i * n;  // one division per group
#pragma unroll
        for (int l = 0; l < 4; ++l) {
            if (4 * g + l < size) {
                float t = c[i * ldc + j];
                if (bias) t += bias[j];
                const float mult = drop ? (r.v[l] < d.threshold ? 0.0f : d.scale) : 1.0f;
                if (kMode == 0) {
                    if (preact) preact[i * ld_preact + j] = t;
                    t = act_forward<A>(t);
                    if (drop) t = t * mult;
                } else {
                    if (drop) t = t * mult;
                    if (A != kActLinear)
                        t = kMode == 2 ? act_grad_from_input<A>(t, saved[i * ld_saved + j])
                                       : act_grad_from_output<A>(t, saved[i * ld_saved + j]);
                }
                c[i * ldc + j] = t;
            }
            if (++j == n) {
                j = 0;
                ++i;
            }
        }
    }
}

void launch_act_epilogue(float* c, int64_t ldc, int64_t m, int64_t n, const float* bias,
                         const GemmEpilogue& ep, bool backward, cudaStream_t stream) {
    const unsigned int grid = detail::grid_stride_blocks((m * n + 3) / 4, kBlock);
    const DropoutSpec& d = backward ? ep.grad_dropout : ep.dropout;
    // kMode: 0 forward, 1 backward from the output, 2 backward from the input
    auto launch = [&](auto a, auto mode) {
        gemm_act_epilogue_f32<decltype(a)::value, decltype(mode)::value>
            <<<grid, kBlock, 0, stream>>>(c, ldc, m, n, bias, ep.preact, ep.ld_preact, ep.saved,
                                          ep.ld_saved, d);
    };
    if (!backward)
        with_act(ep.act, [&](auto a) { launch(a, std::integral_constant<int, 0>{}); });
    else
        with_act_grad(ep.grad_act, ep.saved_is_input, [&](auto a, auto in) {
            launch(a, std::integral_constant<int, decltype(in)::value ? 2 : 1>{});
        });
    detail::check_launch();
}

}  // namespace

void gemm_ex(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
             const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
             int64_t ldc, const GemmEpilogue& ep_in, Precision precision, cudaStream_t stream) {
    // [issue 15] the activation fields checked, and moved onto the relu fast
    // paths where those compute the same (gemm_epilogue.h, shared with the CPU).
    const GemmEpilogue ep = normalize_act_epilogue(ep_in, n);
    // colsum_b, relu_mask, row_scale_k [issue 17]: the checks the CPU makes too.
    check_gemm_epilogue(ep, trans_b, m, n, k, c, ldc);
    // [issue 17] A row-scaled call (DP-SGD's clipped dW) runs the foundation's
    // tiled kernel, which scales op(B)'s rows as it loads them (cuda/row_scale.h),
    // and the column sums scale as they read: no pass over B of its own. The
    // tuned family has no scaled loads, so it is not asked.
    const bool scaled = ep.row_scale_k != nullptr;
    // A tuned, GPU-verified configuration for this shape class, if the table has one
    // (it declines an activation epilogue: its finish knows bias / relu / mask only).
    if (!scaled && family::try_dispatch(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta,
                                        c, ldc, ep, precision, stream))
        return;
    if (scaled)
        gemm_row_scaled(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                        ep.row_scale_k, stream);
    else
        gemm(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, stream);
    if (ep.colsum_b != nullptr) {
        FASTMLP_CHECK(ldb == n || k <= 1, "gemm_ex: colsum_b needs ldb == n");
        if (scaled)
            bias_grad_row_scaled(b, ep.row_scale_k, ep.colsum_b, k, n, stream);
        else
            bias_grad(b, ep.colsum_b, k, n, stream);
    }
    if (m == 0 || n == 0) return;
    FASTMLP_CHECK(m <= (std::numeric_limits<int64_t>::max() - 4) / n, "gemm_ex: m*n overflows int64");
    const bool general = ep.has_act() || ep.has_grad_act();
    // The bias goes with the first pass that runs: the relu / mask pass when
    // one is asked for (it comes first in GemmEpilogue's order), else the
    // general pass -- one pass over C for the usual Dense bias + activation.
    const bool simple = ep.relu || ep.relu_mask != nullptr || (ep.bias != nullptr && !general);
    if (simple) {
        gemm_epilogue_f32<<<detail::grid_stride_blocks(m * n, kBlock), kBlock, 0, stream>>>(
            c, ldc, m, n, ep.bias, ep.relu, ep.relu_mask, ep.ld_mask);
        detail::check_launch();
    }
    const float* bias = simple ? nullptr : ep.bias;
    if (ep.has_act()) {
        launch_act_epilogue(c, ldc, m, n, bias, ep, false, stream);
        bias = nullptr;
    }
    if (ep.has_grad_act()) launch_act_epilogue(c, ldc, m, n, bias, ep, true, stream);
}

}  // namespace cuda
}  // namespace fastmlp
