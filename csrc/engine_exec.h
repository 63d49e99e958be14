// The one op switch of the engines: run_op<Dev> executes one PlanOp with the
// kernels of device Dev. cpu/engine.cpp instantiates it with CpuDev, and
// cuda/engine.cu with CudaDev (compiled by nvcc), so both engines run the same
// kernel calls with the same arguments; a new op is one case here.
//
// Dev provides `using Stream = ...;` and, as static functions:
//   gemm_ex(...)                  fastmlp.h's gemm_ex, + stream
//   activation_fwd / activation_bwd / batchnorm_fwd / batchnorm_bwd /
//   layernorm_fwd / layernorm_bwd  fastmlp.h's ops, + stream
//   xent(logits, labels, kind, out, row_loss, row_hits, scalars, rows, cols,
//        backward, stream)        softmax_xent_fused into *scalars
//   gather(x_src, y_src, order, x_dst, y_dst, state, rows, features,
//          label_bytes, batch, source_rows, stream)
//   loss(pred, labels, kind, sample_weight, dpred, row_loss, scalars, rows,
//        cols, spec, stream)     loss_fused into *scalars
//   metrics(pred, labels, kind, probs_out, scratch, scalars, rows, cols,
//           spec, stream)        metrics_fused into scalars->metric
//   clip(params, grads, offsets, l1l2, segments, mode, max_norm, scale,
//        work, stream)           grad_clip_scale
//   dp_row_sqnorms / dp_clip_factors   fastmlp.h's ops, + stream
//   optimizer(kind, params, grads, s0, s1, s2, size, hyper, state, transform,
//             stream)            (pointers already offset to the segment)
//   store(src, dst, state, rows, cols, batch, stream)
//   step_end(state, scalars, penalty, segments, metrics, rows, stream)
//   target_seed / ig_interpolate / ig_accumulate / adv_init / adv_step
//                                 fastmlp.h's ops, + stream
//   allreduce(grads, count, rows, hook, stream)   engine.h's allreduce op
// where state / hyper / scalars point into engine memory (read on the device
// on CUDA: the step index is never a launch argument).
#pragma once

#include <cstdint>
#include <cstring>

#include "engine.h"
#include "fastmlp.h"

