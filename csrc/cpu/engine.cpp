// The CPU engine: runs a plan's op lists step after step on the calling
// thread (each kernel spreads its own work over the thread pool), through
// engine_exec.h's switch. Engine memory is host memory, so the per-step
// state is read and written directly.
#include <cmath>
#include <cstring>
#include <vector>

#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "engine.h"
#include "engine_exec.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace engine {
namespace {

struct CpuDev {
    using Stream = int;  // no streams on the CPU

    static void gemm_ex(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
                        const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                        float* c, int64_t ldc, const GemmEpilogue& ep, Precision p, Stream) {
        cpu::gemm_ex(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep, p);
    }

    static void activation_fwd(const float* x, float* y, int64_t rows, int64_t cols, int act,
                               const DropoutSpec& drop, Stream) {
        cpu::activation_fwd(x, y, rows, cols, act, drop);
    }

    static void activation_bwd(const float* dy, const float* saved, float* dx, int64_t rows,
                               int64_t cols, int act, bool saved_is_input,
                               const DropoutSpec& drop, Stream) {
        cpu::activation_bwd(dy, saved, dx, rows, cols, act, saved_is_input, drop);
    }

    static void batchnorm_fwd(const float* x, const float* gamma, const float* beta, float* y,
                              float* mean, float* invstd, float* moving_mean, float* moving_var,
                              int64_t rows, int64_t cols, float eps, float momentum,
                              bool training, Stream) {
        cpu::batchnorm_fwd(x, gamma, beta, y, mean, invstd, moving_mean, moving_var, rows, cols,
                           eps, momentum, training);
    }

    static void batchnorm_bwd(const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* invstd, float* dx, float* dgamma,
                              float* dbeta, int64_t rows, int64_t cols, Stream) {
        cpu::batchnorm_bwd(dy, x, gamma, mean, invstd, dx, dgamma, dbeta, rows, cols);
    }

    static void layernorm_fwd(const float* x, const float* gamma, const float* beta, float* y,
                              float* mean, float* invstd, int64_t rows, int64_t cols, float eps,
                              Stream) {
        cpu::layernorm_fwd(x, gamma, beta, y, mean, invstd, rows, cols, eps);
    }

    static void layernorm_bwd(const float* dy, const float* x, const float* gamma,
                              const float* mean, const float* invstd, float* dx, float* dgamma,
                              float* dbeta, int64_t rows, int64_t cols, Stream) {
        cpu::layernorm_bwd(dy, x, gamma, mean, invstd, dx, dgamma, dbeta, rows, cols);
    }

    static void xent(const float* logits, const void* labels, LabelKind kind, float* out,
                     float* row_loss, int32_t* row_hits, StepScalars* sc, int64_t rows,
                     int64_t cols, bool backward, Stream) {
        cpu::softmax_xent_fused(logits, labels, kind, out, row_loss, row_hits, &sc->loss,
                                &sc->hits, &sc->bad_row, rows, cols, backward);
    }

    static void loss(const float* pred, const void* labels, LabelKind kind, const float* weight,
                     float* dpred, float* row_loss, StepScalars* sc, int64_t rows, int64_t cols,
                     const LossSpec& spec, Stream) {
        cpu::loss_fused(pred, labels, kind, weight, dpred, row_loss, &sc->loss, &sc->bad_row,
                        rows, cols, spec);
    }

    static void metrics(const float* pred, const void* labels, LabelKind kind, float* probs_out,
                        float* scratch, StepScalars* sc, int64_t rows, int64_t cols,
                        const MetricSpec& spec, Stream) {
        cpu::metrics_fused(pred, labels, kind, probs_out, scratch, sc->metric, rows, cols, spec);
    }

    static void clip(const float* params, const float* grads, const int64_t* offsets,
                     const float* l1l2, int64_t segments, int mode, float max_norm, float* scale,
                     double* work, Stream) {
        cpu::grad_clip_scale(params, grads, offsets, l1l2, segments, mode, max_norm, scale, work);
    }

    static void dp_row_sqnorms(const float* x, const float* dz, float* acc, int64_t rows,
                               int64_t in, int64_t out, bool bias, bool accumulate, Stream) {
        cpu::dp_row_sqnorms(x, dz, acc, rows, in, out, bias, accumulate);
    }

    static void dp_clip_factors(float* acc, int64_t rows, float clip, float noise_multiplier,
                                float grad_scale, float divisor, float* std_out, Stream) {
        cpu::dp_clip_factors(acc, rows, clip, noise_multiplier, grad_scale, divisor, std_out);
    }

