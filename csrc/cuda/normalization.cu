// Batch normalisation and layer normalisation on the GPU, forward and backward
// (semantics in fastmlp.h; the scalar rules, norm_stats and moving_update, in
// kernel_math.h, shared with the CPU).
//
// Column reductions (BN's statistics and gradients, LN's dgamma / dbeta):
// one block owns a strip of kStripCols = 32 columns -- a warp reads 32
// consecutive floats of a row, one 128-byte transaction -- and its kStripRows
// rows of threads stride over the rows, each thread summing its column in
// double in row order. The kStripRows partials of a column are then added in
// row-phase order by one thread. So a column's sum is always the same
// sequence of operations: no workspace, no second kernel, no floating-point
// atomics, and results repeat bit for bit. The block then goes over its strip
// again to write y (or dx), with the statistics it just computed in shared
// memory; BN's moving statistics are updated by the same thread that
// finalises a column, in the same kernel.
//
// Row reductions (LN's statistics and its dx sums): one warp per row, lanes
// striding over the columns (coalesced), a fixed xor-butterfly of shuffles in
// double.
//
// The sums are of shifted values (x - the first value of the column / row) in
// double, as on the CPU (kernel_math.h: norm_stats): the same accuracy on both
// backends, though not the same bits (the summation orders differ).
#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "check.h"
#include "fastmlp.h"
#include "kernel_math.h"
#include "launch.h"
#include "warp.h"

namespace fastmlp {
namespace cuda {
namespace {

using detail::kWarpSize;

constexpr int kStripCols = 32;   // columns per block: one warp-wide, coalesced row segment
constexpr int kStripRows = 16;   // rows in flight per block (threads = 32 x 16 = 512)
constexpr int kStripThreads = kStripCols * kStripRows;
static_assert(kStripCols == kWarpSize, "a warp must cover one row segment of the strip");

constexpr int kRowThreads = 256;                       // LN: 8 warps, one row each
static_assert(kRowThreads % kWarpSize == 0, "one row per warp needs whole warps");
constexpr int kElemThreads = 256;                      // BN inference: elementwise


// The per-column sums of a strip block: thread (tx, ty) holds its partials
// a, b; returns in threads ty == 0 the sums over ty = 0..kStripRows-1 in that
// order. Every thread of the block must call it (it has barriers).
__device__ __forceinline__ void strip_reduce(double& a, double& b) {
    __shared__ double pa[kStripRows][kStripCols];
    __shared__ double pb[kStripRows][kStripCols];
    const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
    pa[ty][tx] = a;
    pb[ty][tx] = b;
    __syncthreads();  // all partials are in shared memory before row 0 adds them
    if (ty == 0) {
        double sa = 0.0, sb = 0.0;
#pragma unroll
        for (int j = 0; j < kStripRows; ++j) {
            sa += pa[j][tx];
            sb += pb[j][tx];
        }
        a = sa;
        b = sb;
    }
    __syncthreads();  // reads done before a later strip of this block overwrites pa / pb
}

// ---- BatchNormalization -----------------------------------------------------

// Training: per column the batch statistics (shifted double sums), save_*,
// the moving statistics, then y. rows > 0.
__global__ void __launch_bounds__(kStripThreads)
batchnorm_fwd_train_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* __restrict__ y,
                        float* __restrict__ save_mean, float* __restrict__ save_invstd,
                        float* __restrict__ moving_mean, float* __restrict__ moving_var,
                        int64_t rows, int64_t cols, float eps, float momentum) {
    __shared__ float s_mean[kStripCols], s_invstd[kStripCols];
    const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
    const int64_t strips = detail::ceil_div(cols, kStripCols);
    // The strip is the same for the whole block: every thread reaches every barrier.
    for (int64_t strip = blockIdx.x; strip < strips; strip += gridDim.x) {
        const int64_t col = strip * kStripCols + tx;
        const bool live = col < cols;
        const float shift = live ? x[col] : 0.0f;  // row 0: the same for every partial
        double s1 = 0.0, s2 = 0.0;
        if (live) {
#pragma unroll 4
            for (int64_t r = ty; r < rows; r += kStripRows) {
                const double d = static_cast<double>(x[r * cols + col]) - static_cast<double>(shift);
                s1 += d;
                s2 += d * d;
            }
        }
        strip_reduce(s1, s2);
        if (ty == 0 && live) {
            const NormStats st = norm_stats(s1, s2, shift, rows, eps);
            save_mean[col] = st.mean;
            save_invstd[col] = st.invstd;
            moving_mean[col] = moving_update(moving_mean[col], st.mean, momentum);
            moving_var[col] = moving_update(moving_var[col], st.var, momentum);
            s_mean[tx] = st.mean;
            s_invstd[tx] = st.invstd;
        }
        __syncthreads();  // the strip's statistics are in shared memory
        if (live) {
            const float mean = s_mean[tx], invstd = s_invstd[tx];
            const float g = gamma ? gamma[col] : 1.0f;
            const float b = beta ? beta[col] : 0.0f;
#pragma unroll 4
            for (int64_t r = ty; r < rows; r += kStripRows) {
                const int64_t i = r * cols + col;
                y[i] = (x[i] - mean) * invstd * g + b;
            }
        }
        __syncthreads();  // s_mean / s_invstd read before the next strip writes them
    }
}

// Inference: elementwise with the moving statistics (invstd recomputed per
// element: one sqrt and one division, hidden behind the memory traffic).
__global__ void __launch_bounds__(kElemThreads)
batchnorm_fwd_infer_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                        const float* __restrict__ beta, float* __restrict__ y,
                        const float* __restrict__ moving_mean,
                        const float* __restrict__ moving_var, int64_t rows, int64_t cols,
                        float eps) {
    const int64_t size = rows * cols;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride) {
        const int64_t c = i % cols;
        const float invstd = 1.0f / sqrtf(moving_var[c] + eps);
        const float g = gamma ? gamma[c] : 1.0f;
        const float b = beta ? beta[c] : 0.0f;
        y[i] = (x[i] - moving_mean[c]) * invstd * g + b;
    }
}

