// CPU bias_add / bias_grad / relu / relu_backward, forward and backward side
// by side. Plain loops the compiler vectorises; threads (cpu/parallel.h) only
// above kParMin elements.
#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "cpu/fpenv.h"
#include "check.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {

static void check_sizes(const char* op, int64_t rows, int64_t cols) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be >= 0, got rows=" << rows << " cols=" << cols);
}

void bias_add(const float* x, const float* bias, float* y, int64_t rows, int64_t cols) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_sizes("bias_add", rows, cols);
    if (rows == 0 || cols == 0) return;
    FASTMLP_CHECK(x && bias && y, "bias_add: null pointer");
    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = x + r * cols;
            float* yr = y + r * cols;
            for (int64_t c = 0; c < cols; ++c) yr[c] = xr[c] + bias[c];
        }
    });
}

// Column sums. Each column is summed over rows 0..rows-1 in order by one
// thread, so the result is deterministic. Threads split the columns in
// blocks; a block walks rows top to bottom, reading each row's slice
// contiguously (summing one column at a time would stride through memory).
FASTMLP_SIMD_CLONES
static void column_sums(const float* dy, float* db, int64_t rows, int64_t cols,
                        int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) db[c] = 0.0f;
    for (int64_t r = 0; r < rows; ++r) {
        const float* __restrict dyr = dy + r * cols;
        for (int64_t c = c0; c < c1; ++c) db[c] += dyr[c];
    }
}

void bias_grad(const float* dy, float* db, int64_t rows, int64_t cols) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_sizes("bias_grad", rows, cols);
    if (cols == 0) return;
    FASTMLP_CHECK(db && (rows == 0 || dy), "bias_grad: null pointer");
    constexpr int64_t CB = 256;  // columns per task: 1 KiB of sums, stays in L1
    const int64_t nb = (cols + CB - 1) / CB;
    // Many rows: blocks of kRowBlock rows summed in parallel into partial sums,
    // then the partials added in block order. The blocks depend on rows only,
    // so the result does not depend on the thread count. (A column band per
    // thread alone would leave all but one thread idle for a layer of 128.)
    constexpr int64_t kRowBlock = 2048;
    const int64_t nrb = (rows + kRowBlock - 1) / kRowBlock;
    if (nrb > 1 && rows * cols >= kParMin) {
        std::vector<float> part(static_cast<size_t>(nrb * cols));
        parallel_range(nrb, true, [&](int64_t q0, int64_t q1) {
            for (int64_t q = q0; q < q1; ++q) {
                const int64_t r0 = q * kRowBlock, n = std::min(rows - r0, kRowBlock);
                for (int64_t bi = 0; bi < nb; ++bi)
                    column_sums(dy + r0 * cols, part.data() + q * cols, n, cols, bi * CB,
                                std::min(cols, (bi + 1) * CB));
            }
        });
        column_sums(part.data(), db, nrb, cols, 0, cols);
        return;
    }
    parallel_range(nb, rows * cols >= kParMin && nb > 1, [&](int64_t b0, int64_t b1) {
        for (int64_t bi = b0; bi < b1; ++bi)
            column_sums(dy, db, rows, cols, bi * CB, std::min(cols, (bi + 1) * CB));
    });
}

void relu(const float* x, float* y, int64_t size) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    FASTMLP_CHECK(size >= 0, "relu: size must be >= 0, got " << size);
    if (size == 0) return;
    FASTMLP_CHECK(x && y, "relu: null pointer");
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) y[i] = fastmlp::relu(x[i]);
    });
}

void relu_backward(const float* dy, const float* y, float* dx, int64_t size) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    FASTMLP_CHECK(size >= 0, "relu_backward: size must be >= 0, got " << size);
    if (size == 0) return;
    FASTMLP_CHECK(dy && y && dx, "relu_backward: null pointer");
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) dx[i] = relu_grad(dy[i], y[i]);
    });
}

namespace {

// 1 when x[b..e) holds a NaN or +-Inf: an integer OR over the block (it
// vectorises; no early exit inside a block).
FASTMLP_SIMD_CLONES
uint32_t any_nonfinite(const float* __restrict x, int64_t b, int64_t e) {
    uint32_t bad = 0;
    for (int64_t i = b; i < e; ++i) bad |= nonfinite_bit(x[i]);
    return bad;
}

}  // namespace

void first_nonfinite(const float* x, int64_t size, int64_t* out) {
    FASTMLP_CHECK(size >= 0, "first_nonfinite: size must be >= 0, got " << size);
    FASTMLP_CHECK(out, "first_nonfinite: null out");
    *out = -1;
    if (size == 0) return;
    FASTMLP_CHECK(x, "first_nonfinite: null pointer");
    // Each thread scans its range in blocks; the first bad block is searched
    // element by element. min over threads is order-independent; a thread
    // stops once an earlier index is known. One pass over clean data.
    std::atomic<int64_t> first{std::numeric_limits<int64_t>::max()};
    parallel_range(size, size >= kParMin, [&](int64_t i0, int64_t i1) {
        constexpr int64_t kBlock = 4096;
        for (int64_t b = i0; b < i1; b += kBlock) {
            if (b >= first.load(std::memory_order_relaxed)) return;
            const int64_t e = std::min(i1, b + kBlock);
            if (!any_nonfinite(x, b, e)) continue;
            int64_t i = b;
            while (!nonfinite_bit(x[i])) ++i;
            atomic_min(first, i);  // cpu/parallel.h
            return;
        }
    });
    const int64_t f = first.load();
    *out = f == std::numeric_limits<int64_t>::max() ? -1 : f;
}

}  // namespace cpu
}  // namespace fastmlp
