// The CPU's Gaussian noise generator (kernel_math.h gaussian_noise), shared by
// the gaussian_noise op and the optimizer loops (optim.cpp), which draw a
// chunk of noise into a stack buffer and run their update over it.
#pragma once

#include <cstdint>

namespace fastmlp {
namespace cpu {

// Elements per chunk of the optimizer loops' noise buffer (8 KiB of floats:
// the buffer and the chunk's parameters stay in L1).
constexpr int64_t kNoiseChunk = 2048;

// out[k] = fma(noise_std, gaussian_noise(e0 + k, step, k0, k1), grad[k]) for k
// in [0, n) (kernel_math.h noise_grad_step: the transform's first step), or
// out[k] = gaussian_noise(e0 + k, ...) when grad is null. Bit for bit the
// scalar gaussian_noise of each element, whatever e0 % 4 and n: the whole
// counter blocks inside go through a vectorised loop, the partial ones at
// either end through the scalar function.
void gaussian_noise_fill(float* out, const float* grad, float noise_std, uint64_t e0, int64_t n,
                         uint64_t step, uint32_t k0, uint32_t k1);

// The loop over whole counter blocks: out[4 b + j] = z_j of block b0 + b for b
// in [0, nb) (then the gradient step when grad is not null), the floats of the
// scalar gaussian_noise4 bit for bit. Two versions, chosen once at run time
// from the CPU's features (cpu/noise.cpp): an explicit AVX-512 one
// (cpu/noise_avx512.cpp, 16 blocks per iteration) and the generic loop
// (vectorised by the compiler for each target_clones target). The
// FASTMLP_CPU_NOISE environment variable (avx512 | generic | auto) and
// set_noise_isa (fastmlp.h) override the choice.
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define FASTMLP_NOISE_AVX512 1
void noise_blocks_avx512(float* out, const float* grad, float noise_std, uint64_t b0, int64_t nb,
                         uint64_t step, uint32_t k0, uint32_t k1);
// Test-only: the AVX-512 Box-Muller against the scalar box_muller
// (kernel_math.h) on all 2^25 values of each word's uniform (log and angle):
// the number of lanes that differ in any bit (0 expected).
int64_t noise_box_muller_mismatches_avx512();
#endif

}  // namespace cpu
}  // namespace fastmlp
