// Python bindings of regkern._C (pybind11 only: no torch headers; tensors
// arrive as raw addresses, validated on the Python side; each entry point
// checks its metadata table itself, table_check.h).
#include <pybind11/pybind11.h>

#include <cstdint>
#include <iterator>

#include "adam.h"
#include "admm.h"
#include "common/dtype.h"
#include "common/isa.h"
#include "rda.h"
#include "sgd.h"
#include "adam_table.h"
#include "admm_table.h"
#include "rda_table.h"
#include "sgd_table.h"
#include "table_check.h"

namespace py = pybind11;

namespace {
// SUPPORTED_TERMS of the sgd kernel (sgd_kernel.h, each tested in tests/backends/test_sgd_cpp.py).
constexpr const char* kSgdSupportedTerms[] = {"l1", "polar", "admm", "prox", "clamp"};
// ADAM_TERMS: the same terms in the adam kernel (adam_kernel.h, tests/backends/test_adam_cpp.py).
constexpr const char* kAdamSupportedTerms[] = {"l1", "polar", "admm", "prox", "clamp"};

template <std::size_t N>
py::tuple str_tuple(const char* const (&items)[N]) {
  py::tuple out(N);
  for (std::size_t i = 0; i < N; ++i) out[i] = py::str(items[i]);
  return out;
}

// Refuse a table built for another column layout than this build's (every
// entry point takes the table's column count for this check).
void check_fields(const char* family, int got, int expected) {
  if (got != expected)
    throw py::value_error(std::string("the ") + family + " table has " + std::to_string(got) +
                          " columns, this build of regkern._C expects " + std::to_string(expected) +
                          "; rebuild with `pip install -e .`");
}

// A table layout's column names as a Python tuple.
py::tuple names_tuple(const char* const* names, int count) {
  py::tuple out(count);
  for (int i = 0; i < count; ++i) out[i] = py::str(names[i]);
  return out;
}
}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "regkern C++ CPU kernels (fused multi-tensor optimizer steps).";

  // regkern::TableError (table_check.h) -> regkern._C.TableError, a
  // ValueError whose `row` and `column` name the refused table entry.
  static py::handle table_error = PyErr_NewExceptionWithDoc(
      "regkern._C.TableError",
      "A kernel refused its metadata table before writing anything; `row` is the table row "
      "(the tensor's index in the table) and `column` the column name.",
      PyExc_ValueError, nullptr);
  m.attr("TableError") = table_error;
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const regkern::TableError& e) {
      py::object error = py::reinterpret_borrow<py::object>(table_error)(e.what());
      error.attr("row") = e.row();
      error.attr("column") = e.column();
      PyErr_SetObject(table_error.ptr(), error.ptr());
    }
  });

  m.def(
      "sgd_step",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, double lr, double momentum, double dampening,
         bool nesterov, double weight_decay, bool maximize, double grad_scale, int num_threads) {
        check_fields("sgd", num_fields, regkern::sgd_col::NUM_FIELDS);
        py::gil_scoped_release release;
        regkern::sgd_step(reinterpret_cast<const int64_t*>(table_ptr), num_tensors, lr, momentum,
                          dampening, nesterov, weight_decay, maximize, grad_scale, num_threads);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("lr"), py::arg("momentum"),
      py::arg("dampening"), py::arg("nesterov"), py::arg("weight_decay"), py::arg("maximize"),
      py::arg("grad_scale"), py::arg("num_threads"),
      "One fused SGD step over every tensor of the int64 metadata table at `table_ptr` "
      "([num_tensors, len(SGD_FIELDS)], see regkern.backends.sgd.build_sgd_table). The table is "
      "checked before anything is written (TableError names a refused row and column).");

  m.def(
      "adam_step",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, double lr, double beta1, double beta2, double eps,
         double weight_decay, double decay, bool amsgrad, bool maximize, bool coupled, double grad_scale,
         int num_threads) {
        check_fields("adam", num_fields, regkern::adam_col::NUM_FIELDS);
        py::gil_scoped_release release;
        regkern::adam_step(reinterpret_cast<const int64_t*>(table_ptr), num_tensors, lr, beta1, beta2, eps,
                           weight_decay, decay, amsgrad, maximize, coupled, grad_scale, num_threads);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("lr"), py::arg("beta1"),
      py::arg("beta2"),
      py::arg("eps"), py::arg("weight_decay"), py::arg("decay"), py::arg("amsgrad"), py::arg("maximize"),
      py::arg("coupled"), py::arg("grad_scale"), py::arg("num_threads"),
      "One fused Adam / AdamW step (regkern.reference.adam_step) over every tensor of the int64 "
      "metadata table at `table_ptr` ([num_tensors, len(ADAM_FIELDS)], see "
      "regkern.backends.adam.build_adam_table); increments every STEP. The table is checked before "
      "anything is written (TableError names a refused row and column).");

  m.def("_adam_sqrt", [] { return regkern::detail::torch_vml_sqrt() != nullptr ? "mkl" : "ieee"; },
        "The fp32 sqrt adam_step uses, torch's own (testing): 'mkl' (MKL's vmsSqrt found in the "
        "loaded libtorch_cpu, as torch's CPU sqrt uses it) or 'ieee' (correctly rounded).");

  m.def("isa", &regkern::active_isa,
        "Instruction-set variant the kernels run: 'avx512f', 'avx2' or 'default'.");

  m.def("_available_isas", [] {
    const char* names[8];
    const int n = regkern::available_isas(names, 8);
    py::list out;
    for (int i = 0; i < n; ++i) out.append(names[i]);
    return out;
  }, "Variants this CPU can run, best first (testing).");

  m.def("_set_isa", [](const std::string& name) {
    if (!regkern::set_isa(name.c_str()))
      throw py::value_error("ISA variant '" + name + "' is unknown or not supported by this CPU");
  }, py::arg("name"), "Force a variant (testing); see _available_isas().");

  m.def("_to_f32", [](int dtype, int64_t src, int64_t dst, int64_t n) {
    regkern::convert_to_f32(dtype, reinterpret_cast<const uint16_t*>(src), reinterpret_cast<float*>(dst), n);
  }, py::arg("dtype"), py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("n"),
     "Convert n bf16 (dtype 1) or f16 (dtype 2) values to fp32 with the kernels' code (testing).");

  m.def("_from_f32", [](int dtype, int64_t src, int64_t dst, int64_t n) {
    regkern::convert_from_f32(dtype, reinterpret_cast<const float*>(src), reinterpret_cast<uint16_t*>(dst), n);
  }, py::arg("dtype"), py::arg("src_ptr"), py::arg("dst_ptr"), py::arg("n"),
     "Round n fp32 values to bf16 (dtype 1) or f16 (dtype 2) with the kernels' code (testing).");

  m.def(
      "rda_step",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, bool maximize, double grad_scale,
         int num_threads) {
        check_fields("rda", num_fields, regkern::rda_col::NUM_FIELDS);
        py::gil_scoped_release release;
        regkern::rda_step(reinterpret_cast<const int64_t*>(table_ptr), num_tensors, maximize, grad_scale,
                          num_threads);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("maximize"),
      py::arg("grad_scale"), py::arg("num_threads"),
      "One fused RDA step (docs/rda.md) over every tensor of the int64 metadata table at `table_ptr` "
      "([num_tensors, num_fields], see regkern.backends.rda.build_rda_table). The table is "
      "checked before anything is written (TableError names a refused row and column).");

  m.def(
      "admm_scores",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, int num_threads) {
        check_fields("zu", num_fields, regkern::zu_col::NUM_FIELDS);
        py::gil_scoped_release release;
        regkern::admm_scores(reinterpret_cast<const int64_t*>(table_ptr), num_tensors, num_threads);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("num_threads"),
      "Score pass of the classic ADMM Z/U update (docs/admm.md) over the int64 zu table at `table_ptr` "
      "([num_tensors, num_fields], see regkern.backends.admm.build_zu_table): |W + U| of top-k "
      "element tensors, float64 row sums of (W + U)^2 of top-k row tensors. The table is "
      "checked before anything is written (TableError).");

  m.def(
      "admm_select",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, int num_threads) {
        check_fields("zu", num_fields, regkern::zu_col::NUM_FIELDS);
        py::gil_scoped_release release;
        regkern::admm_select(reinterpret_cast<int64_t*>(table_ptr), num_tensors, num_threads);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("num_threads"),
      "Selection of the classic ADMM Z/U update after admm_scores: exactly KEEP entries (rows) of "
      "each scored tensor, ties by lowest index; writes THRESHOLD and CUT into the table (elements) "
      "or the ROW_KEEP flags (rows). The table is checked before anything is written (TableError).");

  m.def(
      "admm_zu",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, int num_threads) {
        check_fields("zu", num_fields, regkern::zu_col::NUM_FIELDS);
        py::gil_scoped_release release;
        regkern::admm_zu(reinterpret_cast<const int64_t*>(table_ptr), num_tensors, num_threads);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("num_threads"),
      "Update pass of the classic ADMM Z/U update (docs/admm.md) over the zu table: Z, U and Z - U in "
      "one pass. The table is checked before anything is written (TableError).");

  m.def(
      "sas_admm_step",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, int num_threads) {
        check_fields("sas", num_fields, regkern::sas_col::NUM_FIELDS);
        py::gil_scoped_release release;
        regkern::sas_admm_step(reinterpret_cast<const int64_t*>(table_ptr), num_tensors, num_threads);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("num_threads"),
      "One SAS-ADMM step (docs/admm.md) over the int64 sas table at `table_ptr` (see "
      "regkern.backends.admm.build_sas_table). The table is checked before anything is written (TableError).");

  // The tables' checks alone, for callers that must refuse before writing
  // anything else (the entry points above make them anyway).
  m.def(
      "check_sgd_table",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, double momentum) {
        check_fields("sgd", num_fields, regkern::sgd_col::NUM_FIELDS);
        regkern::sgd_check_table(reinterpret_cast<const int64_t*>(table_ptr), num_tensors, momentum);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("momentum"),
      "Raise TableError (a ValueError naming the row, the column and the value) where sgd_step would "
      "refuse the table for a step with this momentum; writes nothing.");
  m.def(
      "check_adam_table",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields, bool amsgrad) {
        check_fields("adam", num_fields, regkern::adam_col::NUM_FIELDS);
        regkern::adam_check_table(reinterpret_cast<const int64_t*>(table_ptr), num_tensors, amsgrad);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"), py::arg("amsgrad"),
      "Raise TableError (a ValueError naming the row, the column and the value) where adam_step would "
      "refuse the table for a step with this amsgrad; writes nothing.");
  m.def(
      "check_rda_table",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields) {
        check_fields("rda", num_fields, regkern::rda_col::NUM_FIELDS);
        regkern::rda_check_table(reinterpret_cast<const int64_t*>(table_ptr), num_tensors);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"),
      "Raise TableError where rda_step would refuse the table; writes nothing.");
  m.def(
      "check_zu_table",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields) {
        check_fields("zu", num_fields, regkern::zu_col::NUM_FIELDS);
        regkern::admm_check_zu_table(reinterpret_cast<const int64_t*>(table_ptr), num_tensors);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"),
      "Raise TableError where admm_scores, admm_select and admm_zu would refuse the table; writes nothing.");
  m.def(
      "check_sas_table",
      [](int64_t table_ptr, int64_t num_tensors, int num_fields) {
        check_fields("sas", num_fields, regkern::sas_col::NUM_FIELDS);
        regkern::admm_check_sas_table(reinterpret_cast<const int64_t*>(table_ptr), num_tensors);
      },
      py::arg("table_ptr"), py::arg("num_tensors"), py::arg("num_fields"),
      "Raise TableError where sas_admm_step would refuse the table; writes nothing.");

  m.attr("SGD_FIELDS") = names_tuple(regkern::sgd_col::NAMES, regkern::sgd_col::NUM_FIELDS);
  m.attr("ADAM_FIELDS") = names_tuple(regkern::adam_col::NAMES, regkern::adam_col::NUM_FIELDS);
  m.attr("RDA_FIELDS") = names_tuple(regkern::rda_col::NAMES, regkern::rda_col::NUM_FIELDS);
  m.attr("ZU_FIELDS") = names_tuple(regkern::zu_col::NAMES, regkern::zu_col::NUM_FIELDS);
  m.attr("SAS_FIELDS") = names_tuple(regkern::sas_col::NAMES, regkern::sas_col::NUM_FIELDS);

  // Regularizer terms sgd_step computes (names of regkern.terms.TERM_KEYWORDS);
  // regkern.backends steps tensors with other terms by the reference.
  py::tuple terms(std::size(kSgdSupportedTerms));
  for (std::size_t i = 0; i < std::size(kSgdSupportedTerms); ++i) terms[i] = py::str(kSgdSupportedTerms[i]);
  m.attr("SGD_TERMS") = terms;
  // Regularizer terms adam_step computes (same names).
  m.attr("ADAM_TERMS") = str_tuple(kAdamSupportedTerms);
}
