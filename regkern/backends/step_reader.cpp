// The per-step reads of a fused optimizer step, in C++ against the installed
// torch (regkern/backends/step_reader.py builds it on first use).
//
// A cached step plan (regkern/optim/plan_cache.py) is reused while its param
// group holds the same parameters, with the same storage, and gradients of
// the recorded shape, dtype and layout. Checking that in Python takes six
// torch attribute reads per tensor (about 0.6 us of step time); here about
// 30 ns (benchmarks/step_overhead.py).
// read() checks everything first and only then writes each gradient's
// address into the plan's metadata tables, so a refused read leaves the
// tables as they were for the Python path to take over.
//
// References: the reader holds no reference to the parameters (the plan
// keeps them, in Python lists the garbage collector sees, for as long as the
// reader lives); it holds the gradients it read from read() until release(),
// so a gradient replaced or dropped between the read and the kernels (a
// regularizer hook, another thread) stays alive while the kernels use it.
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/autograd/variable.h>

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <vector>

namespace py = pybind11;

namespace {

struct StepReader {
  std::vector<PyObject*> group;       // borrowed: the param group's members as the plan saw them
  std::vector<bool> stepped;          // whether group[i] had a gradient (the plan steps it)
  std::vector<void*> storage;         // data_ptr of each stepped parameter
  std::vector<c10::ScalarType> dtypes;
  std::vector<std::vector<int64_t>> sizes, strides;
  std::vector<int64_t*> slots;        // the table cell each stepped gradient's address goes to
  bool contiguous_only;               // true: gradients must be contiguous, else have `strides`
  std::vector<const at::Tensor*> found;  // scratch: this read's gradients
  std::vector<at::Tensor> held;       // the gradients of the last accepted read, until release()

  // params: the group's members (kept alive by the caller for the reader's
  // lifetime); has_grad: which of them the plan steps; cells: for each
  // stepped one, the address (int) of its table cell; contiguous: the
  // plan's layout rule (TablePlan.checked_grads).
  StepReader(const py::list& params, const std::vector<bool>& has_grad, const std::vector<int64_t>& cells,
             bool contiguous)
      : stepped(has_grad), contiguous_only(contiguous) {
    if (has_grad.size() != params.size()) throw std::invalid_argument("one has_grad flag per parameter");
    for (size_t i = 0; i < params.size(); ++i) {
      PyObject* o = params[i].ptr();
      if (!THPVariable_Check(o)) throw std::invalid_argument("parameters must be tensors");
      group.push_back(o);
      if (!has_grad[i]) continue;
      const at::Tensor& p = THPVariable_Unpack(o);
      storage.push_back(p.data_ptr());
      dtypes.push_back(p.scalar_type());
      sizes.emplace_back(p.sizes().begin(), p.sizes().end());
      strides.emplace_back(p.strides().begin(), p.strides().end());
    }
    if (cells.size() != storage.size()) throw std::invalid_argument("one table cell per stepped parameter");
    for (int64_t c : cells) slots.push_back(reinterpret_cast<int64_t*>(c));
    found.resize(storage.size());
    held.reserve(storage.size());
  }

  bool same_gradient(const at::Tensor& g, size_t k) const {
    if (!g.defined() || g.layout() != c10::kStrided || !g.has_storage() || g.scalar_type() != dtypes[k])
      return false;
    if (g.sizes() != c10::IntArrayRef(sizes[k])) return false;
    return contiguous_only ? g.is_contiguous() : g.strides() == c10::IntArrayRef(strides[k]);
  }

  // True when `params` is a list holding the recorded group (same objects,
  // same storage, the same members with gradients, each of the recorded
  // shape, dtype and layout); the gradients' addresses are then in the
  // tables and the gradients held until release().
  bool read(const py::handle& params) {
    held.clear();  // first: dropping a gradient may run Python code, which must not run below
    PyObject* list = params.ptr();
    if (!PyList_CheckExact(list)) return false;
    const size_t n = group.size();
    if (static_cast<size_t>(PyList_GET_SIZE(list)) != n) return false;
    size_t k = 0;
    for (size_t i = 0; i < n; ++i) {
      PyObject* o = PyList_GET_ITEM(list, i);
      if (o != group[i]) return false;
      const at::Tensor& p = THPVariable_Unpack(o);
      const at::Tensor& g = p.grad();
      if (!stepped[i]) {
        if (g.defined()) return false;
        continue;
      }
      if (!p.has_storage() || p.data_ptr() != storage[k] || !same_gradient(g, k)) return false;
      found[k++] = &g;  // (no Python code runs before the loop below: the reference stays valid)
    }
    for (size_t j = 0; j < k; ++j) {
      held.push_back(*found[j]);
      *slots[j] = reinterpret_cast<int64_t>(found[j]->data_ptr());
    }
    return true;
  }

  // Drop the gradients of the last read (after the kernels ran, or when the
  // step stopped before them).
  void release() { held.clear(); }

  // After the kernels wrote the stepped parameters through raw pointers:
  // advance their version counters, as an in-place torch op would (as
  // torch.autograd.graph.increment_version: inference tensors have none).
  void bump_versions() const {
    for (size_t i = 0; i < group.size(); ++i) {
      if (!stepped[i]) continue;
      const at::Tensor& p = THPVariable_Unpack(group[i]);
      if (!p.is_inference()) torch::autograd::impl::bump_version(p);
    }
  }
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  py::class_<StepReader>(m, "StepReader", py::module_local())
      .def(py::init<const py::list&, const std::vector<bool>&, const std::vector<int64_t>&, bool>())
      .def("read", &StepReader::read)
      .def("release", &StepReader::release)
      .def("bump_versions", &StepReader::bump_versions);
}
