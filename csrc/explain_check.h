// The argument checks of the interpretability kernels (issue 18: target_seed,
// ig_interpolate, ig_accumulate), shared by cpu/explain.cpp and cuda/explain.cu
// so that both backends accept and refuse the same calls. Only what the host
// can see: sizes, null pointers, overlaps. *step lives in device memory on CUDA:
// the kernels bound it themselves (kernel_math.h ig_first).
#pragma once

#include <cstdint>

#include "check.h"
#include "fastmlp.h"

namespace fastmlp {

inline uint64_t explain_size(int64_t a, int64_t b) {
    return static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
}

inline void check_target_seed_args(const float* logits, const int32_t* targets, const float* out,
                                   int64_t rows, int64_t cols, int32_t transform) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  "target_seed: sizes must be >= 0, got rows=" << rows << ", cols=" << cols);
    FASTMLP_CHECK(transform >= static_cast<int32_t>(OutputTransform::kNone) &&
                      transform <= static_cast<int32_t>(OutputTransform::kSoftmax),
                  "target_seed: transform must be 0 (none), 1 (sigmoid) or 2 (softmax), got "
                      << transform);
    FASTMLP_CHECK(rows == 0 || cols == 0 || (logits && targets && out),
                  "target_seed: logits, targets or out is null");
    FASTMLP_CHECK(!floats_overlap(out, explain_size(rows, cols), logits, explain_size(rows, cols)),
                  "target_seed: out overlaps logits");
}

inline void check_ig_interpolate_args(const float* x, const float* baseline, const float* alphas,
                                      const int32_t* targets, const float* out,
                                      const int32_t* targets_out, int64_t images, int64_t cols,
                                      int64_t steps, const int64_t* step, int64_t batch,
                                      int64_t rows) {
    FASTMLP_CHECK(images >= 0 && cols >= 0 && batch >= 0 && rows >= 0,
                  "ig_interpolate: sizes must be >= 0, got images=" << images << ", cols=" << cols
                      << ", batch=" << batch << ", rows=" << rows);
    FASTMLP_CHECK(steps >= 1, "ig_interpolate: steps must be >= 1, got " << steps);
    if (rows == 0) return;
    FASTMLP_CHECK(step && alphas, "ig_interpolate: step or alphas is null");
    FASTMLP_CHECK(cols == 0 || images == 0 || (x && out), "ig_interpolate: x or out is null");
    FASTMLP_CHECK(!targets || targets_out,
                  "ig_interpolate: targets given but targets_out is null");
    const uint64_t n_out = explain_size(rows, cols), n_x = explain_size(images, cols);
    FASTMLP_CHECK(!floats_overlap(out, n_out, x, n_x) && !floats_overlap(out, n_out, baseline, n_x) &&
                      !floats_overlap(out, n_out, alphas, static_cast<uint64_t>(steps)),
                  "ig_interpolate: out overlaps x, baseline or alphas");
    if (targets) {
        FASTMLP_CHECK(!floats_overlap(targets_out, static_cast<uint64_t>(rows), targets,
                                      static_cast<uint64_t>(images)) &&
                          !floats_overlap(targets_out, static_cast<uint64_t>(rows), out, n_out),
                      "ig_interpolate: targets_out overlaps targets or out");
    }
}

inline void check_ig_accumulate_args(const float* grads, const float* x, const float* baseline,
                                     const float* weights, const float* out, int64_t images,
                                     int64_t cols, int64_t steps, const int64_t* step,
                                     int64_t batch, int64_t rows, bool multiply) {
    FASTMLP_CHECK(images >= 0 && cols >= 0 && batch >= 0 && rows >= 0,
                  "ig_accumulate: sizes must be >= 0, got images=" << images << ", cols=" << cols
                      << ", batch=" << batch << ", rows=" << rows);
    FASTMLP_CHECK(steps >= 1, "ig_accumulate: steps must be >= 1, got " << steps);
    FASTMLP_CHECK(batch % steps == 0 && rows % steps == 0,
                  "ig_accumulate: batch (" << batch << ") and rows (" << rows
                      << ") must be multiples of steps (" << steps << ")");
    if (rows == 0 || cols == 0) return;
    FASTMLP_CHECK(step && weights && grads && out && (x || !multiply),
                  "ig_accumulate: step, weights, grads, x or out is null");
    const uint64_t n_out = explain_size(images, cols);
    FASTMLP_CHECK(!floats_overlap(out, n_out, grads, explain_size(rows, cols)) &&
                      !floats_overlap(out, n_out, x, n_out) &&
                      !floats_overlap(out, n_out, baseline, n_out) &&
                      !floats_overlap(out, n_out, weights, static_cast<uint64_t>(steps)),
                  "ig_accumulate: out overlaps grads, x, baseline or weights");
}

}  // namespace fastmlp
