// The step plan as the C++ engines see it, and the engine interface.
//
// fastmlp/plan.py compiles a model into op lists (training step, evaluation
// step, prediction step, attribution step, attack step) over a table of buffers; an engine runs a list for
// many steps with no Python per op: the CPU engine (cpu/engine.cpp) as a plain
// loop, the CUDA engine (cuda/engine.cu) by replaying one CUDA Graph per
// (list, rows). Both dispatch every op through the one switch in
// engine_exec.h, so a new op is one opcode here and one case there.
//
// Per-step values are never launch arguments (a CUDA Graph freezes those):
// the batch index lives in EngineState (engine memory, advanced by the
// step_end op), the optimizer's per-step constants in a table of StepHyper
// indexed by it, written by the host once per pass.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace engine {

// The opcodes, once: the enum, the names (errors, NVTX) and the Python enum
// (fastmlp/plan.py checks its list against _C.engine_opcodes()). Buffers
// (buf[]) and sizes (dim[]) of each; "-" marks an optional buffer (id -1);
// n is the step's row count (the batch, or fewer in the last step).
//
// gather      buf: x_src, y_src-, order-, x_dst, y_dst-, state
//             dim: features, label_bytes (per row), batch, source rows
//             rows b*s .. b*s+n of the source (b = batch, s = state.step),
//             through `order` when given, copied to the batch buffers; an
//             order entry outside the source rows is never read (the CPU
//             throws, a GPU thread skips the row).
// Dropout, where an op has one (dims 4..6: threshold, scale as float bits,
// key0 | key1 << 32; threshold 0 = none), draws its mask for the optimizer
// step state.rng_step (kernel_math.h DropoutSpec): the op's state buffer.
// dense_fwd   buf: x, w, b-, y, preact-, state-
//             dim: in, out, act, precision, drop_threshold, drop_scale, drop_key
//             y = dropout(act(x @ w + b)); preact = x @ w + b when given
//             gemm_ex
// loss        buf: pred, labels, sample_weight-, dpred-, row_loss, scalars
//             dim: cols, label kind, loss kind (LossKind), delta (float bits),
//             label_smoothing (float bits), backward
//             loss_fused: scalars.loss = sum_r w_r L_r / n, dpred (backward)
// metrics     buf: pred, labels, probs_out-, row_scratch, scalars
//             dim: cols, label kind, flags (MetricFlag), transform, k,
//             threshold (float bits)
//             metrics_fused: scalars.metric[] = the step's per-metric sums
// clip        buf: params, grads, offsets, l1l2-, scale, work
//             dim: segments, mode (0 per tensor, 1 global), max_norm (float bits)
//             grad_clip_scale: scale[k] of each parameter segment
// xent        buf: logits, labels, out, row_loss, row_hits, scalars
//             dim: classes, label kind, backward
//             softmax-cross-entropy, fused: out = dlogits (backward) or
//             probs; scalars.loss = mean loss, scalars.hits = arg-max hits
// act_fwd     buf: x, y, state-         dim: cols, act, -, -, drop_*
//             y = dropout(act(x))                           activation_fwd
// act_bwd     buf: dy, saved-, dx, state-
//             dim: cols, act, saved_is_input, -, drop_*
//             dx = act_grad(dropout(dy), saved); dx may be dy  activation_bwd
// dense_bwd_w buf: x, dz, gw, gb-, row_scale-   dim: in, out, -, precision
//             gw = x^T dz, gb = colsum(dz); with row_scale (DP-SGD's clip
//             factors, n floats) gw = x^T diag(s) dz, gb = s^T dz, the rows
//             scaled inside the GEMM (GemmEpilogue::row_scale_k)  gemm_ex
// dp_norms    buf: x, dz, acc, noise_std-
//             dim: in, out, bias, mode, clip (float bits), noise multiplier
//             (float bits), divisor (float bits; 0: the step's rows)
//             DP-SGD's per-example gradient norms of one Dense layer (the
//             ghost-norm identity ||x_r dz_r^T||^2 = ||x_r||^2 ||dz_r||^2):
//             acc[r] (+)= (||x_r||^2 + bias) ||dz_r||^2 (mode bit 0:
//             accumulate onto the earlier layers'); mode bit 1 (the last
//             layer in op order): acc becomes the rows' clip factors times
//             n / divisor and noise_std = noise multiplier * clip / divisor
//             dp_row_sqnorms, dp_clip_factors
// dense_bwd_x buf: dz, w, saved-, dx, state-
//             dim: in, out, act, precision, drop_*, saved_is_input
//             dx = act_grad(dropout(dz w^T), saved): the previous Dense
//             layer's activation (and its dropout) in the epilogue  gemm_ex
// bn_fwd      buf: x, gamma-, beta-, y, mean-, invstd-, moving_mean, moving_var
//             dim: cols, training, eps (float bits), momentum (float bits)
//                                                           batchnorm_fwd
// bn_bwd      buf: dy, x, gamma-, mean, invstd, dx, dgamma-, dbeta-
//             dim: cols                                     batchnorm_bwd
// ln_fwd      buf: x, gamma-, beta-, y, mean, invstd  dim: cols, eps (float bits)
//                                                           layernorm_fwd
// ln_bwd      buf: dy, x, gamma-, mean, invstd, dx, dgamma-, dbeta-
//             dim: cols                                     layernorm_bwd
// optimizer   buf: params, grads, s0-, s1-, hyper, state, s2-, scale-, penalty-,
//             work-, noise_std-
//             dim: size, kind (0 SGD: s0 = momentum buffer; 1 Adam/AdamW:
//             s0 = m, s1 = v; 2 RMSprop: s0 = square_avg, s1 = momentum
//             buffer-, s2 = grad_avg-), offset (elements into the flat
//             buffers), l1, l2, clipvalue (float bits), segment, noise key
//             (key0 | key1 << 32)
//             one launch over elements offset .. offset+size-1 of the flat
//             parameters, with hyper[state.step]; the gradient transform
//             (kernel_math.h GradTransform: l1/l2, scale[segment] when scale
//             is given, clipvalue) before the update, and the regularization
//             penalty of the segment's pre-update weights into
//             penalty[segment] when penalty is given; with noise_std (DP-SGD)
//             first g += *noise_std * gaussian_noise(offset + i, state.rng_step)
//             (kernel_math.h NoiseSpec);
//             records the first step that left a parameter NaN or +-Inf in
//             state.nonfinite_param_step (checked in the same pass over the
//             parameters: no extra read)
// store       buf: src, dst, state      dim: cols, batch
//             rows 0..n of src to rows b*s.. of dst (predict's output)
// Interpretability and adversarial examples (issue 18): the input-gradient
// passes run forward in inference mode (no dropout, BatchNormalization's moving
// statistics) and backward down to the input.
// target_seed buf: logits, targets, out      dim: classes, transform
//             out = d f_t(logits) / d logits per row, t = targets[r], f the
//             output transform (OutputTransform)           target_seed
// ig_interp   buf: x_src, baseline-, alphas, targets_src-, x_dst, targets_dst-,
//             state
//             dim: features, steps, batch, images (source rows)
//             the batch's path points of integrated gradients: virtual rows
//             b*s.. (b = batch, s = state.step) of images * steps, row v =
//             baseline_i + alphas[m] (x_i - baseline_i), i = v / steps,
//             m = v % steps; targets_dst[r] = targets_src[i]  ig_interpolate
// ig_sum      buf: grads, x_src, baseline-, weights, out, state
//             dim: features, steps, batch, images, multiply, absolute
//             out[i] = (x_i - baseline_i if multiply) * sum_m weights[m] *
//             grads[(i - i0) steps + m] (|.| if absolute) for the batch's
//             images i0 = b*s / steps ..                  ig_accumulate
// adv_init    buf: x, adv, state
//             dim: features, eps, lo, hi (float bits), random start, key
//             (key0 | key1 << 32), counter (0: state.rng_step, 1: state.step)
//             adv = clamp(x + eps * U(-1, 1), lo, hi) (no U without random
//             start)                                       adv_init
// adv_step    buf: x, adv, grad
//             dim: features, eps, alpha, lo, hi (float bits), project
//             adv = clamp(x + clamp(adv + alpha sign(grad) - x, -eps, eps),
//             lo, hi) (FGSM, project 0: clamp(adv + alpha sign(grad), lo, hi)),
//             in place                                     adv_step
// Data-parallel training (issue 19): the gradients of a step, averaged over
// the processes, weighted by their rows.
// allreduce   buf: grads        dim: count
//             grads holds count + 1 floats (the flat gradients, then one slot):
//             grads[i] *= n, grads[count] = n, then the engine's all-reduce
//             hook sums the count + 1 floats over the processes in place (MPI
//             on the CPU, NCCL on the engine's stream on CUDA, run eagerly
//             between the step's graphs), then grads[i] /= grads[count] (when > 0). So
//             every process holds sum_p n_p g_p / sum_p n_p: the gradient of
//             the mean loss over all processes' rows of the step.
// step_end    buf: state, scalars-, penalty-
//             dim: penalty segments, metrics (1: add scalars.metric[])
//             loss_sum += loss * n, correct += hits, penalty_sum +=
//             sum_k penalty[k] * n, metric[i] += scalars.metric[i], records
//             the first non-finite loss, then state.step += 1,
//             state.rng_step += 1
#define FASTMLP_OPCODES(X) \
    X(gather)              \
    X(dense_fwd)           \
    X(xent)                \
    X(loss)                \
    X(metrics)             \
    X(clip)                \
    X(act_fwd)             \
    X(act_bwd)             \
    X(dense_bwd_w)         \
    X(dense_bwd_x)         \
    X(dp_norms)            \
    X(bn_fwd)              \
    X(bn_bwd)              \
    X(ln_fwd)              \
    X(ln_bwd)              \
    X(optimizer)           \
    X(store)               \
    X(step_end)            \
    X(target_seed)         \
    X(ig_interp)           \
    X(ig_sum)              \
    X(adv_init)            \
    X(adv_step)            \
    X(allreduce)

