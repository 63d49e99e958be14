// The GEMM family's registry, its per-GPU dispatch table, the launcher that
// runs a named configuration (with split-K), and the split-K reduction.
// The kernels themselves: gemm_family.cuh, instantiated in
// gemm_family_simt.cu and gemm_family_tf32.cu.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <mutex>
#include <tuple>

#include "gemm_family.cuh"

namespace fastmlp {
namespace cuda {
namespace family {
namespace {

const std::vector<Registered>& registry() {
    static const std::vector<Registered> all = [] {
        std::vector<Registered> v = simt_configs();
        for (const Registered& r : tf32_configs()) v.push_back(r);
        return v;
    }();
    return all;
}

// ---- the dispatch table -------------------------------------------------------------
using Key = std::tuple<int, bool, bool, int, int, int>;   // precision, ta, tb, mb, nb, kb

struct Tables {
    std::mutex mu;
    std::map<int, std::map<Key, TableEntry>> by_device;
    // Devices with a non-empty table: gemm_ex skips the lock when its bit is clear.
    std::atomic<uint64_t> nonempty{0};
};

Tables& tables() {
    static Tables t;
    return t;
}

Key key_of(const TableEntry& e) { return Key{e.precision, e.trans_a, e.trans_b, e.mb, e.nb, e.kb}; }

// ---- per-device facts the launcher needs -------------------------------------------
struct DeviceFacts {
    int cc = 0;             // major * 10 + minor
    int smem_optin = 0;     // max dynamic shared memory per block (bytes)
};

DeviceFacts device_facts(int device) {
    static std::mutex mu;
    static std::map<int, DeviceFacts> cache;
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(device);
    if (it != cache.end()) return it->second;
    DeviceFacts f;
    int major = 0, minor = 0;
    CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
    CUDA_CHECK(cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    f.cc = major * 10 + minor;
    cache[device] = f;
    return f;
}

// k counts inside the kernels are ints (fewer registers in the copy loop).
constexpr int64_t kMaxK = int64_t{1} << 30;

// ---- split-K reduction ---------------------------------------------------------------
// C = epilogue(alpha * sum_z partial[z] + beta * C), z in fixed order 0, 1, ...:
// deterministic. The first n threads of the grid also finish the column sums.
constexpr int kReduceBlock = 256;

__global__ void __launch_bounds__(kReduceBlock) gemm_splitk_reduce_f32(const Params p) {
    const int64_t mn = p.m * p.n;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
    const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    for (int64_t e = first; e < mn; e += stride) {
        const int64_t i = e / p.n, j = e - i * p.n;
        float s = 0.0f;
        for (int z = 0; z < p.splits; ++z) s += p.partial[z * mn + e];
        float* dst = p.c + i * p.ldc + j;
        const float c_old = p.beta != 0.0f ? *dst : 0.0f;
        const float bias = p.bias ? p.bias[j] : 0.0f;
        const float mask = p.mask ? p.mask[i * p.ld_mask + j] : 0.0f;
        *dst = finish(p, s, c_old, bias, mask);
    }
    if (p.colsum_out) {
        for (int64_t j = first; j < p.n; j += stride) {
            float s = 0.0f;
            for (int z = 0; z < p.splits; ++z) s += p.colsum[z * p.n + j];
            p.colsum_out[j] = s;
        }
    }
}

bool aligned16(const void* ptr) { return (reinterpret_cast<uintptr_t>(ptr) & 15u) == 0; }

}  // namespace

const std::vector<ConfigInfo>& configs() {
    static const std::vector<ConfigInfo> infos = [] {
        std::vector<ConfigInfo> v;
        for (const Registered& r : registry()) v.push_back(r.info);
        return v;
    }();
    return infos;
}

int find_config(const std::string& name) {
    const auto& all = configs();
    for (size_t i = 0; i < all.size(); ++i)
        if (all[i].name == name) return static_cast<int>(i);
    return -1;
}

int size_bucket(int64_t x) {
    int b = 0;
    while (b < 14 && (int64_t{1} << b) < x) ++b;   // ceil(log2(x)), capped at 14
    return b < 4 ? 4 : b;
}

int64_t workspace_floats(int64_t m, int64_t n, int splits) {
    if (splits <= 1 || m <= 0 || n <= 0) return 0;
    FASTMLP_CHECK(m <= std::numeric_limits<int64_t>::max() / n / (splits + 1),
                  "gemm: the split-K workspace for m=" << m << " n=" << n << " overflows int64");
    return static_cast<int64_t>(splits) * (m * n + n);   // partial tiles, then colsum partials
}

void set_table(int device, const std::vector<TableEntry>& entries) {
    FASTMLP_CHECK(device >= 0 && device < 64, "set_gemm_table: device must be in [0, 64), got " << device);
    std::map<Key, TableEntry> table;
    const auto& all = configs();
    for (const TableEntry& e : entries) {
        FASTMLP_CHECK(e.config >= 0 && e.config < static_cast<int>(all.size()),
                      "set_gemm_table: unknown config index " << e.config);
        FASTMLP_CHECK(e.precision == 0 || e.precision == 1,
                      "set_gemm_table: precision must be 0 (fp32) or 1 (tf32), got " << e.precision);
        FASTMLP_CHECK(!(e.precision == 0 && all[e.config].tf32),
                      "set_gemm_table: the fp32 class cannot use the tf32 config " << all[e.config].name);
        FASTMLP_CHECK(e.splits >= 1 && e.splits <= 64,
                      "set_gemm_table: splits must be in [1, 64], got " << e.splits);
        for (int b : {e.mb, e.nb, e.kb})
            FASTMLP_CHECK(b >= 4 && b <= 14, "set_gemm_table: size bucket must be in [4, 14], got " << b);
        table[key_of(e)] = e;
    }
    Tables& t = tables();
    std::lock_guard<std::mutex> lock(t.mu);
    const uint64_t bit = uint64_t{1} << device;
    if (table.empty()) {
        t.by_device.erase(device);
        t.nonempty.fetch_and(~bit);
    } else {
        t.by_device[device] = std::move(table);
        t.nonempty.fetch_or(bit);
    }
}

std::vector<TableEntry> get_table(int device) {
    Tables& t = tables();
    std::lock_guard<std::mutex> lock(t.mu);
    std::vector<TableEntry> out;
    auto it = t.by_device.find(device);
    if (it != t.by_device.end())
        for (const auto& kv : it->second) out.push_back(kv.second);
    return out;
}

bool lookup(int device, Precision precision, bool trans_a, bool trans_b, int64_t m, int64_t n,
            int64_t k, TableEntry* out) {
    if (device < 0 || device >= 64) return false;
    Tables& t = tables();
    if (!(t.nonempty.load(std::memory_order_acquire) & (uint64_t{1} << device))) return false;
    const int mb = size_bucket(m), nb = size_bucket(n), kb = size_bucket(k);
    std::lock_guard<std::mutex> lock(t.mu);
    auto dev = t.by_device.find(device);
    if (dev == t.by_device.end()) return false;
    // tf32 first when allowed; fp32 is always acceptable (it is more exact).
    for (int prec : {static_cast<int>(precision), 0}) {
        auto it = dev->second.find(Key{prec, trans_a, trans_b, mb, nb, kb});
        if (it != dev->second.end()) {
            *out = it->second;
            return true;
        }
        if (prec == 0) break;
    }
    return false;
}

int64_t dispatch_workspace_floats(int device, Precision precision, bool trans_a, bool trans_b,
                                  int64_t m, int64_t n, int64_t k) {
    TableEntry e;
    if (m <= 0 || n <= 0 || k <= 0 || !lookup(device, precision, trans_a, trans_b, m, n, k, &e))
        return 0;
    return workspace_floats(m, n, e.splits);
}

void run_config(int config, int splits, bool trans_a, bool trans_b, int64_t m, int64_t n,
                int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                float beta, float* c, int64_t ldc, const GemmEpilogue& ep, cudaStream_t stream) {
    const auto& reg = registry();
    FASTMLP_CHECK(config >= 0 && config < static_cast<int>(reg.size()),
                  "gemm_config: unknown config index " << config);
    const ConfigInfo& info = reg[config].info;
    // The same preconditions as gemm / gemm_ex.
    FASTMLP_CHECK(m >= 0 && n >= 0 && k >= 0,
                  "gemm: sizes must be non-negative, got m=" << m << " n=" << n << " k=" << k);
    const int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
    FASTMLP_CHECK(lda >= a_cols, "gemm: lda must be >= " << a_cols << ", got " << lda);
    FASTMLP_CHECK(ldb >= b_cols, "gemm: ldb must be >= " << b_cols << ", got " << ldb);
    FASTMLP_CHECK(ldc >= n, "gemm: ldc must be >= n=" << n << ", got " << ldc);
    FASTMLP_CHECK(ep.colsum_b == nullptr || !trans_b, "gemm_ex: colsum_b needs trans_b == false");
    FASTMLP_CHECK(ep.relu_mask == nullptr || ep.ld_mask >= n,
                  "gemm_ex: ld_mask must be >= n=" << n << ", got " << ep.ld_mask);
    FASTMLP_CHECK(splits >= 1 && splits <= 65535, "gemm_config: splits must be in [1, 65535], got " << splits);
    FASTMLP_CHECK(k < kMaxK, "gemm_config: k=" << k << " is too large for the kernel family (k < 2^30)");

    if (m == 0 || n == 0 || k == 0) {
        // Nothing for the family to do: the foundation's k == 0 / empty
        // handling (C = beta * C, colsum = 0), then the epilogue.
        GemmEpilogue plain = ep;
        plain.workspace = nullptr;
        plain.workspace_floats = 0;
        ::fastmlp::cuda::gemm_ex(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
                                 plain, Precision::kFp32, stream);
        return;
    }
    FASTMLP_CHECK(a != nullptr && b != nullptr && c != nullptr, "gemm: null pointer");

    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    const DeviceFacts dev = device_facts(device);
    FASTMLP_CHECK(dev.cc >= info.min_cc, "gemm_config: " << info.name << " needs compute capability "
                                             << info.min_cc / 10 << "." << info.min_cc % 10
                                             << "+, this GPU has " << dev.cc / 10 << "." << dev.cc % 10);
    FASTMLP_CHECK(dev.smem_optin >= info.smem_bytes,
                  "gemm_config: " << info.name << " needs " << info.smem_bytes
                                  << " bytes of shared memory per block, this GPU allows " << dev.smem_optin);

    const int64_t grid_m = detail::ceil_div(m, info.bm), grid_n = detail::ceil_div(n, info.bn);
    FASTMLP_CHECK(grid_m <= std::numeric_limits<int32_t>::max(), "gemm: m=" << m << " is too large for one launch");
    FASTMLP_CHECK(grid_n <= 65535, "gemm: n=" << n << " is too large for one launch (at most "
                                               << 65535LL * info.bn << " columns)");

    // Each split gets a whole number of k-slices and at least one: the
    // actual count can be lower than asked (e.g. k = 40, BK = 16: at most 3).
    const int64_t k_tiles = detail::ceil_div(k, info.bk);
    int64_t per = detail::ceil_div(k_tiles, std::min<int64_t>(splits, k_tiles)) * info.bk;
    const int z = static_cast<int>(detail::ceil_div(k, per));

    Params p{};
    p.m = m; p.n = n; p.k = k;
    p.alpha = alpha; p.beta = beta;
    p.a = a; p.lda = lda; p.b = b; p.ldb = ldb; p.c = c; p.ldc = ldc;
    p.bias = ep.bias; p.mask = ep.relu_mask; p.ld_mask = ep.ld_mask; p.relu = ep.relu ? 1 : 0;
    p.k_per_split = per;
    p.splits = z;
    // 16-byte copies: base and every row start 16-byte aligned. Only the
    // operand whose contiguous index is a tile dimension uses them.
    p.vec_a = trans_a && lda % 4 == 0 && aligned16(a);
    p.vec_b = !trans_b && ldb % 4 == 0 && aligned16(b);
    p.vec_c = ldc % 4 == 0 && aligned16(c) && (ep.bias == nullptr || aligned16(ep.bias)) &&
              (ep.relu_mask == nullptr || (ep.ld_mask % 4 == 0 && aligned16(ep.relu_mask)));

    if (z > 1) {
        const int64_t need = workspace_floats(m, n, z);
        FASTMLP_CHECK(ep.workspace != nullptr && ep.workspace_floats >= need,
                      "gemm_config: split-K with " << z << " splits needs a workspace of " << need
                                                   << " floats, got " << ep.workspace_floats);
        p.partial = ep.workspace;
        p.colsum = ep.colsum_b ? ep.workspace + static_cast<int64_t>(z) * m * n : nullptr;
        p.colsum_out = ep.colsum_b;
    } else {
        p.partial = nullptr;
        p.colsum = ep.colsum_b;
        p.colsum_out = nullptr;
    }

    const dim3 grid(static_cast<unsigned>(grid_m), static_cast<unsigned>(grid_n), static_cast<unsigned>(z));
    reg[config].launch(trans_a, trans_b, p, grid, stream, device);
    if (z > 1) {
        FASTMLP_CHECK(m <= std::numeric_limits<int64_t>::max() / n, "gemm_ex: m*n overflows int64");
        const unsigned blocks = detail::grid_stride_blocks(std::max(m * n, n), kReduceBlock);
        gemm_splitk_reduce_f32<<<blocks, kReduceBlock, 0, stream>>>(p);
        detail::check_launch();
    }
}

bool try_dispatch(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                  const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc, const GemmEpilogue& ep, Precision precision, cudaStream_t stream) {
    if (m <= 0 || n <= 0 || k <= 0 || k >= kMaxK) return false;
    // [issue 15] The family's finish knows bias / relu / relu_mask only: an
    // activation or dropout epilogue runs on the composed path (gemm_ex.cu).
    if (ep.has_act() || ep.has_grad_act()) return false;
    if (!tables().nonempty.load(std::memory_order_acquire)) return false;   // the common case
    int device = 0;
    CUDA_CHECK(cudaGetDevice(&device));
    TableEntry e;
    if (!lookup(device, precision, trans_a, trans_b, m, n, k, &e)) return false;
    const ConfigInfo& info = configs()[e.config];
    const DeviceFacts dev = device_facts(device);
    if (dev.cc < info.min_cc || dev.smem_optin < info.smem_bytes) return false;
    if (detail::ceil_div(n, info.bn) > 65535) return false;
    int splits = e.splits;
    if (splits > 1) {
        // The split count run_config will actually use, and its workspace.
        const int64_t k_tiles = detail::ceil_div(k, info.bk);
        const int64_t per = detail::ceil_div(k_tiles, std::min<int64_t>(splits, k_tiles)) * info.bk;
        const int z = static_cast<int>(detail::ceil_div(k, per));
        if (ep.workspace == nullptr || ep.workspace_floats < workspace_floats(m, n, z)) splits = 1;
    }
    run_config(e.config, splits, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, ep,
               stream);
    return true;
}

}  // namespace family
}  // namespace cuda
}  // namespace fastmlp
