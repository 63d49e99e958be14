// Gradient clipping by norm on the GPU: the scales of grad_clip_scale
// (fastmlp.h), for the optimizers' gradient transform.
//
// Deterministic in two launches, no atomics:
//   grad_clip_partials: grid (kClipBlocksPerSeg, segments): block (b, k) sums
//     the squares of segment k's elements b*256 + tid, + 64*256, ... (its
//     threads in grid-stride order, then optim_loops.cuh's fixed block tree)
//     into work[k * kClipBlocksPerSeg + b];
//   grad_clip_finish: one block; thread j adds segment j's partials in order
//     (s_k, kept in work[nseg * kClipBlocksPerSeg + k]), thread 0 adds the s_k in
//     order for the global norm, then the scales are written.
// The split is fixed (kClipBlocksPerSeg blocks per segment, whatever its
// length: the lengths are in device memory), so the result repeats bit for bit
// on every GPU.
#include <cuda_runtime.h>

#include <cstdint>

#include "check.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"
#include "optim_loops.cuh"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kClipBlock = 256;
constexpr int kClipBlocksPerSeg = 64;
constexpr int64_t kMaxGridY = 65535;  // CUDA's limit on gridDim.y
constexpr int kClipFinishThreads = 256;
static_assert(kClipBlock % 32 == 0, "block_sum_to works in whole warps");

__global__ void __launch_bounds__(kClipBlock)
grad_clip_partials(const float* __restrict__ params, const float* __restrict__ grads,
                   const int64_t* __restrict__ offsets, const float* __restrict__ l1l2,
                   int64_t nseg, double* __restrict__ work) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t k = blockIdx.y; k < nseg; k += gridDim.y) {  // uniform per block
        const int64_t i0 = offsets[k], i1 = offsets[k + 1];   // i1 < i0: an empty segment
        const float l1 = l1l2 ? l1l2[2 * k] : 0.0f, l2 = l1l2 ? l1l2[2 * k + 1] : 0.0f;
        double s = 0.0;
        for (int64_t i = i0 + static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
             i < i1; i += stride) {
            s = __dadd_rn(s, square_rn(clip_regularized_grad(grads[i], params[i], l1, l2)));
        }
        block_sum_to(s, work + k * gridDim.x + blockIdx.x);
    }
}

__global__ void __launch_bounds__(kClipFinishThreads)
grad_clip_finish(double* __restrict__ work, int64_t nseg, int mode, float max_norm,
                 float* __restrict__ scale) {
    double* seg_sum = work + nseg * kClipBlocksPerSeg;
    for (int64_t k = threadIdx.x; k < nseg; k += blockDim.x) {
        double s = 0.0;
        for (int b = 0; b < kClipBlocksPerSeg; ++b) s += work[k * kClipBlocksPerSeg + b];
        seg_sum[k] = s;
        if (mode == 0) scale[k] = clip_scale_value(s, max_norm);
    }
    if (mode == 0) return;
    __shared__ float global_scale;
    __syncthreads();  // every seg_sum written (the block's own global writes)
    if (threadIdx.x == 0) {
        double total = 0.0;
        for (int64_t k = 0; k < nseg; ++k) total += seg_sum[k];
        global_scale = clip_scale_value(total, max_norm);
    }
    __syncthreads();
    for (int64_t k = threadIdx.x; k < nseg; k += blockDim.x) scale[k] = global_scale;
}

}  // namespace

int64_t grad_clip_work_doubles(int64_t /*size*/, int64_t nseg) {
    return nseg > 0 ? nseg * (kClipBlocksPerSeg + 1) : 0;
}

void grad_clip_scale(const float* params, const float* grads, const int64_t* offsets,
                     const float* l1l2, int64_t nseg, int mode, float max_norm, float* scale,
                     double* work, cudaStream_t stream) {
    FASTMLP_CHECK(nseg >= 0, "grad_clip_scale: nseg must be >= 0, got " << nseg);
    FASTMLP_CHECK(mode == 0 || mode == 1,
                  "grad_clip_scale: mode must be 0 (per tensor) or 1 (global), got " << mode);
    if (nseg == 0) return;
    FASTMLP_CHECK(offsets && scale && work,
                  "grad_clip_scale: offsets, scale or work (grad_clip_work_doubles) is null");
    const unsigned int grid_y = static_cast<unsigned int>(nseg < kMaxGridY ? nseg : kMaxGridY);
    grad_clip_partials<<<dim3(kClipBlocksPerSeg, grid_y), kClipBlock, 0, stream>>>(
        params, grads, offsets, l1l2, nseg, work);
    detail::check_launch();
    grad_clip_finish<<<1, kClipFinishThreads, 0, stream>>>(work, nseg, mode, max_norm, scale);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
