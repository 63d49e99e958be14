// The tuned GEMM kernel family: its registry, the per-GPU dispatch table and
// the entry points that gemm_ex and the bindings use. Plain C++ (no CUDA
// syntax), so that bind_extras.cpp can include it without nvcc.
//
// Nothing here is on the default path: gemm_ex uses a family configuration
// only for a shape class that the dispatch table names for the current GPU,
// and the table is filled (from python/fastmlp/gemm_tuning.json) only with
// configurations that benchmarks/tune_gemm.py checked on that GPU. Without an
// entry, gemm_ex runs the foundation's gemm_tiled_f32 (+ epilogue pass).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "fastmlp.h"

namespace fastmlp {
namespace cuda {
namespace family {

// What a configuration is; the same numbers are listed by fm's
// _C.cuda.gemm_configs() and recorded in the tuning table.
struct ConfigInfo {
    std::string name;   // e.g. "simt_128x128x8_w32x64_s3"
    bool tf32;          // tensor cores (mma.sync m16n8k8 tf32), else FP32 FFMA
    int bm, bn, bk;     // block tile
    int wm, wn;         // warp tile
    int tm, tn;         // per-thread accumulator tile (SIMT; 0 for tf32)
    int stages;         // cp.async pipeline depth (shared-memory buffers)
    int threads;        // per block
    int smem_bytes;     // dynamic shared memory per block
    int min_cc;         // compute capability * 10 it needs (cp.async, mma: 80)
};

const std::vector<ConfigInfo>& configs();
// Index of the named configuration, or -1.
int find_config(const std::string& name);

// Shape classes of the dispatch table. A size x falls in bucket
// clamp(ceil(log2(x)), 4, 14): <= 16 -> 4, 17..32 -> 5, ..., 4097..8192 -> 13,
// > 8192 -> 14. python/fastmlp/_gemm_tuning.py computes the same (tested).
int size_bucket(int64_t x);

struct TableEntry {
    int precision;       // Precision as int: 0 fp32, 1 tf32
    bool trans_a, trans_b;
    int mb, nb, kb;      // size buckets of m, n, k
    int config;          // index into configs()
    int splits;          // split-K factor (1 = none)
};

// Replaces the table of CUDA device `device` (an ordinal). Validates every
// entry (known config, fp32 classes never get a tf32 config, splits in
// [1, 64], buckets in range); throws std::invalid_argument otherwise, leaving
// the old table in place. An empty list clears the device's table.
void set_table(int device, const std::vector<TableEntry>& entries);
// The device's entries, in key order.
std::vector<TableEntry> get_table(int device);
// The entry gemm_ex would use, without running anything: kTf32 looks up the
// tf32 class first and falls back to the fp32 class (never the other way).
bool lookup(int device, Precision precision, bool trans_a, bool trans_b, int64_t m, int64_t n,
            int64_t k, TableEntry* out);
// Floats of workspace a split-K run needs (0 for splits <= 1).
int64_t workspace_floats(int64_t m, int64_t n, int splits);
// Floats of workspace gemm_ex would use for this call on `device` (0 without
// a split-K table entry): the Python layer allocates this much from CuPy's
// pool and passes it in GemmEpilogue::workspace.
int64_t dispatch_workspace_floats(int device, Precision precision, bool trans_a, bool trans_b,
                                  int64_t m, int64_t n, int64_t k);

#ifdef FASTMLP_WITH_CUDA
// Runs configuration `config` with `splits` (clamped so each split gets at
// least one k-tile; a split-K run needs ep.workspace with
// workspace_floats(m, n, splits) floats, else it throws). Same semantics,
// preconditions and epilogue as gemm_ex. Throws when the current GPU cannot
// run it (compute capability, shared memory).
void run_config(int config, int splits, bool trans_a, bool trans_b, int64_t m, int64_t n,
                int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                float beta, float* c, int64_t ldc, const GemmEpilogue& ep, cudaStream_t stream);

// gemm_ex's hook: runs the table's configuration for this call and returns
// true, or returns false (nothing launched) when the table has no entry for
// the current device and shape class, or the device cannot run it. A split-K
// entry runs unsplit when ep.workspace is too small.
bool try_dispatch(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                  const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc, const GemmEpilogue& ep, Precision precision, cudaStream_t stream);
#endif

}  // namespace family
}  // namespace cuda
}  // namespace fastmlp