    static void target_seed(const float* logits, const int32_t* targets, float* out,
                            int64_t rows, int64_t cols, int32_t transform, Stream) {
        cpu::target_seed(logits, targets, out, rows, cols, transform);
    }

    static void ig_interpolate(const float* x, const float* baseline, const float* alphas,
                               const int32_t* targets, float* out, int32_t* targets_out,
                               int64_t images, int64_t cols, int64_t steps, const int64_t* step,
                               int64_t batch, int64_t rows, Stream) {
        cpu::ig_interpolate(x, baseline, alphas, targets, out, targets_out, images, cols, steps,
                            step, batch, rows);
    }

    static void ig_accumulate(const float* grads, const float* x, const float* baseline,
                              const float* weights, float* out, int64_t images, int64_t cols,
                              int64_t steps, const int64_t* step, int64_t batch, int64_t rows,
                              bool multiply, bool absolute, Stream) {
        cpu::ig_accumulate(grads, x, baseline, weights, out, images, cols, steps, step, batch,
                           rows, multiply, absolute);
    }

    static void adv_init(const float* x, float* adv, int64_t rows, int64_t cols, float eps,
                         float lo, float hi, const int64_t* step, uint32_t key0, uint32_t key1,
                         Stream) {
        cpu::adv_init(x, adv, rows, cols, eps, lo, hi, step, key0, key1);
    }

    static void adv_step(const float* x, float* adv, const float* grad, int64_t rows,
                         int64_t cols, float eps, float alpha, float lo, float hi, bool project,
                         Stream) {
        cpu::adv_step(x, adv, grad, rows, cols, eps, alpha, lo, hi, project);
    }

    static void gather(const float* x, const void* y, const int64_t* order, float* x_dst,
                       void* y_dst, const EngineState* st, int64_t rows, int64_t features,
                       int64_t label_bytes, int64_t batch, int64_t source_rows, Stream) {
        const int64_t first = st->step * batch;
        const auto* ysrc = static_cast<const char*>(y);
        auto* ydst = static_cast<char*>(y_dst);
        for (int64_t r = 0; r < rows; ++r) {
            const int64_t src = order ? order[first + r] : first + r;
            FASTMLP_CHECK(src >= 0 && src < source_rows, "engine gather: row " << src
                              << " of a source of " << source_rows << " rows");
        }
        // Shuffled rows come from all over the data set, mostly from memory: two
        // threads wait on twice the cache lines at once.
        cpu::parallel_range(rows, rows * features >= 8192, [&](int64_t r0, int64_t r1) {
            for (int64_t r = r0; r < r1; ++r) {
                const int64_t src = order ? order[first + r] : first + r;
                std::memcpy(x_dst + r * features, x + src * features, features * sizeof(float));
                if (ysrc)
                    std::memcpy(ydst + r * label_bytes, ysrc + src * label_bytes, label_bytes);
            }
        });
    }

    static void optimizer(int64_t kind, float* params, const float* grads, float* s0, float* s1,
                          float* s2, int64_t size, const StepHyper* hyper, EngineState* st,
                          const GradTransform& t, Stream) {
        const StepHyper& h = hyper[st->step];
        bool bad = false;
        if (kind == kSgd)
            bad = cpu::sgd_step_hyper(params, grads, s0, size, h.sgd, t);
        else if (kind == kAdam)
            bad = cpu::adam_step_hyper(params, grads, s0, s1, size, h.adam, t);
        else
            bad = cpu::rmsprop_step_hyper(params, grads, s0, s1, s2, size, h.rmsprop, t);
        if (bad && st->nonfinite_param_step < 0) st->nonfinite_param_step = st->step;
    }

