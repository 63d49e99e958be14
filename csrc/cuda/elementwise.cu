// Elementwise kernels of a Dense layer and its activation, and the bias
// gradient (column sums). float32, row-major.
//
// The elementwise kernels are grid-stride loops over the flat array with a
// capped grid (launch.h) and 64-bit indices. Where output and input may alias
// (y = x, dx = dy) each element is read and then written by the same thread,
// so aliasing is safe; those pointers are therefore not __restrict__.

#include <cuda_runtime.h>

#include <cstdint>
#include <limits>

#include "check.h"
#include "cuda/row_scale.h"
#include "fastmlp.h"
#include "launch.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cuda {
namespace {

constexpr int kBlock = 256;

// y(r, c) = x(r, c) + bias(c). The column is idx % cols; a 64-bit modulo costs
// tens of instructions, so the launcher picks 32-bit indices whenever the
// whole loop (size + one stride) fits them. bias must not overlap y.
template <typename Index>
__global__ void __launch_bounds__(kBlock)
bias_add_f32(const float* x, const float* __restrict__ bias, float* y, Index size, Index cols) {
    const Index stride = static_cast<Index>(gridDim.x) * blockDim.x;
    for (Index i = static_cast<Index>(blockIdx.x) * blockDim.x + threadIdx.x; i < size; i += stride)
        y[i] = x[i] + bias[i % cols];
}

__global__ void __launch_bounds__(kBlock)
relu_f32(const float* x, float* y, int64_t size) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride)
        y[i] = fastmlp::relu(x[i]);
}

__global__ void __launch_bounds__(kBlock)
relu_backward_f32(const float* dy, const float* y, float* dx, int64_t size) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride)
        dx[i] = fastmlp::relu_grad(dy[i], y[i]);
}

// *out = min(*out, the first i with x[i] NaN or +-Inf): each thread's first
// bad element is its smallest (its indices increase), so one atomicMin per
// thread that found one; *out starts at all ones (-1 as int64). The min is
// order-independent: deterministic.
__global__ void __launch_bounds__(kBlock)
first_nonfinite_f32(const float* __restrict__ x, int64_t size, unsigned long long* out) {
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < size;
         i += stride) {
        if (nonfinite_bit(x[i])) {
            atomicMin(out, static_cast<unsigned long long>(i));
            return;
        }
    }
}

// db(c) = sum_r dy(r, c), deterministic without atomics: one block owns a
// 32-column tile and sums it completely, in a fixed order.
//
// Block = 32 x 32 threads. threadIdx.x is the column, so each warp reads 32
// consecutive floats of one row (one 128-byte line). Thread (x, y) sums rows
// y, y + 32, y + 64, ... in increasing order into one partial. The 32 x 32
// partials then go through shared memory transposed: warp w (threadIdx.y = w)
// reads the 32 partials of column w, one per lane, and reduces them with a
// fixed xor-butterfly of warp shuffles. The +1 padding ([32][33]) makes both
// the row-wise writes and the column-wise reads hit 32 different banks.
//
// Threads whose column is past the end still run every loop, __syncthreads()
// and shuffle (with partial 0), so barriers and full-mask shuffles are never
// divergent; they only skip the global reads and the final write. With
// rows == 0 every partial is 0 and db is written with zeros.
constexpr int kTile = detail::kWarpSize;   // columns per block = rows of partials
static_assert(kTile == 32, "the transpose stage maps one column of partials to one warp");

//
// kScale [issue 17]: db(c) = sum_r row_scaled(dy(r, c), scale[r]) (kernel_math.h:
// each product rounded, as the CPU's colsum_row_scaled), the column sums of a
// row-scaled B for gemm_ex's row_scale_k; the same order, so scale = 1 gives
// the unscaled sums bit for bit.
template <bool kScale>
__global__ void __launch_bounds__(kTile * kTile)
bias_grad_colsum_f32(const float* __restrict__ dy, float* __restrict__ db, int64_t rows,
                     int64_t cols, const float* __restrict__ scale) {
    __shared__ float partial[kTile][kTile + 1];
    const int tx = static_cast<int>(threadIdx.x);
    const int ty = static_cast<int>(threadIdx.y);
    const int64_t num_tiles = detail::ceil_div(cols, kTile);

    // The tile index is the same for the whole block, so every thread runs
    // the same number of iterations and reaches every __syncthreads().
    for (int64_t tile = blockIdx.x; tile < num_tiles; tile += gridDim.x) {
        const int64_t col = tile * kTile + tx;
        float sum = 0.0f;
        if (col < cols) {
#pragma unroll 4
            for (int64_t r = ty; r < rows; r += kTile)
                sum += kScale ? row_scaled(dy[r * cols + col], scale[r]) : dy[r * cols + col];
        }
        partial[ty][tx] = sum;
        __syncthreads();   // all partials of the tile are in shared memory

        // Warp ty reduces column ty of the tile: lane l holds row l's partial.
        float v = partial[tx][ty];
#pragma unroll
        for (int offset = kTile / 2; offset > 0; offset /= 2)
            v += __shfl_xor_sync(0xffffffffu, v, offset);
        const int64_t out_col = tile * kTile + ty;
        if (tx == 0 && out_col < cols) db[out_col] = v;
        __syncthreads();   // reads of `partial` are done before the next tile overwrites it
    }
}

}  // namespace

