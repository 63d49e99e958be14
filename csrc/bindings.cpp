// The pybind11 module fastmlp._C: a thin layer over the op API in fastmlp.h.
//
// Arrays arrive as raw addresses (uintptr_t) with their sizes; the Python
// layer (fastmlp/_interop.py) has already validated dtype, shape, contiguity
// and device, so this file only converts and forwards. Plain C++: pybind11
// never goes through nvcc. The GIL is released around every kernel call.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "fastmlp.h"

namespace py = pybind11;
using fastmlp::LabelKind;
using std::int64_t;
using std::uintptr_t;

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

#ifndef FASTMLP_BUILD_INFO
#define FASTMLP_BUILD_INFO "unknown"
#endif
#ifndef FASTMLP_CUDA_WHY
#define FASTMLP_CUDA_WHY "unknown"
#endif

// Binds the ops of namespace NS into module M. EXTRA_PARAM / EXTRA_ARG add the
// stream argument on CUDA and are empty on the CPU.
#define FASTMLP_BIND_OPS(M, NS, EXTRA_PARAM, EXTRA_ARG)                         \
    M.def("gemm", [](bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,         \
                     uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, float beta,          \
                     uintptr_t c, int64_t ldc EXTRA_PARAM) {                                  \
        NS::gemm(ta, tb, m, n, k, alpha, ptr<const float>(a), lda, ptr<const float>(b), ldb, \
                 beta, ptr<float>(c), ldc EXTRA_ARG);                                        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("gemm_ex", [](bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,      \
                        uintptr_t a, int64_t lda, uintptr_t b, int64_t ldb, float beta,       \
                        uintptr_t c, int64_t ldc, uintptr_t bias, bool relu,                  \
                        uintptr_t relu_mask, int64_t ld_mask, uintptr_t colsum_b,             \
                        int precision, uintptr_t workspace,                                   \
                        int64_t workspace_floats EXTRA_PARAM) {                               \
        fastmlp::GemmEpilogue ep;                                                             \
        ep.bias = ptr<const float>(bias);                                                     \
        ep.relu = relu;                                                                       \
        ep.relu_mask = ptr<const float>(relu_mask);                                           \
        ep.ld_mask = ld_mask;                                                                 \
        ep.colsum_b = ptr<float>(colsum_b);                                                   \
        /* [issue 6] split-K scratch of the CUDA kernel family; the CPU ignores it */         \
        ep.workspace = ptr<float>(workspace);                                                 \
        ep.workspace_floats = workspace_floats;                                               \
        NS::gemm_ex(ta, tb, m, n, k, alpha, ptr<const float>(a), lda, ptr<const float>(b),   \
                    ldb, beta, ptr<float>(c), ldc, ep,                                        \
                    static_cast<fastmlp::Precision>(precision) EXTRA_ARG);                    \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("bias_add", [](uintptr_t x, uintptr_t bias, uintptr_t y, int64_t rows,            \
                         int64_t cols EXTRA_PARAM) {                                         \
        NS::bias_add(ptr<const float>(x), ptr<const float>(bias), ptr<float>(y), rows,       \
                     cols EXTRA_ARG);                                                        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("bias_grad", [](uintptr_t dy, uintptr_t db, int64_t rows, int64_t cols EXTRA_PARAM) { \
        NS::bias_grad(ptr<const float>(dy), ptr<float>(db), rows, cols EXTRA_ARG);           \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("relu", [](uintptr_t x, uintptr_t y, int64_t size EXTRA_PARAM) {                   \
        NS::relu(ptr<const float>(x), ptr<float>(y), size EXTRA_ARG);                        \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("relu_backward", [](uintptr_t dy, uintptr_t y, uintptr_t dx, int64_t size EXTRA_PARAM) { \
        NS::relu_backward(ptr<const float>(dy), ptr<const float>(y), ptr<float>(dx),         \
                          size EXTRA_ARG);                                                   \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("softmax_xent_fwd", [](uintptr_t logits, uintptr_t labels, int kind, uintptr_t probs, \
                                 uintptr_t row_loss, uintptr_t loss, uintptr_t bad_row,      \
                                 int64_t rows, int64_t cols EXTRA_PARAM) {                   \
        NS::softmax_xent_fwd(ptr<const float>(logits), ptr<const void>(labels),              \
                             static_cast<LabelKind>(kind), ptr<float>(probs),                \
                             ptr<float>(row_loss), ptr<float>(loss), ptr<int64_t>(bad_row),  \
                             rows, cols EXTRA_ARG);                                          \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("softmax_xent_bwd", [](uintptr_t probs, uintptr_t labels, int kind, uintptr_t dlogits, \
                                 uintptr_t bad_row, int64_t rows, int64_t cols EXTRA_PARAM) { \
        NS::softmax_xent_bwd(ptr<const float>(probs), ptr<const void>(labels),               \
                             static_cast<LabelKind>(kind), ptr<float>(dlogits),              \
                             ptr<int64_t>(bad_row), rows, cols EXTRA_ARG);                   \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("sgd_step", [](uintptr_t param, uintptr_t grad, uintptr_t buf, int64_t size,      \
                         float lr, float momentum, bool nesterov,                            \
                         float weight_decay EXTRA_PARAM) {                                   \
        NS::sgd_step(ptr<float>(param), ptr<const float>(grad), ptr<float>(buf), size, lr,   \
                     momentum, nesterov, weight_decay EXTRA_ARG);                            \
    }, py::call_guard<py::gil_scoped_release>());                                            \
    M.def("adam_step", [](uintptr_t param, uintptr_t grad, uintptr_t m, uintptr_t v,        \
                          int64_t size, double lr, double beta1, double beta2, double eps,  \
                          double weight_decay, bool decoupled, int64_t step EXTRA_PARAM) {  \
        NS::adam_step(ptr<float>(param), ptr<const float>(grad), ptr<float>(m), ptr<float>(v), \
                      size, lr, beta1, beta2, eps, weight_decay, decoupled, step EXTRA_ARG); \
    }, py::call_guard<py::gil_scoped_release>());

#define FASTMLP_NOTHING

}  // namespace

#ifdef FASTMLP_WITH_CUDA
namespace fastmlp {
namespace cuda {
// CUDA-only bindings beyond the common ops (GEMM kernel configurations, the
// tuning table): csrc/cuda/bind_extras.cpp, plain C++ like this file.
void bind_extras(py::module_& m);
}  // namespace cuda
}  // namespace fastmlp
#endif

PYBIND11_MODULE(_C, mod) {
    mod.doc() = "fastmlp kernels (float32, row-major); use fastmlp.ops, not this module";
    mod.attr("build_info") = FASTMLP_BUILD_INFO;
    mod.attr("cuda_build_note") = FASTMLP_CUDA_WHY;  // why the CUDA part is on or off

    py::module_ cpu = mod.def_submodule("cpu", "C++ CPU kernels");
    FASTMLP_BIND_OPS(cpu, fastmlp::cpu, FASTMLP_NOTHING, FASTMLP_NOTHING)
    cpu.def("num_threads", &fastmlp::cpu::num_threads);

#ifdef FASTMLP_WITH_CUDA
    mod.attr("cuda_built") = true;
    py::module_ cuda = mod.def_submodule("cuda", "CUDA kernels");
#define FASTMLP_STREAM_PARAM , uintptr_t stream
#define FASTMLP_STREAM_ARG , reinterpret_cast<cudaStream_t>(stream)
    FASTMLP_BIND_OPS(cuda, fastmlp::cuda, FASTMLP_STREAM_PARAM, FASTMLP_STREAM_ARG)
    fastmlp::cuda::bind_extras(cuda);
    // (count, "") or (0, reason): never raises, so fm.backends() can report
    // "no driver" on a machine without a GPU.
    cuda.def("device_count", []() -> py::tuple {
        int count = 0;
        cudaError_t err = cudaGetDeviceCount(&count);
        if (err != cudaSuccess) {
            std::string why = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
            cudaGetLastError();  // clear the sticky-free error so later calls start clean
            return py::make_tuple(0, why);
        }
        return py::make_tuple(count, std::string());
    });
    cuda.def("runtime_version", []() {
        int v = 0;
        cudaRuntimeGetVersion(&v);
        return v;
    });
#else
    mod.attr("cuda_built") = false;
#endif
}
