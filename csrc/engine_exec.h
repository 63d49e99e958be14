// The one op switch of the engines: run_op<Dev> executes one PlanOp with the
// kernels of device Dev. cpu/engine.cpp instantiates it with CpuDev, and
// cuda/engine.cu with CudaDev (compiled by nvcc), so both engines run the same
// kernel calls with the same arguments; a new op is one case here.
//
// Dev provides `using Stream = ...;` and, as static functions:
//   gemm_ex(...)                  fastmlp.h's gemm_ex, + stream
//   relu_backward(dy, y, dx, size, stream)
//   xent(logits, labels, kind, out, row_loss, row_hits, scalars, rows, cols,
//        backward, stream)        softmax_xent_fused into *scalars
//   gather(x_src, y_src, order, x_dst, y_dst, state, rows, features,
//          label_bytes, batch, source_rows, stream)
//   optimizer(kind, params, grads, s0, s1, size, hyper, state, stream)
//   store(src, dst, state, rows, cols, batch, stream)
//   step_end(state, scalars, rows, stream)
// where state / hyper / scalars point into engine memory (read on the device
// on CUDA: the step index is never a launch argument).
#pragma once

#include <cstdint>

#include "engine.h"
#include "fastmlp.h"

namespace fastmlp {
namespace engine {

template <class Dev>
void run_op(const PlanOp& op, void* const* table, int64_t n, typename Dev::Stream stream) {
    auto buf = [&](int i) -> void* { return op.buf[i] < 0 ? nullptr : table[op.buf[i]]; };
    auto f32 = [&](int i) { return static_cast<float*>(buf(i)); };
    auto state = [&](int i) { return static_cast<EngineState*>(buf(i)); };
    const int64_t* d = op.dim;
    switch (op.code) {
        case OpCode::gather:
            Dev::gather(f32(0), buf(1), static_cast<const int64_t*>(buf(2)), f32(3), buf(4),
                        state(5), n, d[0], d[1], d[2], d[3], stream);
            break;
        case OpCode::dense_fwd: {
            // y(n, out) = x(n, in) @ w(in, out), row-major: lda = in, ldb = ldc = out.
            GemmEpilogue ep;
            ep.bias = f32(2);
            ep.relu = d[2] != 0;
            Dev::gemm_ex(false, false, n, d[1], d[0], 1.0f, f32(0), d[0], f32(1), d[1], 0.0f,
                         f32(3), d[1], ep, static_cast<Precision>(d[3]), stream);
            break;
        }
        case OpCode::xent:
            Dev::xent(f32(0), buf(1), static_cast<LabelKind>(d[1]), f32(2), f32(3),
                      static_cast<int32_t*>(buf(4)), static_cast<StepScalars*>(buf(5)), n, d[0],
                      d[2] != 0, stream);
            break;
        case OpCode::relu_bwd:
            Dev::relu_backward(f32(0), f32(1), f32(0), n * d[0], stream);
            break;
        case OpCode::dense_bwd_w: {
            // gw(in, out) = x^T dz: x is (n, in) read transposed (lda = in).
            GemmEpilogue ep;
            ep.colsum_b = f32(3);
            Dev::gemm_ex(true, false, d[0], d[1], n, 1.0f, f32(0), d[0], f32(1), d[1], 0.0f,
                         f32(2), d[1], ep, static_cast<Precision>(d[3]), stream);
            break;
        }
        case OpCode::dense_bwd_x: {
            // dx(n, in) = dz(n, out) @ w(in, out)^T: w read transposed (ldb = out);
            // mask (n, in) is the previous layer's ReLU output.
            GemmEpilogue ep;
            ep.relu_mask = f32(2);
            ep.ld_mask = d[0];
            Dev::gemm_ex(false, true, n, d[0], d[1], 1.0f, f32(0), d[1], f32(1), d[1], 0.0f,
                         f32(3), d[0], ep, static_cast<Precision>(d[3]), stream);
            break;
        }
        case OpCode::optimizer:
            Dev::optimizer(d[1], f32(0), f32(1), f32(2), f32(3), d[0],
                           static_cast<const StepHyper*>(buf(4)), state(5), stream);
            break;
        case OpCode::store:
            Dev::store(f32(0), f32(1), state(2), n, d[0], d[1], stream);
            break;
        case OpCode::step_end:
            Dev::step_end(state(0), static_cast<const StepScalars*>(buf(1)), n, stream);
            break;
    }
}

}  // namespace engine
}  // namespace fastmlp
