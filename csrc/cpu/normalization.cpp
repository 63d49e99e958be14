// CPU batch normalisation and layer normalisation, forward and backward side
// by side (semantics in fastmlp.h, the scalar rules in kernel_math.h).
//
// Determinism: every sum runs in an order fixed by the shape alone.
//   BN (a column reduction over the rows): the rows are cut into blocks of
//   kRowBlock; a task sums one block for one strip of kColStrip columns into
//   its own partial (double), and the partials are then added per column in
//   block order. The blocks depend on `rows` only, never on the thread count,
//   so 1 thread and 16 threads add the same numbers in the same order.
//   LN (a row reduction over the columns): a row is summed in kLanes
//   interleaved double accumulators (so the loop vectorises without -ffast-math
//   reassociation) that are combined in a fixed tree; one thread owns a row.
//   LN backward's dgamma / dbeta are column sums again: per block of
//   kLnRowBlock rows, combined in block order as above.
// The partials live in the calling thread's scratch (thread_local, grown once
// and reused): the ops take no workspace argument, and a training step calls
// them with the same shapes every time, so nothing is allocated after the first.
//
// Statistics are one pass over the data (sum and sum of squares of the
// shifted values in double, kernel_math.h: norm_stats); the normalisation is a
// second pass. Threads (cpu/parallel.h) only above kParMin elements.
#include <algorithm>
#include <cmath>
#include <vector>

#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

constexpr int64_t kRowBlock = 512;    // rows per BN partial: the partials are 1/512 of the data
constexpr int64_t kColStrip = 256;    // columns per BN task: 2 x 2 KiB of double sums stay in L1
constexpr int64_t kLnRowBlock = 64;   // rows per LN-backward dgamma/dbeta partial
constexpr int kLanes = 16;            // interleaved accumulators of a row sum (2 AVX-512 vectors)

// The calling thread's scratch: `n` doubles / floats, valid until its next call.
double* scratch_f64(size_t n) {
    thread_local std::vector<double> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}
float* scratch_f32(size_t n) {
    thread_local std::vector<float> buf;
    if (buf.size() < n) buf.resize(n);
    return buf.data();
}

void check_sizes(const char* op, int64_t rows, int64_t cols, float eps) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be >= 0, got rows=" << rows << " cols=" << cols);
    FASTMLP_CHECK(eps > 0.0f, op << ": eps must be > 0, got " << eps);  // NaN fails too
}

int64_t ceil_div(int64_t n, int64_t d) { return n == 0 ? 0 : (n - 1) / d + 1; }

// ---- column reductions (BN) ---------------------------------------------------

// s1(c) = sum_r (x(r,c) - shift(c)), s2(c) = sum_r (x(r,c) - shift(c))^2 over
// rows [r0, r1), columns [c0, c1), rows in order: the inner loop runs along a
// row, one independent accumulator per column, so it vectorises as is.
FASTMLP_SIMD_CLONES
void column_moments(const float* __restrict x, const float* __restrict shift,
                    double* __restrict s1, double* __restrict s2, int64_t r0, int64_t r1,
                    int64_t c0, int64_t c1, int64_t cols) {
    for (int64_t c = c0; c < c1; ++c) s1[c] = s2[c] = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
        const float* __restrict xr = x + r * cols;
        for (int64_t c = c0; c < c1; ++c) {
            // Two floats' difference is exact in double (unless 29+ binades apart).
            const double d = static_cast<double>(xr[c]) - static_cast<double>(shift[c]);
            s1[c] += d;
            s2[c] += d * d;
        }
    }
}

// The BN backward's sums: s1(c) = sum_r dy(r,c), s2(c) = sum_r dy(r,c) * xhat(r,c)
// with xhat = (x - mean) * invstd rounded to float as the forward's.
FASTMLP_SIMD_CLONES
void column_grad_sums(const float* __restrict dy, const float* __restrict x,
                      const float* __restrict mean, const float* __restrict invstd,
                      double* __restrict s1, double* __restrict s2, int64_t r0, int64_t r1,
                      int64_t c0, int64_t c1, int64_t cols) {
    for (int64_t c = c0; c < c1; ++c) s1[c] = s2[c] = 0.0;
    for (int64_t r = r0; r < r1; ++r) {
        const float* __restrict dyr = dy + r * cols;
        const float* __restrict xr = x + r * cols;
        for (int64_t c = c0; c < c1; ++c) {
            const float xhat = (xr[c] - mean[c]) * invstd[c];
            s1[c] += static_cast<double>(dyr[c]);
            s2[c] += static_cast<double>(dyr[c]) * static_cast<double>(xhat);
        }
    }
}

