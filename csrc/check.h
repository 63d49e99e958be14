// Precondition and CUDA error checks shared by every launcher.
//
// FASTMLP_CHECK throws std::invalid_argument (pybind11 turns it into ValueError),
// so a bad call from Python becomes a clear exception, never a crash.
// CUDA_CHECK throws std::runtime_error (RuntimeError) with the CUDA error text.
#pragma once

#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

namespace fastmlp {

// Whether the na floats at a and the nb floats at b overlap (a null or empty
// one overlaps nothing), computed from the distance so that no size overflows.
inline bool floats_overlap(const void* a, uint64_t na, const void* b, uint64_t nb) {
    if (a == nullptr || b == nullptr || na == 0 || nb == 0) return false;
    const uintptr_t x = reinterpret_cast<uintptr_t>(a), y = reinterpret_cast<uintptr_t>(b);
    return x <= y ? (y - x) / sizeof(float) < na : (x - y) / sizeof(float) < nb;
}

[[noreturn]] inline void fail_check(const char* file, int line, const std::string& msg) {
    std::ostringstream os;
    os << msg << " (" << file << ":" << line << ")";
    throw std::invalid_argument(os.str());
}

}  // namespace fastmlp

#define FASTMLP_CHECK(cond, msg)                                              \
    do {                                                                      \
        if (!(cond)) {                                                        \
            std::ostringstream fastmlp_check_os_;                             \
            fastmlp_check_os_ << msg;                                         \
            ::fastmlp::fail_check(__FILE__, __LINE__, fastmlp_check_os_.str()); \
        }                                                                     \
    } while (0)

#ifdef __CUDACC__
#define CUDA_CHECK(expr)                                                      \
    do {                                                                      \
        cudaError_t fastmlp_err_ = (expr);                                    \
        if (fastmlp_err_ != cudaSuccess) {                                    \
            std::ostringstream fastmlp_cuda_os_;                              \
            fastmlp_cuda_os_ << "CUDA error " << cudaGetErrorName(fastmlp_err_) \
                             << ": " << cudaGetErrorString(fastmlp_err_)      \
                             << " in " #expr " (" << __FILE__ << ":" << __LINE__ << ")"; \
            throw std::runtime_error(fastmlp_cuda_os_.str());                 \
        }                                                                     \
    } while (0)
#endif
