// CPU kernels of the adversarial attacks (issue 18): the attack's starting point
// (adv_init: a clipped copy of the input, or with a random start a uniform draw
// in the eps-ball) and the FGSM / PGD sign step with its projection and clip
// (adv_step). fastmlp.h states the contracts; the element rules are
// kernel_math.h's (adv_uniform, adv_clamp, adv_step_value), shared with the GPU,
// and the random bits are dropout's Philox counter layout (dropout_bits) under
// adversarial_key(seed), so both devices draw the same start. Compiled with
// -ffp-contract=off (CMakeLists.txt): x + eps u rounds the product first.
#include <cstdint>

#include "adversarial_check.h"
#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {

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
        for (int64_t e = e0; e < e1; ++e) {
            const float u = adv_uniform(dropout_bits(static_cast<uint64_t>(e), s, key0, key1));
            adv[e] = adv_clamp(x[e] + mul_rn(eps, u), lo, hi);
        }
    });
}

void adv_step(const float* x, float* adv, const float* grad, int64_t rows, int64_t cols,
              float eps, float alpha, float lo, float hi, bool project) {
    check_adv_step_args(x, adv, grad, rows, cols, eps, alpha, lo, hi);
    const int64_t size = rows * cols;
    if (size == 0) return;
    FlushDenormalScope fp_scope;
    parallel_range(size, size >= kParMin, [&](int64_t e0, int64_t e1) {
        for (int64_t e = e0; e < e1; ++e)
            adv[e] = adv_step_value(x[e], adv[e], grad[e], eps, alpha, lo, hi, project);
    });
}

}  // namespace cpu
}  // namespace fastmlp
