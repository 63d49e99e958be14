// CUDA-only bindings of fastmlp._C.cuda beyond the common ops: the GEMM
// kernel family (gemm_family.h). Plain C++: pybind11 never goes through nvcc.
//
//   gemm_configs()            -> [dict]: every configuration and its properties
//   gemm_config(name, splits, <gemm_ex's arguments>)
//                             runs one configuration explicitly (tests, tuning)
//   set_gemm_table(device, entries) / gemm_table(device)
//                             the dispatch table of one device; entries are
//                             (precision, trans_a, trans_b, mb, nb, kb, config name, splits)
//   gemm_dispatch(device, precision, trans_a, trans_b, m, n, k)
//                             -> (config name, splits) or None: what gemm_ex would run
//   gemm_workspace_floats(device, precision, trans_a, trans_b, m, n, k)
//                             -> floats of split-K workspace gemm_ex would use
//   gemm_config_workspace_floats(m, n, splits), gemm_size_bucket(x)
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <tuple>
#include <vector>

#include "check.h"
#include "fastmlp.h"
#include "gemm_family.h"

namespace py = pybind11;

namespace fastmlp {
namespace cuda {

namespace {

template <typename T>
T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

using EntryTuple = std::tuple<int, bool, bool, int, int, int, std::string, int>;

EntryTuple to_tuple(const family::TableEntry& e) {
    return EntryTuple{e.precision, e.trans_a, e.trans_b, e.mb, e.nb, e.kb,
                      family::configs()[e.config].name, e.splits};
}

}  // namespace

void bind_extras(py::module_& m) {
    m.def("gemm_configs", []() {
        py::list out;
        for (const family::ConfigInfo& c : family::configs()) {
            py::dict d;
            d["name"] = c.name;
            d["kind"] = c.tf32 ? "tf32" : "simt";
            d["tf32"] = c.tf32;
            d["bm"] = c.bm; d["bn"] = c.bn; d["bk"] = c.bk;
            d["wm"] = c.wm; d["wn"] = c.wn; d["tm"] = c.tm; d["tn"] = c.tn;
            d["stages"] = c.stages;
            d["threads"] = c.threads;
            d["smem_bytes"] = c.smem_bytes;
            d["min_cc"] = c.min_cc;
            out.append(d);
        }
        return out;
    });

    m.def("gemm_config", [](const std::string& name, int splits, bool ta, bool tb, int64_t m_,
                            int64_t n, int64_t k, float alpha, uintptr_t a, int64_t lda,
                            uintptr_t b, int64_t ldb, float beta, uintptr_t c, int64_t ldc,
                            uintptr_t bias, bool relu, uintptr_t relu_mask, int64_t ld_mask,
                            uintptr_t colsum_b, uintptr_t workspace, int64_t workspace_floats,
                            uintptr_t stream) {
        const int idx = family::find_config(name);
        FASTMLP_CHECK(idx >= 0, "gemm_config: unknown configuration '" << name << "'");
        GemmEpilogue ep;
        ep.bias = ptr<const float>(bias);
        ep.relu = relu;
        ep.relu_mask = ptr<const float>(relu_mask);
        ep.ld_mask = ld_mask;
        ep.colsum_b = ptr<float>(colsum_b);
        ep.workspace = ptr<float>(workspace);
        ep.workspace_floats = workspace_floats;
        py::gil_scoped_release release;
        family::run_config(idx, splits, ta, tb, m_, n, k, alpha, ptr<const float>(a), lda,
                           ptr<const float>(b), ldb, beta, ptr<float>(c), ldc, ep,
                           reinterpret_cast<cudaStream_t>(stream));
    });

    m.def("set_gemm_table", [](int device, const std::vector<EntryTuple>& entries) {
        std::vector<family::TableEntry> out;
        for (const EntryTuple& t : entries) {
            family::TableEntry e;
            e.precision = std::get<0>(t);
            e.trans_a = std::get<1>(t);
            e.trans_b = std::get<2>(t);
            e.mb = std::get<3>(t);
            e.nb = std::get<4>(t);
            e.kb = std::get<5>(t);
            e.config = family::find_config(std::get<6>(t));
            FASTMLP_CHECK(e.config >= 0, "set_gemm_table: unknown configuration '" << std::get<6>(t) << "'");
            e.splits = std::get<7>(t);
            out.push_back(e);
        }
        family::set_table(device, out);
    });

    m.def("gemm_table", [](int device) {
        std::vector<EntryTuple> out;
        for (const family::TableEntry& e : family::get_table(device)) out.push_back(to_tuple(e));
        return out;
    });

    m.def("gemm_dispatch", [](int device, int precision, bool ta, bool tb, int64_t m_, int64_t n,
                              int64_t k) -> py::object {
        family::TableEntry e;
        if (!family::lookup(device, static_cast<Precision>(precision), ta, tb, m_, n, k, &e))
            return py::none();
        return py::make_tuple(family::configs()[e.config].name, e.splits);
    });

    m.def("gemm_workspace_floats", [](int device, int precision, bool ta, bool tb, int64_t m_,
                                      int64_t n, int64_t k) {
        return family::dispatch_workspace_floats(device, static_cast<Precision>(precision), ta, tb,
                                                 m_, n, k);
    });
    m.def("gemm_config_workspace_floats", &family::workspace_floats);
    m.def("gemm_size_bucket", &family::size_bucket);
}

}  // namespace cuda
}  // namespace fastmlp
