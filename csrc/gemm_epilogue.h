// The checks and the normal form of a GemmEpilogue's activation part (issue
// 15), shared by cpu/gemm.cpp and cuda/gemm_ex.cu so that both backends accept
// and refuse the same calls; and the argument checks of the standalone
// activation ops (cpu/activation.cpp, cuda/activation.cu), for the same reason.
#pragma once

#include <cstdint>
#include <limits>

#include "check.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {

// The sizes, activation code and dropout of activation_fwd / activation_bwd.
inline void check_activation_call(const char* op, int64_t rows, int64_t cols, int act,
                                  const DropoutSpec& d) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be >= 0, got rows=" << rows << " cols=" << cols);
    FASTMLP_CHECK(cols == 0 || rows <= std::numeric_limits<int64_t>::max() / cols - 4,
                  op << ": rows*cols overflows int64");
    FASTMLP_CHECK(act >= 0 && act < kNumActs,
                  op << ": activation code must be in [0, " << int(kNumActs) << "), got " << act);
    FASTMLP_CHECK(d.threshold == 0 || d.step != nullptr, op << ": dropout needs a step pointer");
}

// The checks of gemm_ex's colsum_b, relu_mask and row_scale_k (issue 17) for
// C (m x n, leading dimension ldc) and op(B) with k rows. row_scale_k is read
// while C and colsum_b are written, so it must not overlap them.
inline void check_gemm_epilogue(const GemmEpilogue& ep, bool trans_b, int64_t m, int64_t n,
                                int64_t k, const float* c, int64_t ldc) {
    FASTMLP_CHECK(ep.colsum_b == nullptr || !trans_b, "gemm_ex: colsum_b needs trans_b == false");
    FASTMLP_CHECK(ep.relu_mask == nullptr || ep.ld_mask >= n,
                  "gemm_ex: ld_mask must be >= n=" << n << ", got " << ep.ld_mask);
    if (ep.row_scale_k == nullptr || k == 0) return;
    auto overlaps = [&](const float* p, int64_t count) {
        return count > 0 && floats_overlap(ep.row_scale_k, static_cast<uint64_t>(k), p,
                                           static_cast<uint64_t>(count));
    };
    FASTMLP_CHECK(!overlaps(ep.colsum_b, n), "gemm_ex: row_scale_k overlaps colsum_b");
    FASTMLP_CHECK(m == 0 || n == 0 || !overlaps(c, (m - 1) * ldc + n),
                  "gemm_ex: row_scale_k overlaps C");
}

// Checks the activation fields of `ep` for a C with n columns and returns the
// epilogue in normal form: the cases the relu / relu_mask fast paths cover
// exactly are moved onto them (those paths are bit-identical to the general
// one: both are kernel_math.h's relu / relu_grad).
//   act == relu, no dropout, no preact          -> relu = true
//   grad_act == relu from the output, no dropout -> relu_mask = saved
inline GemmEpilogue normalize_act_epilogue(const GemmEpilogue& in, int64_t n) {
    GemmEpilogue ep = in;
    FASTMLP_CHECK(ep.act >= 0 && ep.act < kNumActs,
                  "gemm_ex: act must be an activation code in [0, " << int(kNumActs) << "), got "
                                                                    << ep.act);
    FASTMLP_CHECK(ep.grad_act >= 0 && ep.grad_act < kNumActs,
                  "gemm_ex: grad_act must be an activation code in [0, " << int(kNumActs)
                                                                         << "), got " << ep.grad_act);
    FASTMLP_CHECK(!(ep.relu && ep.has_act()),
                  "gemm_ex: relu and act/dropout are both set; use act = relu (1) alone");
    FASTMLP_CHECK(!(ep.relu_mask && ep.has_grad_act()),
                  "gemm_ex: relu_mask and grad_act/grad_dropout are both set; use grad_act = "
                  "relu (1) with saved = the mask");
    FASTMLP_CHECK(ep.preact == nullptr || ep.ld_preact >= n,
                  "gemm_ex: ld_preact must be >= n=" << n << ", got " << ep.ld_preact);
    FASTMLP_CHECK(ep.saved == nullptr || ep.ld_saved >= n,
                  "gemm_ex: ld_saved must be >= n=" << n << ", got " << ep.ld_saved);
    FASTMLP_CHECK(ep.grad_act == kActLinear || ep.saved != nullptr,
                  "gemm_ex: grad_act " << ep.grad_act << " needs saved (the activation's "
                                          "input or output)");
    FASTMLP_CHECK(ep.grad_act == kActLinear || ep.saved_is_input || !act_needs_input(ep.grad_act),
                  "gemm_ex: the derivative of activation " << ep.grad_act
                      << " needs its input: set saved_is_input");
    FASTMLP_CHECK(ep.dropout.threshold == 0 || ep.dropout.step != nullptr,
                  "gemm_ex: dropout needs a step pointer");
    FASTMLP_CHECK(ep.grad_dropout.threshold == 0 || ep.grad_dropout.step != nullptr,
                  "gemm_ex: grad_dropout needs a step pointer");
    if (ep.act == kActRelu && ep.dropout.threshold == 0 && ep.preact == nullptr) {
        ep.act = kActLinear;
        ep.relu = true;
    }
    if (ep.grad_act == kActRelu && !ep.saved_is_input && ep.grad_dropout.threshold == 0) {
        ep.grad_act = kActLinear;
        ep.relu_mask = ep.saved;
        ep.ld_mask = ep.ld_saved;
        ep.saved = nullptr;
    }
    return ep;
}

}  // namespace fastmlp