// Per column sums over all rows into part (2 * nrb * cols doubles: block q's
// s1 at part[2q*cols], its s2 at part[(2q+1)*cols]), then added in block order
// into s1 / s2 (cols doubles each). `sums(r0, r1, c0, c1, s1, s2)` fills one
// block's partial for one column strip.
template <class Sums>
void column_reduce(int64_t rows, int64_t cols, double* part, double* s1, double* s2,
                   const Sums& sums) {
    const int64_t nrb = ceil_div(rows, kRowBlock), nstrip = ceil_div(cols, kColStrip);
    const bool par = rows * cols >= kParMin;
    parallel_range(nrb * nstrip, par, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t q = t / nstrip, s = t % nstrip;
            sums(q * kRowBlock, std::min(rows, (q + 1) * kRowBlock), s * kColStrip,
                 std::min(cols, (s + 1) * kColStrip), part + 2 * q * cols,
                 part + (2 * q + 1) * cols);
        }
    });
    parallel_range(nstrip, par && nrb * cols >= kParMin / 4, [&](int64_t g0, int64_t g1) {
        const int64_t c0 = g0 * kColStrip, c1 = std::min(cols, g1 * kColStrip);
        for (int64_t c = c0; c < c1; ++c) s1[c] = s2[c] = 0.0;
        for (int64_t q = 0; q < nrb; ++q) {
            const double* p1 = part + 2 * q * cols;
            const double* p2 = p1 + cols;
            for (int64_t c = c0; c < c1; ++c) {
                s1[c] += p1[c];
                s2[c] += p2[c];
            }
        }
    });
}

// y(r,c) = (x(r,c) - mean(c)) * invstd(c) * gamma(c) + beta(c) for rows [r0, r1),
// in the order of the formula in fastmlp.h (the GPU kernel uses the same).
template <bool kGamma, bool kBeta>
FASTMLP_SIMD_CLONES void bn_normalize_rows(const float* __restrict x, float* __restrict y,
                                           const float* __restrict mean,
                                           const float* __restrict invstd,
                                           const float* __restrict gamma,
                                           const float* __restrict beta, int64_t r0,
                                           int64_t r1, int64_t cols) {
    for (int64_t r = r0; r < r1; ++r) {
        const float* __restrict xr = x + r * cols;
        float* __restrict yr = y + r * cols;
        for (int64_t c = 0; c < cols; ++c) {
            float t = (xr[c] - mean[c]) * invstd[c];
            if (kGamma) t *= gamma[c];
            if (kBeta) t += beta[c];
            yr[c] = t;
        }
    }
}

void bn_normalize(const float* x, float* y, const float* mean, const float* invstd,
                  const float* gamma, const float* beta, int64_t rows, int64_t cols) {
    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        if (gamma && beta) bn_normalize_rows<true, true>(x, y, mean, invstd, gamma, beta, r0, r1, cols);
        else if (gamma) bn_normalize_rows<true, false>(x, y, mean, invstd, gamma, beta, r0, r1, cols);
        else if (beta) bn_normalize_rows<false, true>(x, y, mean, invstd, gamma, beta, r0, r1, cols);
        else bn_normalize_rows<false, false>(x, y, mean, invstd, gamma, beta, r0, r1, cols);
    });
}

// ---- row reductions (LN) ------------------------------------------------------

// Adds the kLanes accumulators in a fixed tree: the same order for every row.
inline double lane_total(double* a) {
    for (int w = kLanes / 2; w > 0; w /= 2)
        for (int j = 0; j < w; ++j) a[j] += a[j + w];
    return a[0];
}