void bias_add(const float* x, const float* bias, float* y, int64_t rows, int64_t cols,
              cudaStream_t stream) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  "bias_add: sizes must be non-negative, got rows=" << rows << " cols=" << cols);
    if (rows == 0 || cols == 0) return;
    FASTMLP_CHECK(rows <= std::numeric_limits<int64_t>::max() / cols,
                  "bias_add: rows*cols overflows int64");
    FASTMLP_CHECK(x != nullptr && bias != nullptr && y != nullptr, "bias_add: null pointer");
    const int64_t size = rows * cols;
    const unsigned int blocks = detail::grid_stride_blocks(size, kBlock);
    const int64_t stride = static_cast<int64_t>(blocks) * kBlock;
    // 32-bit indices if i + stride cannot wrap: size + stride <= 2^32 - 1.
    if (size <= static_cast<int64_t>(std::numeric_limits<uint32_t>::max()) - stride) {
        bias_add_f32<uint32_t><<<blocks, kBlock, 0, stream>>>(
            x, bias, y, static_cast<uint32_t>(size), static_cast<uint32_t>(cols));
    } else {
        bias_add_f32<int64_t><<<blocks, kBlock, 0, stream>>>(x, bias, y, size, cols);
    }
    detail::check_launch();
}

void bias_grad(const float* dy, float* db, int64_t rows, int64_t cols, cudaStream_t stream) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0,
                  "bias_grad: sizes must be non-negative, got rows=" << rows << " cols=" << cols);
    if (cols == 0) return;
    FASTMLP_CHECK(db != nullptr, "bias_grad: db is null");
    FASTMLP_CHECK(rows == 0 || dy != nullptr, "bias_grad: dy is null");
    FASTMLP_CHECK(rows <= std::numeric_limits<int64_t>::max() / cols,
                  "bias_grad: rows*cols overflows int64");
    // One block per 32-column tile (more would split a column's sum across
    // blocks, which needs a second pass); the grid-stride loop covers the rest.
    const unsigned int blocks =
        detail::grid_stride_blocks(cols, kTile, std::numeric_limits<int32_t>::max());
    bias_grad_colsum_f32<false><<<blocks, dim3(kTile, kTile), 0, stream>>>(dy, db, rows, cols,
                                                                           nullptr);
    detail::check_launch();
}

void bias_grad_row_scaled(const float* dy, const float* scale, float* db, int64_t rows,
                          int64_t cols, cudaStream_t stream) {
    FASTMLP_CHECK(rows >= 0 && cols >= 0, "bias_grad_row_scaled: sizes must be non-negative, got rows="
                                              << rows << " cols=" << cols);
    if (cols == 0) return;
    FASTMLP_CHECK(db != nullptr, "bias_grad_row_scaled: db is null");
    FASTMLP_CHECK(rows == 0 || (dy != nullptr && scale != nullptr),
                  "bias_grad_row_scaled: dy or scale is null");
    FASTMLP_CHECK(rows <= std::numeric_limits<int64_t>::max() / cols,
                  "bias_grad_row_scaled: rows*cols overflows int64");
    const unsigned int blocks =
        detail::grid_stride_blocks(cols, kTile, std::numeric_limits<int32_t>::max());
    bias_grad_colsum_f32<true><<<blocks, dim3(kTile, kTile), 0, stream>>>(dy, db, rows, cols,
                                                                          scale);
    detail::check_launch();
}

void relu(const float* x, float* y, int64_t size, cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "relu: size must be non-negative, got " << size);
    if (size == 0) return;
    FASTMLP_CHECK(x != nullptr && y != nullptr, "relu: null pointer");
    relu_f32<<<detail::grid_stride_blocks(size, kBlock), kBlock, 0, stream>>>(x, y, size);
    detail::check_launch();
}

void relu_backward(const float* dy, const float* y, float* dx, int64_t size, cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "relu_backward: size must be non-negative, got " << size);
    if (size == 0) return;
    FASTMLP_CHECK(dy != nullptr && y != nullptr && dx != nullptr, "relu_backward: null pointer");
    relu_backward_f32<<<detail::grid_stride_blocks(size, kBlock), kBlock, 0, stream>>>(dy, y, dx,
                                                                                       size);
    detail::check_launch();
}

void first_nonfinite(const float* x, int64_t size, int64_t* out, cudaStream_t stream) {
    FASTMLP_CHECK(size >= 0, "first_nonfinite: size must be non-negative, got " << size);
    FASTMLP_CHECK(out != nullptr, "first_nonfinite: null out");
    CUDA_CHECK(cudaMemsetAsync(out, 0xFF, sizeof(int64_t), stream));  // -1: none found
    if (size == 0) return;
    FASTMLP_CHECK(x != nullptr, "first_nonfinite: null pointer");
    first_nonfinite_f32<<<detail::grid_stride_blocks(size, kBlock), kBlock, 0, stream>>>(
        x, size, reinterpret_cast<unsigned long long*>(out));
    detail::check_launch();
}

}  // namespace cuda
}  // namespace fastmlp
