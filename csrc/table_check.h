// Checks of the metadata tables the kernel families read (sgd, rda, admm).
//
// Every entry point validates its whole table before it writes anything: a
// value the kernels do not know (a kind, a flag, a dtype code), sizes that do
// not agree, a pointer a kind requires that is missing, a coefficient that is
// not finite. It throws TableError, a std::invalid_argument (so pybind11
// raises a ValueError; regkern._C raises its subclass regkern._C.TableError,
// whose `row` and `column` attributes name the table row and column) with one
// sentence naming the table row, the column and the value. The checks read
// only table metadata and per-row coefficient vectors, never W-sized data.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <stdexcept>
#include <string>

#include "common/dtype.h"

namespace regkern {

class TableError : public std::invalid_argument {
 public:
  TableError(const std::string& message, int64_t row, const char* column)
      : std::invalid_argument(message), row_(row), column_(column) {}
  int64_t row() const { return row_; }
  const char* column() const { return column_; }

 private:
  int64_t row_;
  const char* column_;  // a NAMES entry of the table's layout (static storage)
};

namespace table_check {

// A float64 as text: the shortest form that reads back the same value,
// with a ".0" on whole numbers (like Python's repr of a float).
inline std::string float_text(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(buf, sizeof buf, "%.*g", digits, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string text = buf;
  if (text.find_first_of(".e") == std::string::npos) text += ".0";
  return text;
}

// An fp32 that is neither NaN nor infinite (by its bits: safe under any
// floating-point flags).
inline bool finite_f32(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof u);
  return (u & 0x7F800000u) != 0x7F800000u;
}

// One row of a table under check.
class Row {
 public:
  // family: "sgd", "rda", "zu" or "sas"; builder: the Python function that
  // builds such tables; names: the layout's column names.
  Row(const char* family, const char* builder, const char* const* names, const int64_t* row, int64_t index)
      : family_(family), builder_(builder), names_(names), row_(row), index_(index) {}

  int64_t operator[](int col) const { return row_[col]; }
  double as_double(int col) const { return float_column(row_[col]); }

  // Throw: "<family> table row <i> has <COLUMN> = <value>, <problem>; <remedy>."
  [[noreturn]] void refuse(int col, const std::string& value, const std::string& problem,
                           const std::string& remedy = std::string()) const {
    const std::string fix = remedy.empty() ? std::string("rebuild the table with ") + builder_ : remedy;
    throw TableError(std::string(family_) + " table row " + std::to_string(index_) + " has " + names_[col] +
                         " = " + value + ", " + problem + "; " + fix + ".",
                     index_, names_[col]);
  }
  [[noreturn]] void refuse(int col, const std::string& problem) const {
    refuse(col, std::to_string(row_[col]), problem);
  }

  // The column holds one of `allowed` (`meaning` lists them for the message).
  void one_of(int col, std::initializer_list<int64_t> allowed, const char* meaning) const {
    for (int64_t a : allowed)
      if (row_[col] == a) return;
    refuse(col, std::string("which this build of regkern._C does not know (it takes ") + meaning + ")");
  }
  void flag(int col) const { one_of(col, {0, 1}, "0 or 1"); }
  void dtype(int col) const {
    one_of(col, {kDtypeF32, kDtypeBF16, kDtypeF16}, "0 float32, 1 bfloat16, 2 float16");
  }
  void non_negative(int col) const {
    if (row_[col] < 0) refuse(col, "but sizes cannot be negative");
  }
  // A pointer that must be set when `needed` (`why`: what needs it). The
  // checks run for every row of every call: text is built only on a refusal.
  void present(int col, bool needed, const char* why) const {
    if (needed && row_[col] == 0) refuse(col, std::string("but ") + why + " needs it");
  }
  // ... needed by the kind in column `kind` ("but MASK_KIND 1 needs it").
  void present_for(int col, bool needed, int kind) const {
    if (needed && row_[col] == 0)
      refuse(col, std::string("but ") + names_[kind] + " " + std::to_string(row_[kind]) + " needs it");
  }
  // A pointer that must be absent when `unused` (it would be ignored).
  void absent(int col, bool unused, const char* why) const {
    if (unused && row_[col] != 0) refuse(col, std::string("but ") + why + ", so it would be ignored");
  }
  // NUMEL == ROWS * ROW_LEN, all non-negative (ROWS == 0: no elements).
  void rows_cover(int numel, int rows, int row_len) const {
    non_negative(numel);
    non_negative(rows);
    non_negative(row_len);
    const int64_t n = row_[numel], r = row_[rows], len = row_[row_len];
    const bool ok = r == 0 ? n == 0 && len == 0 : n % r == 0 && n / r == len;
    if (!ok)
      refuse(numel, std::to_string(n), "but ROWS * ROW_LEN is " + std::to_string(r) + " * " + std::to_string(len));
  }
  // Every fp32 of vector[0, n) (column `col`) is finite.
  void finite(int col, const float* v, int64_t n) const {
    // count the entries whose exponent is all ones (a branch-free sum of
    // compares: vectorizes on the baseline ISA), locate one only on failure
    // (in pieces of 2^20 entries: the count cannot wrap)
    uint32_t bad = 0;
    for (int64_t j0 = 0; j0 < n && bad == 0; j0 += int64_t{1} << 20) {
      const int64_t j1 = n - j0 < (int64_t{1} << 20) ? n : j0 + (int64_t{1} << 20);
      for (int64_t j = j0; j < j1; ++j) {
        uint32_t u;
        std::memcpy(&u, v + j, sizeof u);
        bad += (u & 0x7F800000u) == 0x7F800000u;
      }
    }
    if (bad == 0) return;
    int64_t j = 0;
    while (finite_f32(v[j])) ++j;
    throw TableError(std::string(family_) + " table row " + std::to_string(index_) + " has " +
                         float_text(v[j]) + " at entry " + std::to_string(j) + " of its " + names_[col] +
                         " vector; set that tensor's regularization coefficients to finite values.",
                     index_, names_[col]);
  }

 private:
  const char* family_;
  const char* builder_;
  const char* const* names_;
  const int64_t* row_;
  int64_t index_;
};

}  // namespace table_check
}  // namespace regkern
