// Flush-to-zero / denormals-are-zero for the CPU kernels.
//
// Why: a denormal (subnormal) float costs x86 cores a microcode assist per
// operation -- ~100x on Intel, less on AMD. Training meets them for real: on
// Fashion-MNIST the always-zero border pixels get zero gradients, so Adam's
// m and v for their weights decay geometrically into denormals after ~800
// steps, and every later GEMM and optimizer step pays. TensorFlow/Keras run
// their CPU kernels in this mode by default; PyTorch offers
// torch.set_flush_denormal.
//
// How: every public CPU kernel (and the CPU engine's run) opens a
// FlushDenormalScope. It sets the FTZ and DAZ bits of the calling thread's
// MXCSR (FZ of FPCR on AArch64) when the global switch is on, and restores the
// previous value when the kernel returns: the user's own NumPy code on that
// thread is not affected. The pool's workers copy the caller's control word
// for each job and restore their own afterwards (cpu/parallel.cpp). Nested
// scopes cost two register reads.
//
// Results: with the switch on, a denormal input reads as (signed) zero and a
// result that would be denormal is written as zero; with it off, IEEE 754.
// fastmlp.set_flush_denormal(False) turns it off (cpu::set_flush_denormal).
#pragma once

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace fastmlp {
namespace cpu {

// The global switch (default on); defined in cpu/parallel.cpp.
bool flush_denormal();
void set_flush_denormal(bool on);

#if defined(__x86_64__) || defined(__i386__)
using FpControl = unsigned int;
constexpr FpControl kFlushBits = 0x8040u;  // MXCSR: FTZ (bit 15) | DAZ (bit 6)
inline FpControl fp_control() { return _mm_getcsr(); }
inline void set_fp_control(FpControl c) { _mm_setcsr(c); }
constexpr bool kFlushSupported = true;
#elif defined(__aarch64__) && defined(__GNUC__)
using FpControl = uint64_t;
constexpr FpControl kFlushBits = uint64_t(1) << 24;  // FPCR.FZ (inputs and outputs)
inline FpControl fp_control() {
    uint64_t c;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(c));
    return c;
}
inline void set_fp_control(FpControl c) { __asm__ __volatile__("msr fpcr, %0" : : "r"(c)); }
constexpr bool kFlushSupported = true;
#else
using FpControl = unsigned int;
constexpr FpControl kFlushBits = 0u;
inline FpControl fp_control() { return 0u; }
inline void set_fp_control(FpControl) {}
constexpr bool kFlushSupported = false;
#endif

class FlushDenormalScope {
public:
    FlushDenormalScope() : saved_(fp_control()) {
        const FpControl want = flush_denormal() ? (saved_ | kFlushBits) : (saved_ & ~kFlushBits);
        changed_ = want != saved_;
        if (changed_) set_fp_control(want);
    }
    ~FlushDenormalScope() {
        if (changed_) set_fp_control(saved_);
    }
    FlushDenormalScope(const FlushDenormalScope&) = delete;
    FlushDenormalScope& operator=(const FlushDenormalScope&) = delete;

private:
    FpControl saved_;
    bool changed_;
};

}  // namespace cpu
}  // namespace fastmlp