// sum_c (x(c) - shift) and sum_c (x(c) - shift)^2 of one row, in double.
// Element c always goes to accumulator c % kLanes, whatever the row length.
FASTMLP_SIMD_CLONES
void row_moments(const float* __restrict x, int64_t cols, float shift, double* s1, double* s2) {
    double a1[kLanes] = {}, a2[kLanes] = {};
    const double sh = shift;
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes)
        for (int j = 0; j < kLanes; ++j) {
            const double d = static_cast<double>(x[c + j]) - sh;
            a1[j] += d;
            a2[j] += d * d;
        }
    for (int j = 0; c + j < cols; ++j) {
        const double d = static_cast<double>(x[c + j]) - sh;
        a1[j] += d;
        a2[j] += d * d;
    }
    *s1 = lane_total(a1);
    *s2 = lane_total(a2);
}

template <bool kGamma, bool kBeta>
FASTMLP_SIMD_CLONES void ln_normalize_row(const float* __restrict x, float* __restrict y,
                                          float mean, float invstd,
                                          const float* __restrict gamma,
                                          const float* __restrict beta, int64_t cols) {
    for (int64_t c = 0; c < cols; ++c) {
        float t = (x[c] - mean) * invstd;
        if (kGamma) t *= gamma[c];
        if (kBeta) t += beta[c];
        y[c] = t;
    }
}

// One row of the LN backward: g = dy * gamma, xhat = (x - mean) * invstd;
// sg = sum_c g, sgx = sum_c g * xhat (double, lanes as row_moments), then
// dx = invstd / cols * (cols * g - sg - xhat * sgx). With pdb / pdg (this
// row block's dbeta / dgamma partials, double) it also adds dy and dy * xhat.
template <bool kGamma>
FASTMLP_SIMD_CLONES void ln_backward_row(const float* __restrict dy, const float* __restrict x,
                                         const float* __restrict gamma, float mean,
                                         float invstd, float* __restrict dx,
                                         double* __restrict pdb, double* __restrict pdg,
                                         int64_t cols) {
    double a1[kLanes] = {}, a2[kLanes] = {};
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes)
        for (int j = 0; j < kLanes; ++j) {
            const float xhat = (x[c + j] - mean) * invstd;
            const float g = kGamma ? dy[c + j] * gamma[c + j] : dy[c + j];
            a1[j] += static_cast<double>(g);
            a2[j] += static_cast<double>(g) * static_cast<double>(xhat);
        }
    for (int j = 0; c + j < cols; ++j) {
        const float xhat = (x[c + j] - mean) * invstd;
        const float g = kGamma ? dy[c + j] * gamma[c + j] : dy[c + j];
        a1[j] += static_cast<double>(g);
        a2[j] += static_cast<double>(g) * static_cast<double>(xhat);
    }
    const float sg = static_cast<float>(lane_total(a1));
    const float sgx = static_cast<float>(lane_total(a2));
    const float n = static_cast<float>(cols);
    const float k = invstd / n;
    for (c = 0; c < cols; ++c) {
        const float xhat = (x[c] - mean) * invstd;
        const float g = kGamma ? dy[c] * gamma[c] : dy[c];
        dx[c] = k * (n * g - sg - xhat * sgx);
    }
    if (pdb) {
        for (c = 0; c < cols; ++c) {
            const float xhat = (x[c] - mean) * invstd;
            pdb[c] += static_cast<double>(dy[c]);
            pdg[c] += static_cast<double>(dy[c]) * static_cast<double>(xhat);
        }
    }
}

}  // namespace

// ---- BatchNormalization ---------------------------------------------------------