enum class OpCode : int32_t {
#define FASTMLP_OPCODE_ENUM(name) name,
    FASTMLP_OPCODES(FASTMLP_OPCODE_ENUM)
#undef FASTMLP_OPCODE_ENUM
};
constexpr int kNumOpCodes = 0
#define FASTMLP_OPCODE_COUNT(name) +1
    FASTMLP_OPCODES(FASTMLP_OPCODE_COUNT)
#undef FASTMLP_OPCODE_COUNT
    ;

const char* opcode_name(OpCode code);

constexpr int kMaxBufs = 11;
constexpr int kMaxDims = 8;

struct PlanOp {
    OpCode code;
    int32_t buf[kMaxBufs];   // buffer ids; -1 = none
    int64_t dim[kMaxDims];
};

// The op lists of a plan.
// (kAttribute: attributions of an input's outputs; kAttack: adversarial
// examples, stored.)
enum OpList : int { kTrain = 0, kEvaluate = 1, kPredict = 2, kAttribute = 3, kAttack = 4,
                    kNumLists = 5 };

// Engine memory (device memory on CUDA), one per bound plan.
struct EngineState {
    int64_t step;            // steps run in this pass: the batch index
    int64_t correct;         // arg-max hits, summed over the pass
    double loss_sum;         // sum over steps of (mean loss * rows), in double
    int64_t nonfinite_step;  // the first step whose loss was not finite, or -1
    int64_t bad_row;         // the last xent's first out-of-range label row, or -1
    int64_t nonfinite_param_step;  // the first step whose update left a parameter non-finite, or -1
    int64_t rng_step;        // the optimizer step number of this step: dropout's counter
    int64_t reserved;
    double metric[kNumMetricSums];  // the metrics op's sums (MetricFlag order), over the pass
    double penalty_sum;      // sum over steps of (regularization penalty * rows)
    double reserved2[2];
};
static_assert(sizeof(EngineState) == 128, "plan.py sizes it from engine_sizes");

