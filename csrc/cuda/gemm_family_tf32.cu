// The TF32 tensor-core configurations of the GEMM family (gemm_family.cuh):
// mma.sync m16n8k8, fp32 accumulate, inputs rounded to TF32 (10-bit mantissa).
// Used only when the caller opts in (fm.set_matmul_precision("tf32") or
// precision="tf32") AND the GPU's tuning table lists one for the shape class.
//
// Names: tf32_<BM>x<BN>x<BK>_w<WM>x<WN>_s<stages>. Why these:
// - 128x128, warp 64x64 (4 warps): 32 mma per 32 fragment loads per k8 step,
//   the best operand reuse that stays under 255 registers (128 accumulators).
// - 128x128, warp 64x32 (8 warps): half the registers, twice the warps to
//   hide shared-memory latency.
// - 64x64, warp 32x32 (4 warps): mid sizes and the MLP products.
#include "gemm_family.cuh"

namespace fastmlp {
namespace cuda {
namespace family {

//                          BM   BN  BK  WM  WN stages minBlocks
using Tf32_128x128_w64x64 = Tf32Cfg<128, 128, 16, 64, 64, 3, 1>;
using Tf32_128x128_w64x32 = Tf32Cfg<128, 128, 16, 64, 32, 3, 2>;
using Tf32_64x64_w32x32   = Tf32Cfg<64, 64, 16, 32, 32, 3, 4>;

std::vector<Registered> tf32_configs() {
    return {
        {Launcher<Tf32_128x128_w64x64>::info("tf32_128x128x16_w64x64_s3"),
         &Launcher<Tf32_128x128_w64x64>::launch},
        {Launcher<Tf32_128x128_w64x32>::info("tf32_128x128x16_w64x32_s3"),
         &Launcher<Tf32_128x128_w64x32>::launch},
        {Launcher<Tf32_64x64_w32x32>::info("tf32_64x64x16_w32x32_s3"),
         &Launcher<Tf32_64x64_w32x32>::launch},
    };
}

}  // namespace family
}  // namespace cuda
}  // namespace fastmlp
