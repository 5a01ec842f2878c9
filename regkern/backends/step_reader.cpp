// The per-step reads of a fused optimizer step, in C++ against the installed
// torch (regkern/backends/step_reader.py builds it on first use).
//
// A cached step plan (regkern/optim/plan_cache.py) is reused while its param
// group holds the same parameters, with the same storage, and gradients of
// the recorded shape, dtype and layout. Checking that in Python costs six
// torch attribute reads per tensor (about 0.7 us each); here it is a few
// nanoseconds. read() checks everything first and only then writes each
// gradient's address into the plan's metadata tables, so a refused read
// leaves the tables as they were for the Python path to take over.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <vector>

namespace py = pybind11;

namespace {

struct StepReader {
  std::vector<py::object> group;      // the param group's list as the plan saw it
  std::vector<bool> stepped;          // whether group[i] had a gradient (the plan steps it)
  std::vector<void*> storage;         // data_ptr of each stepped parameter
  std::vector<c10::ScalarType> dtypes;
  std::vector<std::vector<int64_t>> sizes, strides;
  std::vector<int64_t*> slots;        // the table cell each stepped gradient's address goes to
  std::vector<at::Tensor> stepped_params;
  bool contiguous_only;               // true: gradients must be contiguous, else have `strides`
  std::vector<void*> found;           // scratch: this read's gradient addresses

  // group: the group's parameters; has_grad: which of them the plan steps;
  // slots: for each stepped one, the address (int) of its table cell;
  // contiguous_only: the plan's layout rule (see TablePlan.checked_grads).
  StepReader(const py::list& params, const std::vector<bool>& has_grad, const std::vector<int64_t>& cells,
             bool contiguous)
      : stepped(has_grad), contiguous_only(contiguous) {
    if (has_grad.size() != params.size()) throw std::invalid_argument("one has_grad flag per parameter");
    for (size_t i = 0; i < params.size(); ++i) {
      PyObject* o = params[i].ptr();
      if (!THPVariable_Check(o)) throw std::invalid_argument("parameters must be tensors");
      group.push_back(py::reinterpret_borrow<py::object>(o));
      if (!has_grad[i]) continue;
      const at::Tensor& p = THPVariable_Unpack(o);
      stepped_params.push_back(p);
      storage.push_back(p.data_ptr());
      dtypes.push_back(p.scalar_type());
      sizes.emplace_back(p.sizes().begin(), p.sizes().end());
      strides.emplace_back(p.strides().begin(), p.strides().end());
    }
    if (cells.size() != storage.size()) throw std::invalid_argument("one table cell per stepped parameter");
    for (int64_t c : cells) slots.push_back(reinterpret_cast<int64_t*>(c));
    found.resize(storage.size());
  }

  bool same_gradient(const at::Tensor& g, size_t k) const {
    if (!g.defined() || g.layout() != c10::kStrided || !g.has_storage() || g.scalar_type() != dtypes[k])
      return false;
    if (g.sizes() != c10::IntArrayRef(sizes[k])) return false;
    return contiguous_only ? g.is_contiguous() : g.strides() == c10::IntArrayRef(strides[k]);
  }

  // True when `params` is the recorded group (same objects, same storage,
  // the same parameters with gradients, each of the recorded shape, dtype
  // and layout); the gradients' addresses are then in the tables.
  bool read(const py::list& params) {
    const size_t n = group.size();
    if (static_cast<size_t>(PyList_GET_SIZE(params.ptr())) != n) return false;
    size_t k = 0;
    for (size_t i = 0; i < n; ++i) {
      PyObject* o = PyList_GET_ITEM(params.ptr(), i);
      if (o != group[i].ptr()) return false;
      const at::Tensor& p = THPVariable_Unpack(o);
      const at::Tensor& g = p.grad();
      if (!stepped[i]) {
        if (g.defined()) return false;
        continue;
      }
      if (!p.has_storage() || p.data_ptr() != storage[k] || !same_gradient(g, k)) return false;
      found[k++] = g.data_ptr();
    }
    for (size_t j = 0; j < k; ++j) *slots[j] = reinterpret_cast<int64_t>(found[j]);
    return true;
  }

  // After the kernels wrote the stepped parameters through raw pointers:
  // advance their version counters, as an in-place torch op would.
  void bump_versions() const {
    for (const at::Tensor& p : stepped_params) torch::autograd::impl::bump_version(p);
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<StepReader>(m, "StepReader")
      .def(py::init<const py::list&, const std::vector<bool>&, const std::vector<int64_t>&, bool>())
      .def("read", &StepReader::read)
      .def("bump_versions", &StepReader::bump_versions);
}