// What one xent op leaves for step_end (and for the Python executor).
struct StepScalars {
    float loss;
    int32_t reserved0;
    int64_t hits;
    int64_t bad_row;
    int64_t reserved1;
    double metric[kNumMetricSums];  // the step's metric sums (metrics op)
    double reserved2[3];
};
static_assert(sizeof(StepScalars) == 96, "plan.py sizes it from engine_sizes");

// The optimizer's constants for one step, computed on the host (adam_hyper,
// in double, exactly as the per-call ops do) so the engine's update is the
// per-call update bit for bit.
struct StepHyper {
    SgdHyper sgd;
    AdamHyper adam;
    RmspropHyper rmsprop;
};

enum OptKind : int64_t { kSgd = 0, kAdam = 1, kRmsprop = 2 };

// The all-reduce of the allreduce op: sums `count` floats at `data` (engine
// memory) over the processes, in place; `stream` is the engine's CUDA stream (0
// on the CPU). fastmlp/distributed.py provides it (mpi4py on the CPU, CuPy's
// NCCL on CUDA); a Python function, called with the GIL taken (pybind11's
// std::function wrapper takes it).
using AllreduceHook = std::function<void(std::uintptr_t data, int64_t count, std::uintptr_t stream)>;

// One bound plan on one device. Pointers are addresses in the engine's
// memory (host for the CPU engine, device for CUDA); nothing is allocated
// here: plan.py allocates every buffer (CuPy's pool on the GPU).
class Engine {
public:
    virtual ~Engine() = default;

