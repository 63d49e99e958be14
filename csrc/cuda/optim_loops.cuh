// The grid-stride loops of the optimizer updates, shared by the per-call
// kernels (optim.cu: constants by value) and the engine's kernels
// (engine.cu: constants read from the per-step table): one body, so the two
// paths compile to the same arithmetic and agree bit for bit.
#pragma once

#include <cstdint>

#include "kernel_math.h"

namespace fastmlp {
namespace cuda {

// buf is null when h.momentum == 0; sgd_update then never touches it, and no
// pointer is formed from it here (null + i would be undefined behaviour).
// With momentum but no buffer (a plan/optimizer mismatch the host missed),
// the parameters are poisoned with NaN -- the next loss is NaN and fit stops
// -- rather than null being dereferenced or momentum silently dropped.
// Each loop returns true in a thread that left one of its parameters NaN or
// +-Inf (the engine records the step; the per-call kernels ignore it).
__device__ __forceinline__ bool sgd_loop(float* __restrict__ param,
                                         const float* __restrict__ grad,
                                         float* __restrict__ buf, int64_t size,
                                         const SgdHyper& h) {
    const bool uses_buf = h.momentum != 0.0f;   // the same test as sgd_update's
    uint32_t bad = 0;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride) {
        if (uses_buf && buf == nullptr) {
            param[i] = __int_as_float(0x7fc00000);  // quiet NaN
            bad = 1;
            continue;
        }
        float p = param[i];
        sgd_update(p, grad[i], uses_buf ? buf + i : nullptr, h);
        param[i] = p;
        bad |= nonfinite_bit(p);
    }
    return bad != 0;
}

__device__ __forceinline__ bool adam_loop(float* __restrict__ param,
                                          const float* __restrict__ grad,
                                          float* __restrict__ m, float* __restrict__ v,
                                          int64_t size, const AdamHyper& h) {
    uint32_t bad = 0;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride) {
        float p = param[i], mi = m[i], vi = v[i];
        adam_update(p, grad[i], mi, vi, h);
        param[i] = p;
        m[i] = mi;
        v[i] = vi;
        bad |= nonfinite_bit(p);
    }
    return bad != 0;
}

}  // namespace cuda
}  // namespace fastmlp
