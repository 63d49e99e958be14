// The activation loops of cpu/activation.cpp that the CPU GEMM's epilogue
// shares (issue 15). Compiled once, in activation.cpp, with target_clones: the
// GEMM drivers built per instruction set call them, so no copy of the
// activation code is compiled with one driver's -m flags (see gemm_driver.h).
#pragma once

#include <cstdint>

#include "fastmlp.h"

namespace fastmlp {
namespace cpu {

// y[0:len) = act(x) * the dropout multipliers of elements e0.. (preact[0:len)
// = x first when not null). x may be y.
void act_fwd_span(int act, const float* x, float* y, float* preact, int64_t len, uint64_t e0,
                  uint64_t step, const DropoutSpec& d);
// dx[0:len) = act_grad(dy * multiplier, s) from the input (from_input) or the
// output. dy may be dx; s may be null for linear.
void act_bwd_span(int act, bool from_input, const float* dy, const float* s, float* dx,
                  int64_t len, uint64_t e0, uint64_t step, const DropoutSpec& d);

// The general epilogue of GemmEpilogue (has_act / has_grad_act) on the
// finished block C(i0:i0+rows, j0:j0+cols) of an (m, n) C, c pointing at
// C(i0, j0) with leading dimension ldc. The dropout element of C(i, j) is
// i * n + j. Does nothing for the parts the epilogue does not ask for.
void act_epilogue_rows(const GemmEpilogue& ep, float* c, int64_t ldc, int64_t i0, int64_t rows,
                       int64_t j0, int64_t cols, int64_t n);

}  // namespace cpu
}  // namespace fastmlp