// dbeta = sum_r dy, dgamma = sum_r dy * xhat per column (double), then
// dx = k * (rows * dy - dbeta - xhat * dgamma), k = gamma * invstd / rows. rows > 0.
__global__ void __launch_bounds__(kStripThreads)
batchnorm_bwd_f32(const float* __restrict__ dy, const float* __restrict__ x,
                  const float* __restrict__ gamma, const float* __restrict__ save_mean,
                  const float* __restrict__ save_invstd, float* __restrict__ dx,
                  float* __restrict__ dgamma, float* __restrict__ dbeta, int64_t rows,
                  int64_t cols) {
    __shared__ float s_db[kStripCols], s_dg[kStripCols], s_k[kStripCols];
    const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
    const int64_t strips = detail::ceil_div(cols, kStripCols);
    const float n = static_cast<float>(rows);
    for (int64_t strip = blockIdx.x; strip < strips; strip += gridDim.x) {
        const int64_t col = strip * kStripCols + tx;
        const bool live = col < cols;
        const float mean = live ? save_mean[col] : 0.0f;
        const float invstd = live ? save_invstd[col] : 0.0f;
        double s1 = 0.0, s2 = 0.0;
        if (live) {
#pragma unroll 4
            for (int64_t r = ty; r < rows; r += kStripRows) {
                const int64_t i = r * cols + col;
                const float xhat = (x[i] - mean) * invstd;
                s1 += static_cast<double>(dy[i]);
                s2 += static_cast<double>(dy[i]) * static_cast<double>(xhat);
            }
        }
        strip_reduce(s1, s2);
        if (ty == 0 && live) {
            const float db = static_cast<float>(s1), dg = static_cast<float>(s2);
            if (dbeta) dbeta[col] = db;
            if (dgamma) dgamma[col] = dg;
            s_db[tx] = db;
            s_dg[tx] = dg;
            s_k[tx] = (gamma ? gamma[col] : 1.0f) * invstd / n;
        }
        __syncthreads();  // the strip's sums are in shared memory
        if (live) {
            const float db = s_db[tx], dg = s_dg[tx], k = s_k[tx];
#pragma unroll 4
            for (int64_t r = ty; r < rows; r += kStripRows) {
                const int64_t i = r * cols + col;
                const float xhat = (x[i] - mean) * invstd;
                dx[i] = k * (n * dy[i] - db - xhat * dg);
            }
        }
        __syncthreads();  // shared sums read before the next strip writes them
    }
}

// ---- LayerNormalization -----------------------------------------------------

