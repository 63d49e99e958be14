// Helpers shared by the CUDA launchers: grid sizing and the launch check.
//
// Only .cu files include this header (it needs nvcc for CUDA_CHECK).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "check.h"

namespace fastmlp {
namespace cuda {
namespace detail {

constexpr int kWarpSize = 32;

// Grid-stride kernels need no more blocks than fill the GPU a few times over:
// an H200 holds 132 SMs x 2048 threads = 270k threads, so 4096 blocks of 256
// threads (1M threads) is ~4 waves. A fixed cap (rather than one read from the
// device) keeps the launch configuration, hence the work split, identical on
// every GPU; elementwise results do not depend on it anyway.
constexpr int64_t kMaxGridBlocks = 4096;

// ceil(n / d) for n >= 0, d > 0, written so that n close to INT64_MAX does not
// overflow (n + d - 1 would).
__host__ __device__ __forceinline__ int64_t ceil_div(int64_t n, int64_t d) { return n == 0 ? 0 : (n - 1) / d + 1; }

// Blocks for a grid-stride loop over `work` items handled `per_block` at a
// time, capped; at least 1 so a launcher never configures an empty grid.
inline unsigned int grid_stride_blocks(int64_t work, int64_t per_block,
                                       int64_t cap = kMaxGridBlocks) {
    int64_t blocks = ceil_div(work, per_block);
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    return static_cast<unsigned int>(blocks);
}

// A launch error (bad configuration, missing kernel image for this GPU) is
// reported by cudaGetLastError right after the launch; errors from the
// kernel's execution surface at the next synchronising call.
inline void check_launch() { CUDA_CHECK(cudaGetLastError()); }

}  // namespace detail
}  // namespace cuda
}  // namespace fastmlp