namespace fastmlp {
namespace engine {

// A float passed through an int64 dim (plan.py: float32 bits).
inline float dim_float(int64_t bits) {
    const uint32_t u = static_cast<uint32_t>(bits);
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

// The dropout of dims 4..6 (threshold, scale bits, key0 | key1 << 32), its
// counter the pass state's rng_step.
inline DropoutSpec dim_dropout(const int64_t* d, EngineState* state) {
    DropoutSpec s;
    s.threshold = static_cast<uint32_t>(d[4]);
    if (s.threshold == 0) return s;
    s.scale = dim_float(d[5]);
    s.key0 = static_cast<uint32_t>(static_cast<uint64_t>(d[6]));
    s.key1 = static_cast<uint32_t>(static_cast<uint64_t>(d[6]) >> 32);
    s.step = state ? &state->rng_step : nullptr;
    return s;
}

// `allreduce`: the engine's all-reduce hook (the allreduce op's; may be empty
// for lists without it: check_run refuses a list that needs it).
template <class Dev>
void run_op(const PlanOp& op, void* const* table, int64_t n, typename Dev::Stream stream,
            const AllreduceHook& allreduce) {
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
            const DropoutSpec drop = dim_dropout(d, state(5));
            if (d[2] == kActRelu && drop.threshold == 0 && buf(4) == nullptr) {
                ep.relu = true;  // the fast path every backend fuses
            } else {
                ep.act = static_cast<int32_t>(d[2]);
                ep.preact = f32(4);
                ep.ld_preact = d[1];
                ep.dropout = drop;
            }
            Dev::gemm_ex(false, false, n, d[1], d[0], 1.0f, f32(0), d[0], f32(1), d[1], 0.0f,
                         f32(3), d[1], ep, static_cast<Precision>(d[3]), stream);
            break;
        }
        case OpCode::xent:
            Dev::xent(f32(0), buf(1), static_cast<LabelKind>(d[1]), f32(2), f32(3),
                      static_cast<int32_t*>(buf(4)), static_cast<StepScalars*>(buf(5)), n, d[0],
                      d[2] != 0, stream);
            break;
        case OpCode::loss: {
            LossSpec spec;
            spec.kind = static_cast<int32_t>(d[2]);
            spec.delta = dim_float(d[3]);
            spec.label_smoothing = dim_float(d[4]);
            Dev::loss(f32(0), buf(1), static_cast<LabelKind>(d[1]), f32(2),
                      d[5] != 0 ? f32(3) : nullptr, f32(4), static_cast<StepScalars*>(buf(5)), n,
                      d[0], spec, stream);
            break;
        }
        case OpCode::metrics: {
            MetricSpec spec;
            spec.flags = static_cast<int32_t>(d[2]);
            spec.transform = static_cast<int32_t>(d[3]);
            spec.k = static_cast<int32_t>(d[4]);
            spec.threshold = dim_float(d[5]);
            Dev::metrics(f32(0), buf(1), static_cast<LabelKind>(d[1]), f32(2), f32(3),
                         static_cast<StepScalars*>(buf(4)), n, d[0], spec, stream);
            break;
        }
        case OpCode::clip:
            Dev::clip(f32(0), f32(1), static_cast<const int64_t*>(buf(2)), f32(3), d[0],
                      static_cast<int>(d[1]), dim_float(d[2]), f32(4),
                      static_cast<double*>(buf(5)), stream);
            break;
        case OpCode::act_fwd:
            Dev::activation_fwd(f32(0), f32(1), n, d[0], static_cast<int>(d[1]),
                                dim_dropout(d, state(2)), stream);
            break;
        case OpCode::act_bwd:
            Dev::activation_bwd(f32(0), f32(1), f32(2), n, d[0], static_cast<int>(d[1]), d[2] != 0,
                                dim_dropout(d, state(3)), stream);
            break;
        case OpCode::dense_bwd_w: {
            // gw(in, out) = x^T dz: x is (n, in) read transposed (lda = in).
            GemmEpilogue ep;
            ep.colsum_b = f32(3);
            ep.row_scale_k = f32(4);  // DP-SGD: dz's rows times their clip factors
            Dev::gemm_ex(true, false, d[0], d[1], n, 1.0f, f32(0), d[0], f32(1), d[1], 0.0f,
                         f32(2), d[1], ep, static_cast<Precision>(d[3]), stream);
            break;
        }
        case OpCode::dp_norms: {
            Dev::dp_row_sqnorms(f32(0), f32(1), f32(2), n, d[0], d[1], d[2] != 0,
                                (d[3] & 1) != 0, stream);
            if (d[3] & 2) {
                // The loss is a mean over the step's n rows, so dz's rows are each
                // example's gradient over n: grad_scale n (1 for an empty step, whose
                // only effect is the noise); divisor: n, or the expected batch size
                // of Poisson sampling.
                const float rows = static_cast<float>(n > 0 ? n : 1);
                const float divisor = d[6] != 0 ? dim_float(d[6]) : rows;
                Dev::dp_clip_factors(f32(2), n, dim_float(d[4]), dim_float(d[5]), rows, divisor,
                                     f32(3), stream);
            }
            break;
        }
        case OpCode::dense_bwd_x: {
            // dx(n, in) = dz(n, out) @ w(in, out)^T: w read transposed (ldb = out);
            // saved (n, in) is what the previous Dense layer kept for its
            // activation's derivative (its output, or its pre-activation).
            GemmEpilogue ep;
            const DropoutSpec drop = dim_dropout(d, state(4));
            if (d[2] == kActRelu && drop.threshold == 0 && d[7] == 0) {
                ep.relu_mask = f32(2);  // the fast path every backend fuses
                ep.ld_mask = d[0];
            } else if (d[2] != kActLinear || drop.threshold != 0) {
                ep.grad_act = static_cast<int32_t>(d[2]);
                ep.saved = f32(2);
                ep.ld_saved = d[0];
                ep.saved_is_input = d[7] != 0;
                ep.grad_dropout = drop;
            }
            Dev::gemm_ex(false, true, n, d[0], d[1], 1.0f, f32(0), d[1], f32(1), d[1], 0.0f,
                         f32(3), d[0], ep, static_cast<Precision>(d[3]), stream);
            break;
        }
        case OpCode::bn_fwd:
            Dev::batchnorm_fwd(f32(0), f32(1), f32(2), f32(3), f32(4), f32(5), f32(6), f32(7), n,
                               d[0], dim_float(d[2]), dim_float(d[3]), d[1] != 0, stream);
            break;
        case OpCode::bn_bwd:
            Dev::batchnorm_bwd(f32(0), f32(1), f32(2), f32(3), f32(4), f32(5), f32(6), f32(7), n,
                               d[0], stream);
            break;
        case OpCode::ln_fwd:
            Dev::layernorm_fwd(f32(0), f32(1), f32(2), f32(3), f32(4), f32(5), n, d[0],
                               dim_float(d[1]), stream);
            break;
        case OpCode::ln_bwd:
            Dev::layernorm_bwd(f32(0), f32(1), f32(2), f32(3), f32(4), f32(5), f32(6), f32(7), n,
                               d[0], stream);
            break;
        case OpCode::optimizer: {
            // A segment of the flat buffers (the whole of them without a
            // gradient transform): every per-element buffer from d[2] on.
            const int64_t off = d[2];
            auto at = [&](int i) { return buf(i) ? f32(i) + off : nullptr; };
            GradTransform t;
            t.l1 = dim_float(d[3]);
            t.l2 = dim_float(d[4]);
            t.clipvalue = dim_float(d[5]);
            t.scale = buf(7) ? f32(7) + d[6] : nullptr;
            t.penalty = buf(8) ? static_cast<double*>(buf(8)) + d[6] : nullptr;
            t.work = static_cast<double*>(buf(9));
            if (buf(10)) {
                t.noise.std = f32(10);
                t.noise.key0 = static_cast<uint32_t>(static_cast<uint64_t>(d[7]));
                t.noise.key1 = static_cast<uint32_t>(static_cast<uint64_t>(d[7]) >> 32);
                t.noise.step = state(5) ? &state(5)->rng_step : nullptr;  // checked by the kernels
                t.noise.offset = off;
            }
            Dev::optimizer(d[1], at(0), at(1), at(2), at(3), at(6), d[0],
                           static_cast<const StepHyper*>(buf(4)), state(5), t, stream);
            break;
        }
        case OpCode::store:
            Dev::store(f32(0), f32(1), state(2), n, d[0], d[1], stream);
            break;
        case OpCode::step_end:
            Dev::step_end(state(0), static_cast<const StepScalars*>(buf(1)),
                          static_cast<const double*>(buf(2)), d[0], d[1] != 0, n, stream);
            break;
        case OpCode::target_seed:
            Dev::target_seed(f32(0), static_cast<const int32_t*>(buf(1)), f32(2), n, d[0],
                             static_cast<int32_t>(d[1]), stream);
            break;
        case OpCode::ig_interp:
            // The batch's first virtual row is state.step * batch: read on the device.
            Dev::ig_interpolate(f32(0), f32(1), f32(2), static_cast<const int32_t*>(buf(3)),
                                f32(4), static_cast<int32_t*>(buf(5)), d[3], d[0], d[1],
                                &state(6)->step, d[2], n, stream);
            break;
        case OpCode::ig_sum:
            Dev::ig_accumulate(f32(0), f32(1), f32(2), f32(3), f32(4), d[3], d[0], d[1],
                               &state(5)->step, d[2], n, d[4] != 0, d[5] != 0, stream);
            break;
        case OpCode::adv_init: {
            // The random start's counter: the optimizer step (training: a fresh
            // draw every step of every epoch) or the pass's step (an attack or
            // an evaluation: the same draw for the same call and seed).
            const int64_t* counter = nullptr;
            if (d[4] != 0) counter = d[6] != 0 ? &state(2)->step : &state(2)->rng_step;
            Dev::adv_init(f32(0), f32(1), n, d[0], dim_float(d[1]), dim_float(d[2]),
                          dim_float(d[3]), counter,
                          static_cast<uint32_t>(static_cast<uint64_t>(d[5])),
                          static_cast<uint32_t>(static_cast<uint64_t>(d[5]) >> 32), stream);
            break;
        }
        case OpCode::adv_step:
            Dev::adv_step(f32(0), f32(1), f32(2), n, d[0], dim_float(d[1]), dim_float(d[2]),
                          dim_float(d[3]), dim_float(d[4]), d[5] != 0, stream);
            break;
        case OpCode::allreduce:
            Dev::allreduce(f32(0), d[0], n, allreduce, stream);
            break;
    }
}

}  // namespace engine
}  // namespace fastmlp
