// Gaussian noise on the GPU (DP-SGD, issue 17): kernel_math.h's Philox +
// Box-Muller, the same floats the CPU computes (cpu/noise.cpp), whatever the
// grid: each element depends only on (seed, step, offset + i). The key (one
// Philox call) is derived once on the host and passed by value.

#include <cuda_runtime.h>

#include <cstdint>

#include "check.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kBlock = 256;

// out[i] = gaussian_noise(offset + i, step, k0, k1). Compute-bound (a Philox
// call, a log, a sine / cosine per element): a grid-stride loop over a capped grid.
__global__ void __launch_bounds__(kBlock)
gaussian_noise_philox(float* __restrict__ out, int64_t size, uint64_t offset, uint64_t step,
                      uint32_t k0, uint32_t k1) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride)
        out[i] = ::fastmlp::gaussian_noise(offset + static_cast<uint64_t>(i), step, k0, k1);
}

}  // namespace

void gaussian_noise(float* out, int64_t size, uint64_t seed, uint64_t step, int64_t offset,
                    cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "gaussian_noise: size must be >= 0, got " << size);
    FASTMLP_CHECK(offset >= 0, "gaussian_noise: offset must be >= 0, got " << offset);
    if (size == 0) return;
    FASTMLP_CHECK(out != nullptr, "gaussian_noise: out is null");
    uint32_t k0, k1;
    noise_key(seed, &k0, &k1);
    gaussian_noise_philox<<<detail::grid_stride_blocks(size, kBlock), kBlock, 0, stream>>>(
        out, size, static_cast<uint64_t>(offset), step, k0, k1);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
