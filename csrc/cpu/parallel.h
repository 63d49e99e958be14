// OpenMP helpers for the CPU kernels. Without OpenMP everything runs serially.
#pragma once

#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

// Below this many elements a parallel region costs more than it saves
// (a fork/join is a few microseconds; a core streams ~10 floats per ns).
#define FASTMLP_PAR_MIN 32768

// Pragmas inside macros need _Pragma.
#ifdef _OPENMP
#define FASTMLP_OMP(x) _Pragma(#x)
#else
#define FASTMLP_OMP(x)
#endif

// target_clones: one portable binary with AVX-512, AVX2+FMA and baseline
// versions of the hot loops, picked at load time from the CPU's features.
// (No -march=native: a wheel built here must run on any x86-64.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define FASTMLP_SIMD_CLONES \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTMLP_SIMD_CLONES
#endif