// One warp per row: statistics (shifted double sums), save_*, then y. cols > 0.
__global__ void __launch_bounds__(kRowThreads)
layernorm_fwd_f32(const float* __restrict__ x, const float* __restrict__ gamma,
                  const float* __restrict__ beta, float* __restrict__ y,
                  float* __restrict__ save_mean, float* __restrict__ save_invstd, int64_t rows,
                  int64_t cols, float eps) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    // r is warp-uniform: all 32 lanes run the loop, and so every shuffle, together.
    for (int64_t r = global_warp(); r < rows; r += grid_warps()) {
        const float* xr = x + r * cols;
        float* yr = y + r * cols;
        const float shift = xr[0];
        double s1 = 0.0, s2 = 0.0;
        for (int64_t c = lane; c < cols; c += kWarpSize) {
            const double d = static_cast<double>(xr[c]) - static_cast<double>(shift);
            s1 += d;
            s2 += d * d;
        }
        s1 = warp_sum(s1);
        s2 = warp_sum(s2);
        const NormStats st = norm_stats(s1, s2, shift, cols, eps);
        if (lane == 0) {
            save_mean[r] = st.mean;
            save_invstd[r] = st.invstd;
        }
        for (int64_t c = lane; c < cols; c += kWarpSize) {
            const float g = gamma ? gamma[c] : 1.0f;
            const float b = beta ? beta[c] : 0.0f;
            yr[c] = (xr[c] - st.mean) * st.invstd * g + b;
        }
    }
}

// One warp per row: g = dy * gamma, xhat = (x - mean) * invstd; the row sums
// of g and g * xhat (double), then dx = invstd / cols * (cols * g - sg - xhat * sgx).
__global__ void __launch_bounds__(kRowThreads)
layernorm_bwd_dx_f32(const float* __restrict__ dy, const float* __restrict__ x,
                     const float* __restrict__ gamma, const float* __restrict__ save_mean,
                     const float* __restrict__ save_invstd, float* __restrict__ dx,
                     int64_t rows, int64_t cols) {
    const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
    const float n = static_cast<float>(cols);
    for (int64_t r = global_warp(); r < rows; r += grid_warps()) {
        const float* dyr = dy + r * cols;
        const float* xr = x + r * cols;
        float* dxr = dx + r * cols;
        const float mean = save_mean[r], invstd = save_invstd[r];
        double a1 = 0.0, a2 = 0.0;
        for (int64_t c = lane; c < cols; c += kWarpSize) {
            const float xhat = (xr[c] - mean) * invstd;
            const float g = gamma ? dyr[c] * gamma[c] : dyr[c];
            a1 += static_cast<double>(g);
            a2 += static_cast<double>(g) * static_cast<double>(xhat);
        }
        const float sg = static_cast<float>(warp_sum(a1));
        const float sgx = static_cast<float>(warp_sum(a2));
        const float k = invstd / n;
        for (int64_t c = lane; c < cols; c += kWarpSize) {
            const float xhat = (xr[c] - mean) * invstd;
            const float g = gamma ? dyr[c] * gamma[c] : dyr[c];
            dxr[c] = k * (n * g - sg - xhat * sgx);
        }
    }
}

// dbeta(c) = sum_r dy, dgamma(c) = sum_r dy * xhat with the row statistics:
// the column-strip reduction of the BN kernels. Either output may be null. rows > 0.
__global__ void __launch_bounds__(kStripThreads)
layernorm_bwd_params_f32(const float* __restrict__ dy, const float* __restrict__ x,
                         const float* __restrict__ save_mean,
                         const float* __restrict__ save_invstd, float* __restrict__ dgamma,
                         float* __restrict__ dbeta, int64_t rows, int64_t cols) {
    const int tx = static_cast<int>(threadIdx.x), ty = static_cast<int>(threadIdx.y);
    const int64_t strips = detail::ceil_div(cols, kStripCols);
    for (int64_t strip = blockIdx.x; strip < strips; strip += gridDim.x) {
        const int64_t col = strip * kStripCols + tx;
        const bool live = col < cols;
        double s1 = 0.0, s2 = 0.0;
        if (live) {
#pragma unroll 4
            for (int64_t r = ty; r < rows; r += kStripRows) {
                const int64_t i = r * cols + col;
                const float xhat = (x[i] - save_mean[r]) * save_invstd[r];
                s1 += static_cast<double>(dy[i]);
                s2 += static_cast<double>(dy[i]) * static_cast<double>(xhat);
            }
        }
        strip_reduce(s1, s2);
        if (ty == 0 && live) {
            if (dbeta) dbeta[col] = static_cast<float>(s1);
            if (dgamma) dgamma[col] = static_cast<float>(s2);
        }
    }
}

void check_sizes(const char* op, int64_t rows, int64_t cols, float eps) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  op << ": sizes must be non-negative, got rows=" << rows << " cols=" << cols);
    FASTMLP_CHECK(cols == 0 || rows <= std::numeric_limits<int64_t>::max() / cols,
                  op << ": rows*cols overflows int64");
    FASTMLP_CHECK(eps > 0.0f, op << ": eps must be > 0, got " << eps);  // NaN fails too
}

// One block per strip (more would split a column's sum across blocks, which
// needs a second pass); the grid-stride loop covers any excess.
unsigned int strip_blocks(int64_t cols) {
    return detail::grid_stride_blocks(cols, kStripCols, std::numeric_limits<int32_t>::max());
}