void batchnorm_fwd(const float* x, const float* gamma, const float* beta, float* y,
                   float* save_mean, float* save_invstd, float* moving_mean, float* moving_var,
                   int64_t rows, int64_t cols, float eps, float momentum, bool training) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_sizes("batchnorm_fwd", rows, cols, eps);
    FASTMLP_CHECK(momentum >= 0.0f && momentum <= 1.0f,
                  "batchnorm_fwd: momentum must be in [0, 1], got " << momentum);
    if (cols == 0) return;
    FASTMLP_CHECK(moving_mean && moving_var, "batchnorm_fwd: null moving statistics");
    if (!training) {
        if (rows == 0) return;
        FASTMLP_CHECK(x && y, "batchnorm_fwd: null pointer");
        float* invstd = scratch_f32(static_cast<size_t>(cols));
        for (int64_t c = 0; c < cols; ++c) invstd[c] = 1.0f / sqrtf(moving_var[c] + eps);
        bn_normalize(x, y, moving_mean, invstd, gamma, beta, rows, cols);
        return;
    }
    if (rows == 0) return;  // no batch: the statistics stay as they are
    FASTMLP_CHECK(x && y && save_mean && save_invstd, "batchnorm_fwd: null pointer");
    const int64_t nrb = ceil_div(rows, kRowBlock);
    double* part = scratch_f64(static_cast<size_t>(2 * (nrb + 1) * cols));
    double* s1 = part + 2 * nrb * cols;
    double* s2 = s1 + cols;
    const float* shift = x;  // row 0: every block subtracts the same values, so partials add
    column_reduce(rows, cols, part, s1, s2,
                  [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* p1, double* p2) {
                      column_moments(x, shift, p1, p2, r0, r1, c0, c1, cols);
                  });
    for (int64_t c = 0; c < cols; ++c) {
        const NormStats st = norm_stats(s1[c], s2[c], shift[c], rows, eps);
        save_mean[c] = st.mean;
        save_invstd[c] = st.invstd;
        moving_mean[c] = moving_update(moving_mean[c], st.mean, momentum);
        moving_var[c] = moving_update(moving_var[c], st.var, momentum);
    }
    bn_normalize(x, y, save_mean, save_invstd, gamma, beta, rows, cols);
}

void batchnorm_bwd(const float* dy, const float* x, const float* gamma, const float* save_mean,
                   const float* save_invstd, float* dx, float* dgamma, float* dbeta, int64_t rows,
                   int64_t cols) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_sizes("batchnorm_bwd", rows, cols, 1.0f);
    if (cols == 0) return;
    if (rows == 0) {  // empty sums
        if (dgamma) std::fill(dgamma, dgamma + cols, 0.0f);
        if (dbeta) std::fill(dbeta, dbeta + cols, 0.0f);
        return;
    }
    FASTMLP_CHECK(dy && x && save_mean && save_invstd && dx, "batchnorm_bwd: null pointer");
    const int64_t nrb = ceil_div(rows, kRowBlock);
    double* part = scratch_f64(static_cast<size_t>(2 * (nrb + 1) * cols));
    double* s1 = part + 2 * nrb * cols;
    double* s2 = s1 + cols;
    column_reduce(rows, cols, part, s1, s2,
                  [&](int64_t r0, int64_t r1, int64_t c0, int64_t c1, double* p1, double* p2) {
                      column_grad_sums(dy, x, save_mean, save_invstd, p1, p2, r0, r1, c0, c1,
                                       cols);
                  });
    // Per column: db = dbeta, dg = dgamma (rounded to float, as written out) and
    // k = gamma * invstd / rows, so dx = k * (rows * dy - db - xhat * dg).
    float* coef = scratch_f32(static_cast<size_t>(3 * cols));
    float* db = coef;
    float* dg = coef + cols;
    float* k = coef + 2 * cols;
    const float n = static_cast<float>(rows);
    for (int64_t c = 0; c < cols; ++c) {
        db[c] = static_cast<float>(s1[c]);
        dg[c] = static_cast<float>(s2[c]);
        k[c] = (gamma ? gamma[c] : 1.0f) * save_invstd[c] / n;
    }
    if (dbeta) std::copy(db, db + cols, dbeta);
    if (dgamma) std::copy(dg, dg + cols, dgamma);
    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* __restrict dyr = dy + r * cols;
            const float* __restrict xr = x + r * cols;
            float* __restrict dxr = dx + r * cols;
            for (int64_t c = 0; c < cols; ++c) {
                const float xhat = (xr[c] - save_mean[c]) * save_invstd[c];
                dxr[c] = k[c] * (n * dyr[c] - db[c] - xhat * dg[c]);
            }
        }
    });
}

// ---- LayerNormalization ---------------------------------------------------------

