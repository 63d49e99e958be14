// CPU kernels of the adversarial attacks (issue 18): the attack's starting point
// (adv_init: a clipped copy of the input, or with a random start a uniform draw
// in the eps-ball) and the FGSM / PGD sign step with its projection and clip
// (adv_step). fastmlp.h states the contracts; the element rules are
// kernel_math.h's (adv_uniform, adv_clamp, adv_step_value), shared with the GPU,
// and the random bits are dropout's Philox counter layout (dropout_bits) under
// adversarial_key(seed), so both devices draw the same start. Compiled with
// -ffp-contract=off (CMakeLists.txt): x + eps u rounds the product first.
#include <algorithm>
#include <cstdint>

#include "adversarial_check.h"
#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

// The random start over elements e0 .. e1-1: one Philox block gives the bits of
// four consecutive elements (dropout_bits' lanes), so it is computed once per
// four, not per element.
void adv_init_random(const float* x, float* adv, int64_t e0, int64_t e1, float eps, float lo,
                     float hi, uint64_t step, uint32_t key0, uint32_t key1) {
    int64_t e = e0;
    while (e < e1) {
        const uint64_t block = static_cast<uint64_t>(e) >> 2;
        const Philox4 r = philox_block(block, step, key0, key1);
        const int64_t end = std::min(static_cast<int64_t>(block * 4 + 4), e1);
        for (; e < end; ++e)
            adv[e] = adv_clamp(x[e] + mul_rn(eps, adv_uniform(r.v[e & 3])), lo, hi);
    }
}

// The sign steps over n elements, in one vectorised pass (the rules are selects,
// no branches: a gradient's sign is random, and as branches its mispredictions
// cost more than the arithmetic). Cloned per ISA like the other elementwise loops.
FASTMLP_SIMD_CLONES
void adv_step_range(const float* __restrict x, float* __restrict adv,
                    const float* __restrict grad, int64_t n, float eps, float alpha, float lo,
                    float hi, bool project) {
    if (project) {
        for (int64_t e = 0; e < n; ++e)
            adv[e] = adv_step_value(x[e], adv[e], grad[e], eps, alpha, lo, hi, true);
    } else {
        for (int64_t e = 0; e < n; ++e)
            adv[e] = adv_step_value(x[e], adv[e], grad[e], eps, alpha, lo, hi, false);
    }
}

}  // namespace

void adv_init(const float* x, float* adv, int64_t rows, int64_t cols, float eps, float lo,
              float hi, const int64_t* step, uint32_t key0, uint32_t key1) {
    check_adv_init_args(x, adv, rows, cols, eps, lo, hi);  // adversarial_check.h
    const int64_t size = rows * cols;
    if (size == 0) return;
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    if (step == nullptr) {
        parallel_range(size, size >= kParMin, [&](int64_t e0, int64_t e1) {
            for (int64_t e = e0; e < e1; ++e) adv[e] = adv_clamp(x[e], lo, hi);
        });
        return;
    }
    const uint64_t s = static_cast<uint64_t>(*step);
    parallel_range(size, size >= kParMin / 8, [&](int64_t e0, int64_t e1) {
        adv_init_random(x, adv, e0, e1, eps, lo, hi, s, key0, key1);
    });
}

void adv_step(const float* x, float* adv, const float* grad, int64_t rows, int64_t cols,
              float eps, float alpha, float lo, float hi, bool project) {
    check_adv_step_args(x, adv, grad, rows, cols, eps, alpha, lo, hi);
    const int64_t size = rows * cols;
    if (size == 0) return;
    FlushDenormalScope fp_scope;
    parallel_range(size, size >= kParMin, [&](int64_t e0, int64_t e1) {
        adv_step_range(x + e0, adv + e0, grad + e0, e1 - e0, eps, alpha, lo, hi, project);
    });
}

}  // namespace cpu
}  // namespace fastmlp