    // engine.h's allreduce: the step's gradients times its rows, summed over the
    // processes with the row counts (the hook: MPI), divided by the total rows.
    static void allreduce(float* grads, int64_t count, int64_t rows, const AllreduceHook& hook,
                          Stream) {
        const float n = static_cast<float>(rows);
        const bool threads = count >= (int64_t{1} << 15);
        cpu::parallel_range(count, threads, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) grads[i] *= n;
        });
        grads[count] = n;
        hook(reinterpret_cast<std::uintptr_t>(grads), count + 1, 0);
        const float total = grads[count];
        if (!(total > 0.0f)) return;  // no rows anywhere: the gradients are zero
        cpu::parallel_range(count, threads, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) grads[i] /= total;
        });
    }

    static void store(const float* src, float* dst, const EngineState* st, int64_t rows,
                      int64_t cols, int64_t batch, Stream) {
        std::memcpy(dst + st->step * batch * cols, src, rows * cols * sizeof(float));
    }

    static void step_end(EngineState* st, const StepScalars* sc, const double* penalty,
                         int64_t segments, bool metrics, int64_t rows, Stream) {
        if (penalty) {
            double p = 0.0;  // the segments in order
            for (int64_t k = 0; k < segments; ++k) p += penalty[k];
            st->penalty_sum += p * static_cast<double>(rows);
        }
        if (sc && metrics)
            for (int i = 0; i < kNumMetricSums; ++i) st->metric[i] += sc->metric[i];
        if (sc) {
            // As fit always did in Python: float32 loss * rows, summed in double.
            st->loss_sum += static_cast<double>(sc->loss) * static_cast<double>(rows);
            st->correct += sc->hits;
            if (!std::isfinite(sc->loss) && st->nonfinite_step < 0) st->nonfinite_step = st->step;
            if (sc->bad_row >= 0 && st->bad_row < 0) st->bad_row = sc->bad_row;
        }
        st->step += 1;
        st->rng_step += 1;
    }
};

class CpuEngine final : public Engine {
public:
    int64_t run(int list, int64_t rows, int64_t batch, int64_t first, int64_t count,
                std::uintptr_t) override {
        FASTMLP_CHECK(list >= 0 && list < kNumLists, "engine: unknown op list " << list);
        FASTMLP_CHECK(batch >= 1 && first >= 0 && count >= 0,
                      "engine: bad batch " << batch << ", first step " << first << " or count "
                                           << count);
        // The last step starts inside the data, or one step is an empty batch at its
        // end (DP-SGD's Poisson sampling draws some: their update is the noise).
        FASTMLP_CHECK(count == 0 || (first + count - 1) * batch < rows ||
                          (count == 1 && first * batch == rows),
                      "engine: steps " << first << ".." << first + count - 1 << " of batch "
                                       << batch << " run past the " << rows << " rows");
        check_run(list, first, count);
        cpu::FlushDenormalScope fp_scope;  // cpu/fpenv.h: the whole pass in one mode
        const std::vector<PlanOp>& ops = ops_[list];
        // step_end is the op that advances the step; its state buffer tells
        // where to look for a non-finite loss.
        const EngineState* st = nullptr;
        for (const PlanOp& op : ops)
            if (op.code == OpCode::step_end) st = static_cast<const EngineState*>(buffer(op.buf[0]));
        FASTMLP_CHECK(st != nullptr, "engine: op list " << list << " has no step_end");
        FASTMLP_CHECK(st->step == first, "engine: the pass is at step " << st->step
                                             << ", asked to run from step " << first);
        // In order (no permutation bound), a batch is rows b*s.. of the source,
        // already contiguous: the CPU reads it in place instead of copying it,
        // by pointing the batch buffers of this call's table into the source
        // (the CUDA engine copies: its graphs hold fixed addresses).
        std::vector<void*> table(bufs_);
        for (int64_t s = first; s < first + count; ++s) {
            const int64_t n = rows - s * batch < batch ? rows - s * batch : batch;
            for (const PlanOp& op : ops) {
                if (op.code == OpCode::gather && (op.buf[2] < 0 || bufs_[op.buf[2]] == nullptr)) {
                    const int64_t row0 = st->step * op.dim[2];
                    FASTMLP_CHECK(row0 + n <= op.dim[3], "engine gather: rows " << row0 << ".."
                                      << row0 + n - 1 << " of a source of " << op.dim[3]);
                    table[op.buf[3]] = static_cast<char*>(bufs_[op.buf[0]]) +
                                       row0 * op.dim[0] * static_cast<int64_t>(sizeof(float));
                    if (op.buf[4] >= 0 && op.buf[1] >= 0 && bufs_[op.buf[1]] != nullptr)
                        table[op.buf[4]] = static_cast<char*>(bufs_[op.buf[1]]) + row0 * op.dim[1];
                    continue;
                }
                run_op<CpuDev>(op, table.data(), n, 0, allreduce_);
            }
            // Training stops after the step whose loss or updated parameters
            // are not finite (fit reports it); an evaluation runs to the end
            // (its loss is NaN).
            if (list == kTrain && (st->nonfinite_step >= 0 || st->nonfinite_param_step >= 0))
                return s - first + 1;
        }
        return count;
    }

    void synchronize() override {}

protected:
    void write(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
    void read(void* dst, const void* src, size_t bytes) override { std::memcpy(dst, src, bytes); }
};

}  // namespace

Engine* new_cpu_engine() { return new CpuEngine(); }

}  // namespace engine
}  // namespace fastmlp
