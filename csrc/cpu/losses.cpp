// CPU loss_fused (issue 16): every LossKind's loss and gradient in one pass.
//
// The per-row math is loss_math.h's loss_row, run here with one thread per
// row (CpuLanes: every column, partial sums are the row sums). Rows are split
// over the pool; each row's loss lands in row_loss, and the caller's thread
// then sums row_loss in row order in double, so the result does not depend
// on the thread count.
#include <atomic>
#include <cstdint>
#include <limits>

#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "loss_math.h"

namespace fastmlp {
namespace cpu {
namespace {

// loss_row's column policy on the CPU: one thread owns the whole row.
struct CpuLanes {
    int64_t first() const { return 0; }
    int64_t step() const { return 1; }
    float sum(float v) const { return v; }
    float max(float v) const { return v; }
};

}  // namespace

void loss_fused(const float* pred, const void* labels, LabelKind label_kind,
                const float* sample_weight, float* dpred, float* row_loss, float* loss,
                int64_t* bad_row, int64_t rows, int64_t cols, const LossSpec& spec) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_loss_args(pred, labels, label_kind, dpred, row_loss, loss, bad_row, rows, cols, spec);

    const LossConsts k = loss_consts(spec, cols);
    std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
    with_loss(spec.kind, label_kind, [&](auto kind_tag, auto label_tag) {
        constexpr int KIND = decltype(kind_tag)::value;
        constexpr LabelKind LK = decltype(label_tag)::value;
        auto rows_fn = [&](auto backward_tag) {
            constexpr bool BACKWARD = decltype(backward_tag)::value;
            parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
                for (int64_t r = r0; r < r1; ++r) {
                    const float* y = LK == LabelKind::kOneHot
                                         ? static_cast<const float*>(labels) + r * cols
                                         : nullptr;
                    bool bad = false;
                    const float scale = loss_row_scale(sample_weight, r, rows);
                    const float l = loss_row<KIND, LK, BACKWARD>(
                        pred + r * cols, y, labels, r, cols, k, scale,
                        BACKWARD ? dpred + r * cols : nullptr, bad, CpuLanes{});
                    const float w = sample_weight ? sample_weight[r] : 1.0f;
                    row_loss[r] = w * l;
                    if (bad) atomic_min(first_bad, r);
                }
            });
        };
        if (dpred) rows_fn(std::true_type{});
        else rows_fn(std::false_type{});
    });
    // The batch mean in row order, in double (rows can be millions).
    double total = 0.0;
    for (int64_t r = 0; r < rows; ++r) total += row_loss[r];
    *loss = rows > 0 ? static_cast<float>(total / static_cast<double>(rows)) : 0.0f;
    const int64_t fb = first_bad.load();
    *bad_row = fb == std::numeric_limits<int64_t>::max() ? -1 : fb;
}

}  // namespace cpu
}  // namespace fastmlp
