// CPU Gaussian noise (DP-SGD, issue 17): kernel_math.h's Philox + Box-Muller,
// the same floats the CUDA kernel computes. Compiled without FMA contraction
// (CMakeLists.txt): every multiply-add of the generator is an explicit fma.
#include "cpu/noise.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>

#include "check.h"
#include "cpu/fpenv.h"
#include "cpu/parallel.h"
#include "fastmlp.h"
#include "kernel_math.h"

namespace fastmlp {
namespace cpu {
namespace {

// The generic block loop (cpu/noise.h; the fallback of the explicit AVX-512
// one, cpu/noise_avx512.cpp, 2.1x faster on Zen 4): the 4 nb normals of
// counter blocks b0 .. b0 + nb - 1, in element order, then (with grad) the
// transform's noise step. Two loops: the generator alone
// vectorises (16 blocks per AVX-512 iteration: Philox's 32x32->64 products are
// vpmuludq, the log / cos / sin polynomials plain fmas); the fma with the
// gradient is a second pass over the (L1-resident) buffer.
FASTMLP_SIMD_CLONES
void noise_blocks(float* __restrict out, const float* __restrict grad, float noise_std,
                  uint64_t b0, int64_t nb, uint64_t step, uint32_t k0, uint32_t k1) {
    for (int64_t b = 0; b < nb; ++b) {
        float z[4];
        gaussian_noise4(b0 + static_cast<uint64_t>(b), step, k0, k1, z);
        out[4 * b] = z[0];
        out[4 * b + 1] = z[1];
        out[4 * b + 2] = z[2];
        out[4 * b + 3] = z[3];
    }
    if (grad) {
        for (int64_t k = 0; k < 4 * nb; ++k) out[k] = noise_grad_step(grad[k], noise_std, out[k]);
    }
}

// The versions of the block loop (cpu/noise.h), best first.
using BlocksFn = void (*)(float*, const float*, float, uint64_t, int64_t, uint64_t, uint32_t,
                          uint32_t);
struct NoiseIsa {
    const char* name;
    BlocksFn run;
    bool (*supported)();
};
#ifdef FASTMLP_NOISE_AVX512
bool avx512_supported() {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw");
}
#endif
const NoiseIsa kIsas[] = {
#ifdef FASTMLP_NOISE_AVX512
    {"avx512", &noise_blocks_avx512, &avx512_supported},
#endif
    {"generic", &noise_blocks, [] { return true; }},
};

bool isa_supported(const NoiseIsa& isa) { return isa.supported(); }

const NoiseIsa* find_isa(const std::string& name) {
    if (name == "auto") {
        for (const NoiseIsa& isa : kIsas)
            if (isa_supported(isa)) return &isa;
    }
    for (const NoiseIsa& isa : kIsas)
        if (name == isa.name) return &isa;
    return nullptr;
}

std::string isa_names() {
    std::string s = "auto";
    for (const NoiseIsa& isa : kIsas) s += std::string(", ") + isa.name;
    return s;
}

// The version in use: FASTMLP_CPU_NOISE, or the best this CPU supports.
const NoiseIsa*& current_isa() {
    static const NoiseIsa* cur = [] {
        const char* env = std::getenv("FASTMLP_CPU_NOISE");
        const std::string name = env == nullptr || *env == '\0' ? "auto" : env;
        const NoiseIsa* want = find_isa(name);
        FASTMLP_CHECK(want != nullptr,
                      "FASTMLP_CPU_NOISE=" << name << " is not one of: " << isa_names());
        FASTMLP_CHECK(isa_supported(*want),
                      "FASTMLP_CPU_NOISE=" << name << ": this CPU does not support it");
        return want;
    }();
    return cur;
}

// Elements [e0, e1) of one counter block (e0 >> 2 == (e1 - 1) >> 2), scalar.
void noise_partial(float* out, const float* grad, float noise_std, uint64_t e0, uint64_t e1,
                   uint64_t step, uint32_t k0, uint32_t k1) {
    float z[4];
    gaussian_noise4(e0 >> 2, step, k0, k1, z);
    for (uint64_t e = e0; e < e1; ++e) {
        const float v = z[e & 3u];
        out[e - e0] = grad ? noise_grad_step(grad[e - e0], noise_std, v) : v;
    }
}

}  // namespace

void gaussian_noise_fill(float* out, const float* grad, float noise_std, uint64_t e0, int64_t n,
                         uint64_t step, uint32_t k0, uint32_t k1) {
    if (n <= 0) return;
    const uint64_t e1 = e0 + static_cast<uint64_t>(n);
    // The head: up to the first multiple of 4 (or the end).
    const uint64_t head_end = std::min(e1, (e0 + 3u) & ~uint64_t{3});
    if (head_end > e0) noise_partial(out, grad, noise_std, e0, head_end, step, k0, k1);
    const uint64_t body_end = e1 & ~uint64_t{3};
    if (body_end > head_end) {
        const int64_t off = static_cast<int64_t>(head_end - e0);
        current_isa()->run(out + off, grad ? grad + off : nullptr, noise_std, head_end >> 2,
                           static_cast<int64_t>((body_end - head_end) >> 2), step, k0, k1);
    }
    const uint64_t tail_start = std::max(head_end, body_end);
    if (e1 > tail_start) {
        const int64_t off = static_cast<int64_t>(tail_start - e0);
        noise_partial(out + off, grad ? grad + off : nullptr, noise_std, tail_start, e1, step,
                      k0, k1);
    }
}

void gaussian_noise(float* out, int64_t size, uint64_t seed, uint64_t step, int64_t offset) {
    FASTMLP_CHECK(size >= 0, "gaussian_noise: size must be >= 0, got " << size);
    FASTMLP_CHECK(offset >= 0, "gaussian_noise: offset must be >= 0, got " << offset);
    if (size == 0) return;
    FASTMLP_CHECK(out, "gaussian_noise: null out");
    uint32_t k0, k1;
    noise_key(seed, &k0, &k1);
    (void)current_isa();  // chosen (FASTMLP_CPU_NOISE checked) on the calling thread
    FlushDenormalScope fp_scope;  // cpu/fpenv.h (no denormal arises; as the other kernels)
    // Pieces of kNoiseChunk elements: each element is computed on its own, so
    // the split (and the thread count) does not change a bit.
    const int64_t pieces = (size + kNoiseChunk - 1) / kNoiseChunk;
    auto piece = [&](int64_t p) {
        const int64_t i0 = p * kNoiseChunk, i1 = std::min(size, i0 + kNoiseChunk);
        gaussian_noise_fill(out + i0, nullptr, 0.0f, static_cast<uint64_t>(offset + i0), i1 - i0,
                            step, k0, k1);
    };
    parallel_chunks(pieces, size >= 8192 ? pool_threads() : 1, piece);
}

std::string noise_isa() { return current_isa()->name; }

std::string noise_isas_supported() {
    std::string s;
    for (const NoiseIsa& isa : kIsas)
        if (isa_supported(isa)) s += std::string(s.empty() ? "" : ",") + isa.name;
    return s;
}

int64_t noise_box_muller_mismatches(const std::string& isa) {
    const NoiseIsa* want = find_isa(isa);
    FASTMLP_CHECK(want != nullptr && want->run != &noise_blocks,
                  "noise_box_muller_mismatches: '" << isa << "' has no vector Box-Muller");
    FASTMLP_CHECK(isa_supported(*want),
                  "noise_box_muller_mismatches: this CPU does not support '" << isa << "'");
#ifdef FASTMLP_NOISE_AVX512
    return noise_box_muller_mismatches_avx512();
#else
    return 0;
#endif
}

std::string set_noise_isa(const std::string& name) {
    const NoiseIsa* want = find_isa(name);
    FASTMLP_CHECK(want != nullptr,
                  "set_noise_isa: '" << name << "' is not one of: " << isa_names());
    FASTMLP_CHECK(isa_supported(*want), "set_noise_isa: this CPU does not support '" << name << "'");
    const std::string old = current_isa()->name;
    current_isa() = want;
    return old;
}

}  // namespace cpu
}  // namespace fastmlp