unsigned int row_blocks(int64_t rows) {
    return detail::grid_stride_blocks(rows, kRowThreads / kWarpSize);
}

void zero_if(float* p, int64_t n, cudaStream_t stream) {
    if (p) CUDA_CHECK(cudaMemsetAsync(p, 0, static_cast<size_t>(n) * sizeof(float), stream));
}

}  // namespace

void batchnorm_fwd(const float* x, const float* gamma, const float* beta, float* y,
                   float* save_mean, float* save_invstd, float* moving_mean, float* moving_var,
                   int64_t rows, int64_t cols, float eps, float momentum, bool training,
                   cudaStream_t stream) {
    check_sizes("batchnorm_fwd", rows, cols, eps);
    FASTMLP_CHECK(momentum >= 0.0f && momentum <= 1.0f,
                  "batchnorm_fwd: momentum must be in [0, 1], got " << momentum);
    if (rows == 0 || cols == 0) return;  // training with no rows: statistics untouched
    FASTMLP_CHECK(x && y && moving_mean && moving_var, "batchnorm_fwd: null pointer");
    if (!training) {
        batchnorm_fwd_infer_f32<<<detail::grid_stride_blocks(rows * cols, kElemThreads),
                                  kElemThreads, 0, stream>>>(x, gamma, beta, y, moving_mean,
                                                             moving_var, rows, cols, eps);
        detail::check_launch();
        return;
    }
    FASTMLP_CHECK(save_mean && save_invstd, "batchnorm_fwd: null save_mean / save_invstd");
    batchnorm_fwd_train_f32<<<strip_blocks(cols), dim3(kStripCols, kStripRows), 0, stream>>>(
        x, gamma, beta, y, save_mean, save_invstd, moving_mean, moving_var, rows, cols, eps,
        momentum);
    detail::check_launch();
}

void batchnorm_bwd(const float* dy, const float* x, const float* gamma, const float* save_mean,
                   const float* save_invstd, float* dx, float* dgamma, float* dbeta, int64_t rows,
                   int64_t cols, cudaStream_t stream) {
    check_sizes("batchnorm_bwd", rows, cols, 1.0f);
    if (cols == 0) return;
    if (rows == 0) {  // empty sums
        zero_if(dgamma, cols, stream);
        zero_if(dbeta, cols, stream);
        return;
    }
    FASTMLP_CHECK(dy && x && save_mean && save_invstd && dx, "batchnorm_bwd: null pointer");
    batchnorm_bwd_f32<<<strip_blocks(cols), dim3(kStripCols, kStripRows), 0, stream>>>(
        dy, x, gamma, save_mean, save_invstd, dx, dgamma, dbeta, rows, cols);
    detail::check_launch();
}

void layernorm_fwd(const float* x, const float* gamma, const float* beta, float* y,
                   float* save_mean, float* save_invstd, int64_t rows, int64_t cols, float eps,
                   cudaStream_t stream) {
    check_sizes("layernorm_fwd", rows, cols, eps);
    if (rows == 0 || cols == 0) return;  // cols == 0: no statistics, as BN with no rows
    FASTMLP_CHECK(x && y && save_mean && save_invstd, "layernorm_fwd: null pointer");
    layernorm_fwd_f32<<<row_blocks(rows), kRowThreads, 0, stream>>>(x, gamma, beta, y, save_mean,
                                                                     save_invstd, rows, cols, eps);
    detail::check_launch();
}

void layernorm_bwd(const float* dy, const float* x, const float* gamma, const float* save_mean,
                   const float* save_invstd, float* dx, float* dgamma, float* dbeta, int64_t rows,
                   int64_t cols, cudaStream_t stream) {
    check_sizes("layernorm_bwd", rows, cols, 1.0f);
    if (cols == 0) return;
    if (rows == 0) {  // empty sums
        zero_if(dgamma, cols, stream);
        zero_if(dbeta, cols, stream);
        return;
    }
    FASTMLP_CHECK(dy && x && save_mean && save_invstd && dx, "layernorm_bwd: null pointer");
    layernorm_bwd_dx_f32<<<row_blocks(rows), kRowThreads, 0, stream>>>(dy, x, gamma, save_mean,
                                                                       save_invstd, dx, rows, cols);
    detail::check_launch();
    if (dgamma || dbeta) {
        layernorm_bwd_params_f32<<<strip_blocks(cols), dim3(kStripCols, kStripRows), 0, stream>>>(
            dy, x, save_mean, save_invstd, dgamma, dbeta, rows, cols);
        detail::check_launch();
    }
}

}  // namespace cuda
}  // namespace fastmlp