void layernorm_fwd(const float* x, const float* gamma, const float* beta, float* y,
                   float* save_mean, float* save_invstd, int64_t rows, int64_t cols, float eps) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_sizes("layernorm_fwd", rows, cols, eps);
    if (rows == 0 || cols == 0) return;  // cols == 0: no statistics, as BN with no rows
    FASTMLP_CHECK(x && y && save_mean && save_invstd, "layernorm_fwd: null pointer");
    parallel_range(rows, rows * cols >= kParMin, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
            const float* xr = x + r * cols;
            double s1, s2;
            row_moments(xr, cols, xr[0], &s1, &s2);
            const NormStats st = norm_stats(s1, s2, xr[0], cols, eps);
            save_mean[r] = st.mean;
            save_invstd[r] = st.invstd;
            float* yr = y + r * cols;
            if (gamma && beta) ln_normalize_row<true, true>(xr, yr, st.mean, st.invstd, gamma, beta, cols);
            else if (gamma) ln_normalize_row<true, false>(xr, yr, st.mean, st.invstd, gamma, beta, cols);
            else if (beta) ln_normalize_row<false, true>(xr, yr, st.mean, st.invstd, gamma, beta, cols);
            else ln_normalize_row<false, false>(xr, yr, st.mean, st.invstd, gamma, beta, cols);
        }
    });
}

void layernorm_bwd(const float* dy, const float* x, const float* gamma, const float* save_mean,
                   const float* save_invstd, float* dx, float* dgamma, float* dbeta, int64_t rows,
                   int64_t cols) {
    FlushDenormalScope fp_scope;  // cpu/fpenv.h
    check_sizes("layernorm_bwd", rows, cols, 1.0f);
    if (cols == 0) return;
    const bool params = dgamma || dbeta;
    if (rows == 0) {  // empty sums
        if (dgamma) std::fill(dgamma, dgamma + cols, 0.0f);
        if (dbeta) std::fill(dbeta, dbeta + cols, 0.0f);
        return;
    }
    FASTMLP_CHECK(dy && x && save_mean && save_invstd && dx, "layernorm_bwd: null pointer");
    const int64_t nrb = ceil_div(rows, kLnRowBlock);
    double* part = params ? scratch_f64(static_cast<size_t>(2 * nrb * cols)) : nullptr;
    // A task is a block of kLnRowBlock rows: its rows' dx, and its dbeta / dgamma
    // partial (block q's at part[2q*cols] and part[(2q+1)*cols]).
    parallel_range(nrb, rows * cols >= kParMin, [&](int64_t q0, int64_t q1) {
        for (int64_t q = q0; q < q1; ++q) {
            double* pdb = params ? part + 2 * q * cols : nullptr;
            double* pdg = params ? pdb + cols : nullptr;
            if (params) std::fill(pdb, pdb + 2 * cols, 0.0);
            const int64_t r1 = std::min(rows, (q + 1) * kLnRowBlock);
            for (int64_t r = q * kLnRowBlock; r < r1; ++r) {
                if (gamma)
                    ln_backward_row<true>(dy + r * cols, x + r * cols, gamma, save_mean[r],
                                          save_invstd[r], dx + r * cols, pdb, pdg, cols);
                else
                    ln_backward_row<false>(dy + r * cols, x + r * cols, gamma, save_mean[r],
                                           save_invstd[r], dx + r * cols, pdb, pdg, cols);
            }
        }
    });
    if (!params) return;
    // The partials in block order, per strip of columns.
    const int64_t nstrip = ceil_div(cols, kColStrip);
    parallel_range(nstrip, nrb * cols >= kParMin, [&](int64_t g0, int64_t g1) {
        const int64_t c0 = g0 * kColStrip, c1 = std::min(cols, g1 * kColStrip);
        double s1[kColStrip], s2[kColStrip];
        for (int64_t cs = c0; cs < c1; cs += kColStrip) {
            const int64_t w = std::min(kColStrip, c1 - cs);
            for (int64_t j = 0; j < w; ++j) s1[j] = s2[j] = 0.0;
            for (int64_t q = 0; q < nrb; ++q) {
                const double* p1 = part + 2 * q * cols + cs;
                const double* p2 = p1 + cols;
                for (int64_t j = 0; j < w; ++j) {
                    s1[j] += p1[j];
                    s2[j] += p2[j];
                }
            }
            for (int64_t j = 0; j < w; ++j) {
                if (dbeta) dbeta[cs + j] = static_cast<float>(s1[j]);
                if (dgamma) dgamma[cs + j] = static_cast<float>(s2[j]);
            }
        }
    });
}

}  // namespace cpu
}  // namespace fastmlp
