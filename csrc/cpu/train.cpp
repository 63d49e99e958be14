// train_steps: many optimizer steps of a Dense stack with softmax-cross-
// entropy, in one call from Python (the lean CPU training loop of fit).
//
// It runs exactly the kernels the step-by-step Python path runs (gemm_ex with
// the Dense epilogues, softmax_xent_fwd/bwd, sgd_step/adam_step), in the same
// order on the same data, so both paths give bit-identical weights; it only
// removes the per-op Python work (argument checks, array wrapping, ~10 us per
// op) and gathers the shuffled batch rows here instead of in NumPy.
//
// Per step, for layers 0..L-1 (act_i = layer i's output, a_{-1} = the batch):
//   forward   act_i = relu?(a_{i-1} @ W_i + b_i)             gemm_ex: bias, relu
//   loss      probs = softmax(act_{L-1}); loss, argmax hits   softmax_xent_fwd
//   backward  dz = (probs - onehot) / n   (into probs)         softmax_xent_bwd
//             dz *= (act_{L-1} > 0)        if the last layer has a ReLU
//             dW_i = a_{i-1}^T dz, db_i = colsum(dz)          gemm_ex: colsum_b
//             dz_{i-1} = (dz W_i^T) * (act_{i-1} > 0)          gemm_ex: relu_mask
//   update    every parameter, W_0, b_0, W_1, ...             sgd_step / adam_step
#include <cmath>
#include <cstring>

#include "check.h"
#include "fastmlp.h"

namespace fastmlp {
namespace cpu {
namespace {

// Index of the first maximum of row[0..n) (NumPy's argmax rule; NaN is not
// special-cased: a row of logits with NaN has made the loss NaN already).
int64_t argmax(const float* row, int64_t n) {
    int64_t best = 0;
    for (int64_t c = 1; c < n; ++c)
        if (row[c] > row[best]) best = c;
    return best;
}

}  // namespace

int64_t train_steps(const TrainLayer* layers, int n_layers, const TrainOptim& opt,
                    const TrainBatches& data, float* losses, int64_t* correct) {
    FASTMLP_CHECK(n_layers >= 1, "train_steps: no layers");
    FASTMLP_CHECK(data.batch >= 1 && data.steps >= 0 && data.start >= 0,
                  "train_steps: bad batch " << data.batch << ", steps " << data.steps
                                            << " or start " << data.start);
    FASTMLP_CHECK(data.start + (data.steps > 0 ? (data.steps - 1) * data.batch : 0) < data.rows ||
                      data.steps == 0,
                  "train_steps: the steps run past the " << data.rows << " rows");
    FASTMLP_CHECK(opt.kind == 0 || opt.kind == 1, "train_steps: unknown optimizer kind");
    const TrainLayer& last = layers[n_layers - 1];
    const int64_t classes = last.out, feat = data.features;
    FASTMLP_CHECK(layers[0].in == feat, "train_steps: layer 0 takes " << layers[0].in
                                                                     << " features, x has " << feat);
    for (int i = 1; i < n_layers; ++i)
        FASTMLP_CHECK(layers[i].in == layers[i - 1].out, "train_steps: layer sizes do not chain");
    const size_t label_bytes = data.kind == LabelKind::kInt32   ? 4
                               : data.kind == LabelKind::kInt64 ? 8
                                                                : static_cast<size_t>(classes) * 4;

    for (int64_t s = 0; s < data.steps; ++s) {
        const int64_t lo = data.start + s * data.batch;
        const int64_t n = data.rows - lo < data.batch ? data.rows - lo : data.batch;
        // The batch: rows lo..lo+n of x, or of x[order] (gathered into xbuf).
        const float* xb;
        const void* yb;
        if (data.order == nullptr) {
            xb = data.x + lo * feat;
            yb = static_cast<const char*>(data.labels) + lo * label_bytes;
        } else {
            for (int64_t r = 0; r < n; ++r) {
                const int64_t src = data.order[lo + r];
                std::memcpy(data.xbuf + r * feat, data.x + src * feat, feat * sizeof(float));
                std::memcpy(static_cast<char*>(data.ybuf) + r * label_bytes,
                            static_cast<const char*>(data.labels) + src * label_bytes, label_bytes);
            }
            xb = data.xbuf;
            yb = data.ybuf;
        }

        // forward
        const float* a = xb;
        for (int i = 0; i < n_layers; ++i) {
            const TrainLayer& L = layers[i];
            GemmEpilogue ep;
            ep.bias = L.b;
            ep.relu = L.relu;
            gemm_ex(false, false, n, L.out, L.in, 1.0f, a, L.in, L.w, L.out, 0.0f, L.act, L.out,
                    ep, Precision::kFp32);
            a = L.act;
        }
        softmax_xent_fwd(last.act, yb, data.kind, data.probs, data.row_loss, data.loss,
                         data.bad_row, n, classes);
        losses[s] = *data.loss;
        int64_t hits = 0;
        for (int64_t r = 0; r < n; ++r) {
            int64_t truth;
            if (data.kind == LabelKind::kOneHot)
                truth = argmax(static_cast<const float*>(yb) + r * classes, classes);
            else if (data.kind == LabelKind::kInt32)
                truth = static_cast<const int32_t*>(yb)[r];
            else
                truth = static_cast<const int64_t*>(yb)[r];
            hits += argmax(last.act + r * classes, classes) == truth;
        }
        correct[s] = hits;

        // backward
        float* dz = data.probs;
        softmax_xent_bwd(data.probs, yb, data.kind, dz, data.bad_row, n, classes);
        if (last.relu) relu_backward(dz, last.act, dz, n * classes);
        for (int i = n_layers - 1; i >= 0; --i) {
            const TrainLayer& L = layers[i];
            const float* a_prev = i == 0 ? xb : layers[i - 1].act;
            GemmEpilogue epw;
            epw.colsum_b = L.gb;
            gemm_ex(true, false, L.in, L.out, n, 1.0f, a_prev, L.in, dz, L.out, 0.0f, L.gw, L.out,
                    epw, Precision::kFp32);
            if (i > 0) {
                const TrainLayer& P = layers[i - 1];
                GemmEpilogue epx;
                if (P.relu) {
                    epx.relu_mask = P.act;
                    epx.ld_mask = P.out;
                }
                gemm_ex(false, true, n, L.in, L.out, 1.0f, dz, L.out, L.w, L.out, 0.0f, P.dact,
                        L.in, epx, Precision::kFp32);
                dz = P.dact;
            }
        }

        // update: W_i then b_i, as Optimizer.step walks Sequential.params()
        const int64_t step = opt.step0 + s;
        for (int i = 0; i < n_layers; ++i) {
            const TrainLayer& L = layers[i];
            const int64_t sizes[2] = {L.in * L.out, L.out};
            float* params[2] = {L.w, L.b};
            const float* grads[2] = {L.gw, L.gb};
            for (int j = 0; j < 2; ++j) {
                if (params[j] == nullptr) continue;
                if (opt.kind == 0)
                    sgd_step(params[j], grads[j], L.state[j], sizes[j], static_cast<float>(opt.lr),
                             static_cast<float>(opt.momentum), opt.nesterov,
                             static_cast<float>(opt.weight_decay));
                else
                    adam_step(params[j], grads[j], L.state[2 * j], L.state[2 * j + 1], sizes[j],
                              opt.lr, opt.beta1, opt.beta2, opt.eps, opt.weight_decay,
                              opt.decoupled, step);
            }
        }
        if (!std::isfinite(losses[s])) return s + 1;  // fit reports it and stops
    }
    return data.steps;
}

}  // namespace cpu
}  // namespace fastmlp