    // The ops of one list; checked against the buffer table (ids in range,
    // opcodes known). Replaces the list and drops its captured graphs.
    void set_ops(int list, const std::vector<PlanOp>& ops);
    // The buffer table (addresses by id). Drops every captured graph when an
    // address changes.
    void set_buffers(const std::vector<std::uintptr_t>& addresses);
    // The optimizer constants of steps 0..lrs.size() of the coming pass into
    // the hyper buffer `hyper_buf` (which holds >= lrs.size() StepHyper):
    // step s runs with learning rate lrs[s] and optimizer step number step0 + s.
    // RMSprop reads momentum, eps, weight_decay, alpha and centered.
    void set_schedule(int hyper_buf, int64_t kind, const std::vector<double>& lrs,
                      int64_t step0, double momentum, double beta1, double beta2, double eps,
                      double weight_decay, bool nesterov, bool decoupled, double alpha,
                      bool centered);
    // EngineState at `state_buf` reset for a new pass (step 0, sums 0, flags -1,
    // rng_step = the step0 of the last set_schedule, else 1).
    void begin_pass(int state_buf);
    // A copy of the EngineState at `state_buf` (waits for the engine's work).
    EngineState state(int state_buf);

    // Runs steps first .. first+count-1 of `list` over `rows` rows in batches
    // of `batch` (the last step may have fewer rows; one step alone may have
    // none, first * batch == rows: DP-SGD's empty Poisson batch, whose update is
    // the noise). state.step must equal `first`. stream: the caller's CUDA stream (CuPy's current), 0 on the
    // CPU. Returns the steps run: all, except that the CPU engine stops after
    // a step whose loss or updated parameters are not finite (the CUDA engine
    // runs on; the caller reads state().nonfinite_step / nonfinite_param_step
    // at its next progress update).
    virtual int64_t run(int list, int64_t rows, int64_t batch, int64_t first, int64_t count,
                        std::uintptr_t stream) = 0;
    // Waits until the engine's work so far is done.
    virtual void synchronize() = 0;
    // Graphs captured so far (CUDA), for tests.
    virtual int64_t graphs_captured() const { return 0; }
    // The all-reduce the allreduce op calls (empty: none; a list with the op
    // then refuses to run).
    void set_allreduce(AllreduceHook hook) { allreduce_ = std::move(hook); }

protected:
    // Copies between host memory and engine memory (device on CUDA), ordered
    // with the engine's work.
    virtual void write(void* dst, const void* src, size_t bytes) = 0;
    virtual void read(void* dst, const void* src, size_t bytes) = 0;
    virtual void on_plan_changed() {}

    void* buffer(int id) const;
    // Throws unless every buffer the ops of `list` need is bound (non-null;
    // the optional ones, "-" above, may be null) and, when the list updates
    // the parameters, steps first .. first+count-1 lie within the optimizer
    // table set_schedule wrote. Cheap: once per run() call.
    void check_run(int list, int64_t first, int64_t count) const;
    std::vector<PlanOp> ops_[kNumLists];
    std::vector<void*> bufs_;
    int64_t schedule_steps_ = 0;  // entries of the optimizer table (set_schedule)
    int64_t schedule_step0_ = 1;  // its first optimizer step number
    AllreduceHook allreduce_;
};

// The engines (cpu/engine.cpp, cuda/engine.cu).
Engine* new_cpu_engine();
#ifdef FASTMLP_WITH_CUDA
Engine* new_cuda_engine(int device);
#endif

}  // namespace engine
}  // namespace fastmlp
