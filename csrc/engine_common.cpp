// The device-independent part of the engines (engine.h): plan checks, the
// buffer table, the per-step optimizer table and the pass state.
#include <cstring>

#include "check.h"
#include "engine.h"
#include "kernel_math.h"

namespace fastmlp {
namespace engine {

const char* opcode_name(OpCode code) {
    switch (code) {
#define FASTMLP_OPCODE_NAME(name) \
    case OpCode::name:            \
        return #name;
        FASTMLP_OPCODES(FASTMLP_OPCODE_NAME)
#undef FASTMLP_OPCODE_NAME
    }
    return "unknown";
}

void* Engine::buffer(int id) const {
    FASTMLP_CHECK(id >= 0 && id < static_cast<int>(bufs_.size()) && bufs_[id] != nullptr,
                  "engine: buffer " << id << " is not bound");
    return bufs_[id];
}

namespace {

// Bit b set: buffer position b of the opcode may be absent (engine.h's "-").
unsigned optional_buffers(OpCode code) {
    switch (code) {
        case OpCode::gather: return (1u << 1) | (1u << 2) | (1u << 4);
        case OpCode::dense_fwd: return (1u << 2) | (1u << 4) | (1u << 5);
        case OpCode::act_fwd: return 1u << 2;
        case OpCode::act_bwd: return (1u << 1) | (1u << 3);
        case OpCode::dense_bwd_w: return (1u << 3) | (1u << 4);
        case OpCode::dense_bwd_x: return (1u << 2) | (1u << 4);
        case OpCode::bn_fwd: return (1u << 1) | (1u << 2) | (1u << 4) | (1u << 5);
        case OpCode::bn_bwd: return (1u << 2) | (1u << 6) | (1u << 7);
        case OpCode::ln_fwd: return (1u << 1) | (1u << 2);
        case OpCode::ln_bwd: return (1u << 2) | (1u << 6) | (1u << 7);
        case OpCode::loss: return (1u << 2) | (1u << 3);
        case OpCode::metrics: return 1u << 2;
        case OpCode::clip: return 1u << 3;
        case OpCode::optimizer:
            return (1u << 2) | (1u << 3) | (1u << 6) | (1u << 7) | (1u << 8) | (1u << 9) |
                   (1u << 10);
        case OpCode::dp_norms: return 1u << 3;
        case OpCode::step_end: return (1u << 1) | (1u << 2);
        case OpCode::ig_interp: return (1u << 1) | (1u << 3) | (1u << 5);
        case OpCode::ig_sum: return 1u << 2;
        default: return 0u;
    }
}

}  // namespace

void Engine::check_run(int list, int64_t first, int64_t count) const {
    FASTMLP_CHECK(list >= 0 && list < kNumLists, "engine: unknown op list " << list);
    FASTMLP_CHECK(!ops_[list].empty(), "engine: op list " << list << " is empty");
    for (size_t i = 0; i < ops_[list].size(); ++i) {
        const PlanOp& op = ops_[list][i];
        const unsigned optional = optional_buffers(op.code);
        for (int b = 0; b < kMaxBufs; ++b) {
            const int id = op.buf[b];
            const bool bound = id >= 0 && id < static_cast<int>(bufs_.size()) && bufs_[id];
            if (id >= 0 && !bound && !(optional >> b & 1u))
                FASTMLP_CHECK(false, "engine: op " << i << " (" << opcode_name(op.code)
                                                   << ") needs buffer " << id
                                                   << ", which is not bound");
        }
        if (op.code == OpCode::allreduce)
            FASTMLP_CHECK(static_cast<bool>(allreduce_),
                          "engine: op " << i << " (allreduce) needs the processes' all-reduce, "
                                        "which is not set (fastmlp.distributed)");
        if (op.code == OpCode::optimizer)
            FASTMLP_CHECK(first + count <= schedule_steps_,
                          "engine: steps " << first << ".." << first + count - 1
                                           << " run past the optimizer table of "
                                           << schedule_steps_ << " steps (set_schedule)");
    }
}

void Engine::set_ops(int list, const std::vector<PlanOp>& ops) {
    FASTMLP_CHECK(list >= 0 && list < kNumLists, "engine: unknown op list " << list);
    for (size_t i = 0; i < ops.size(); ++i) {
        const PlanOp& op = ops[i];
        const int code = static_cast<int>(op.code);
        FASTMLP_CHECK(code >= 0 && code < kNumOpCodes,
                      "engine: op " << i << " has unknown opcode " << code);
        for (int b = 0; b < kMaxBufs; ++b)
            FASTMLP_CHECK(op.buf[b] >= -1 && op.buf[b] < static_cast<int>(bufs_.size()),
                          "engine: op " << i << " (" << opcode_name(op.code) << ") names buffer "
                                        << op.buf[b] << "; the table has " << bufs_.size());
    }
    ops_[list] = ops;
    on_plan_changed();
}

void Engine::set_buffers(const std::vector<std::uintptr_t>& addresses) {
    std::vector<void*> bufs(addresses.size());
    for (size_t i = 0; i < addresses.size(); ++i) bufs[i] = reinterpret_cast<void*>(addresses[i]);
    if (bufs != bufs_) {
        bufs_ = bufs;
        on_plan_changed();
    }
}

void Engine::set_schedule(int hyper_buf, int64_t kind, const std::vector<double>& lrs,
                          int64_t step0, double momentum, double beta1, double beta2, double eps,
                          double weight_decay, bool nesterov, bool decoupled, double alpha,
                          bool centered) {
    FASTMLP_CHECK(kind == kSgd || kind == kAdam || kind == kRmsprop,
                  "engine: unknown optimizer kind " << kind);
    FASTMLP_CHECK(step0 >= 1, "engine: optimizer steps count from 1, got " << step0);
    std::vector<StepHyper> table(lrs.size());
    for (size_t s = 0; s < lrs.size(); ++s) {
        StepHyper& h = table[s];
        std::memset(&h, 0, sizeof(h));
        // The same float conversions as the per-call ops (ops.sgd_step passes
        // float(lr) etc.; adam_step calls adam_hyper with the doubles).
        h.sgd = SgdHyper{static_cast<float>(lrs[s]), static_cast<float>(momentum),
                         static_cast<float>(weight_decay), nesterov};
        if (kind == kAdam)
            h.adam = adam_hyper(lrs[s], beta1, beta2, eps, weight_decay, decoupled,
                                step0 + static_cast<int64_t>(s));
        if (kind == kRmsprop)
            h.rmsprop = rmsprop_hyper(lrs[s], alpha, eps, weight_decay, momentum, centered);
    }
    if (!table.empty()) write(buffer(hyper_buf), table.data(), table.size() * sizeof(StepHyper));
    schedule_steps_ = static_cast<int64_t>(table.size());
    schedule_step0_ = step0;
}

void Engine::begin_pass(int state_buf) {
    EngineState st;
    std::memset(&st, 0, sizeof(st));
    st.nonfinite_step = -1;
    st.bad_row = -1;
    st.nonfinite_param_step = -1;
    st.rng_step = schedule_step0_;
    write(buffer(state_buf), &st, sizeof(st));
}

EngineState Engine::state(int state_buf) {
    EngineState st;
    read(&st, buffer(state_buf), sizeof(st));
    return st;
}

}  // namespace engine
}  // namespace fastmlp
