// CPU random permutation: kernel_math.h's Feistel/Philox permutation, the same
// numbers the CUDA kernel computes.
#include "check.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {

void random_permutation(int64_t* out, int64_t n, uint64_t seed, uint64_t counter) {
    FASTMLP_CHECK(n >= 0 && n <= (int64_t{1} << 62),
                  "random_permutation: n must be in [0, 2^62], got " << n);
    if (n == 0) return;
    FASTMLP_CHECK(out, "random_permutation: null out");
    const PermKey key = perm_key(static_cast<uint64_t>(n), seed, counter);
    // ~40 Philox rounds per element: worth both threads from a few thousand up.
    parallel_range(n, n >= 4096, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
            out[i] = static_cast<int64_t>(permute_index(static_cast<uint64_t>(i), key));
    });
}

}  // namespace cpu
}  // namespace fastmlp
