// CPU SGD and Adam/AdamW steps, in place. The update rules live in kernel_math.h and
// are shared with the CUDA kernels.
#include "check.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {

void sgd_step(float* param, const float* grad, float* buf, int64_t size, float lr,
              float momentum, bool nesterov, float weight_decay) {
    FASTMLP_CHECK(size >= 0, "sgd_step: size must be >= 0, got " << size);
    FASTMLP_CHECK(momentum == 0.0f || buf || size == 0,
                  "sgd_step: momentum != 0 needs a momentum buffer");
    if (size == 0) return;
    FASTMLP_CHECK(param && grad, "sgd_step: null pointer");
    const SgdHyper h{lr, momentum, weight_decay, nesterov};
    FASTMLP_OMP(omp parallel for schedule(static) if (size >= FASTMLP_PAR_MIN))
    for (int64_t i = 0; i < size; ++i) sgd_update(param[i], grad[i], buf ? buf + i : nullptr, h);
}

void adam_step(float* param, const float* grad, float* m, float* v, int64_t size, double lr,
               double beta1, double beta2, double eps, double weight_decay, bool decoupled,
               int64_t step) {
    FASTMLP_CHECK(size >= 0, "adam_step: size must be >= 0, got " << size);
    FASTMLP_CHECK(step >= 1, "adam_step: step counts from 1, got " << step);
    if (size == 0) return;
    FASTMLP_CHECK(param && grad && m && v, "adam_step: null pointer");
    const AdamHyper h = adam_hyper(lr, beta1, beta2, eps, weight_decay, decoupled, step);
    FASTMLP_OMP(omp parallel for schedule(static) if (size >= FASTMLP_PAR_MIN))
    for (int64_t i = 0; i < size; ++i) adam_update(param[i], grad[i], m[i], v[i], h);
}

}  // namespace cpu
}  // namespace fastmlp
