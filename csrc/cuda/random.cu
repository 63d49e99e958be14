// Random numbers on the GPU: the shuffling permutation of fit.
//
// random_permutation is kernel_math.h's keyed Feistel permutation, computed
// per element (no sort, no shared state, no atomics): out[i] depends only on
// (i, n, seed, counter), so the GPU writes the same permutation as the CPU
// (cpu/random.cpp), whatever the grid. The key (one Philox call) is derived
// once on the host and passed by value.

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

// out[i] = permute_index(i, key) for i < key.n. Each element costs 4 Philox
// calls per Feistel encryption and < 4 encryptions on average (the cycle
// walk): compute-bound, so a grid-stride loop over a capped grid suffices.
__global__ void __launch_bounds__(kBlock)
random_permutation_feistel(int64_t* __restrict__ out, PermKey key) {
    const int64_t n = static_cast<int64_t>(key.n);
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
         i += stride)
        out[i] = static_cast<int64_t>(permute_index(static_cast<uint64_t>(i), key));
}

}  // namespace

void random_permutation(int64_t* out, int64_t n, uint64_t seed, uint64_t counter,
                        cudaStream_t stream) {
    // n <= 2^62 keeps perm_key's half_bits <= 31 (the Feistel halves are
    // 32-bit words) and i + stride far from int64 overflow.
    FASTMLP_CHECK(n >= 0 && n <= (int64_t{1} << 62),
                  "random_permutation: n must be in [0, 2^62], got " << n);
    if (n == 0) return;
    FASTMLP_CHECK(out != nullptr, "random_permutation: out is null");
    const PermKey key = perm_key(static_cast<uint64_t>(n), seed, counter);
    random_permutation_feistel<<<detail::grid_stride_blocks(n, kBlock), kBlock, 0, stream>>>(out,
                                                                                          key);
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
