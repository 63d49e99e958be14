// The SIMT FP32 configurations of the GEMM family (gemm_family.cuh): exact
// float32 FFMA, the default precision. One translation unit per math kind so
// that the two compile in parallel.
//
// Names: simt_<BM>x<BN>x<BK>_w<WM>x<WN>_s<stages>. Why these:
// - 128x128 (8x8 per thread, 256 threads): the large squares; 64 FFMA per
//   4 LDS.128 per k. BK 8 and 16 both kept: 16 halves the barriers, 8 halves
//   the shared memory (more blocks resident).
// - 128x64 (8x4): tall C, e.g. the MLP forward at large batch (n = 128).
// - 64x64 (8x4, 128 threads): mid sizes; more blocks to fill 132 SMs.
// - 64x32 (4x4, 128 threads): narrow C (n = 10: the 128->10 layer) and the
//   split-K dW products, where many small blocks beat few large ones.
#include "gemm_family.cuh"

namespace fastmlp {
namespace cuda {
namespace family {

//                          BM   BN  BK  WM  WN LM LN stages minBlocks
using Simt128x128x8  = SimtCfg<128, 128, 8, 32, 64, 4, 8, 3, 1>;
using Simt128x128x16 = SimtCfg<128, 128, 16, 32, 64, 4, 8, 3, 1>;
using Simt128x64x16  = SimtCfg<128, 64, 16, 32, 32, 4, 8, 3, 2>;
using Simt64x64x16   = SimtCfg<64, 64, 16, 32, 32, 4, 8, 3, 4>;
using Simt64x32x16   = SimtCfg<64, 32, 16, 32, 16, 8, 4, 4, 4>;

std::vector<Registered> simt_configs() {
    return {
        {Launcher<Simt128x128x8>::info("simt_128x128x8_w32x64_s3"), &Launcher<Simt128x128x8>::launch},
        {Launcher<Simt128x128x16>::info("simt_128x128x16_w32x64_s3"), &Launcher<Simt128x128x16>::launch},
        {Launcher<Simt128x64x16>::info("simt_128x64x16_w32x32_s3"), &Launcher<Simt128x64x16>::launch},
        {Launcher<Simt64x64x16>::info("simt_64x64x16_w32x32_s3"), &Launcher<Simt64x64x16>::launch},
        {Launcher<Simt64x32x16>::info("simt_64x32x16_w32x16_s4"), &Launcher<Simt64x32x16>::launch},
    };
}

}  // namespace family
}  // namespace cuda
}  // namespace fastmlp
