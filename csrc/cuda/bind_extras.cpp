// CUDA-only bindings of fastmlp._C.cuda beyond the common ops. Plain C++:
// pybind11 never goes through nvcc.
#include <pybind11/pybind11.h>

#include "fastmlp.h"

namespace py = pybind11;

namespace fastmlp {
namespace cuda {

void bind_extras(py::module_& m) {
    (void)m;  // nothing yet: the GEMM kernel family adds its configurations here
}

}  // namespace cuda
}  // namespace fastmlp
