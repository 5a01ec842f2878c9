"""The kernels refuse a metadata table they cannot step, before writing anything.

Tables come from the Python builders (regkern.backends.sgd.build_sgd_table, the
rda and admm equivalents) with one bad value patched in (or one non-finite
coefficient written into a per-row vector). Each C++ entry point and each
Triton launch wrapper (under TRITON_INTERPRET=1 without a GPU) must raise a
ValueError of one sentence naming the table row, the column and the value,
and leave every tensor and the table bit-identical.
"""
import math

import pytest
import torch

from regkern.layouts import SGD_COLUMN, float_bits
from regkern.backends.sgd import build_sgd_table
from regkern.backends.admm import MODE_ELEMENT, MODE_ROWS, MODE_SOFT, SAS_COLUMN, ZU_COLUMN, build_sas_table, build_zu_table
from regkern.backends.rda import RDA_COLUMN, build_rda_table, write_step

pytestmark = pytest.mark.usefixtures("one_thread")


def _C():
    return pytest.importorskip("regkern._C", reason="the C++ extension is not built (pip install -e .)")


def _bits(t):
    """A tensor's bytes (NaN payloads included) for bit-for-bit comparison."""
    return t.detach().contiguous().view(torch.uint8).clone()


def snapshot(tensors):
    return [_bits(t) for t in tensors]


def assert_unchanged(tensors, before):
    for i, (t, b) in enumerate(zip(tensors, before)):
        assert torch.equal(_bits(t), b), f"tensor {i} ({t.dtype} {tuple(t.shape)}) was written by a refused call"


def refused(call, tensors, pattern, row, column):
    """``call()`` raises a one-sentence ValueError matching ``pattern``,
    naming ``row`` and ``column``, and writes none of ``tensors``."""
    before = snapshot(tensors)
    with pytest.raises(ValueError, match=pattern) as info:
        call()
    message = str(info.value)
    assert message.endswith(".") and message.count(". ") == 0 and "\n" not in message, message
    assert f"table row {row} has " in message and column in message, message
    assert (info.value.row, info.value.column) == (row, column)
    assert_unchanged(tensors, before)


# ============================================================================ sgd

class SGDCase:
    """Two tensors with every table feature: momentum buffers, row lambdas,
    row masks, norms, L1, polarization, prox (group lasso on tensor 1),
    clamp and column lambdas."""

    def __init__(self, dtype=torch.float32):
        g = torch.Generator().manual_seed(0)
        shapes = [(4, 3), (5, 2, 2)]
        self.params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.bufs = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.lams = [torch.rand(s[0], generator=g) for s in shapes]
        self.masks = [torch.tensor([True, False] * (s[0] // 2) + [True] * (s[0] % 2)) for s in shapes]
        self.norms = [torch.zeros(s[0], 3) for s in shapes]
        self.l1s = [torch.rand(s[0], generator=g) for s in shapes]
        self.polars = [torch.tensor([0.1, 0.5, 0.2, 0.0]) for _ in shapes]
        self.prox_lams = [torch.rand(s[0], generator=g) for s in shapes]
        self.lam_cols = [torch.rand(s[1], generator=g) for s in shapes]
        self.dtype = dtype

    def table(self):
        return build_sgd_table(self.params, self.grads, self.bufs, self.lams, self.masks, self.norms,
                               [False, False], l1s=self.l1s, polars=self.polars, prox_kinds=[1, 2],
                               prox_lams=self.prox_lams, clamps=[(-1.0, 1.0), (-2.0, 2.0)],
                               lam_cols=self.lam_cols)

    def tensors(self):
        return [*self.params, *self.grads, *self.bufs, *self.lams, *self.masks, *self.norms, *self.l1s,
                *self.polars, *self.prox_lams, *self.lam_cols]


def cpp_sgd(table, momentum=0.9):
    _C().sgd_step(table.data_ptr(), *table.shape, 0.1, momentum, 0.0, False, 0.0, False, 1.0, 1)


C = SGD_COLUMN
# (column, value, what the message says), patched into row 1
SGD_BAD_VALUES = [
    ("PROX", 7, "PROX = 7, which .* not (know|implement) .*0 none, 1 element L1, 2 group lasso"),
    ("PROX", -1, "PROX = -1, which"),
    ("MASK_KIND", 3, "MASK_KIND = 3, which"),
    ("LAM_KIND", 5, "LAM_KIND = 5, which"),
    ("DTYPE", 3, "DTYPE = 3, which"),
    ("CLAMP", 2, "CLAMP = 2, which .* 0 or 1"),
    ("FIRST", -1, "FIRST = -1, which .* 0 or 1"),
    ("NUMEL", -20, "NUMEL = -20, but sizes cannot be negative"),
    ("ROWS", -5, "ROWS = -5, but sizes cannot be negative"),
    ("NUMEL", 21, r"NUMEL = 21, but ROWS \* ROW_LEN is 5 \* 4"),
    ("ROW_LEN", 3, r"NUMEL = 20, but ROWS \* ROW_LEN is 5 \* 3"),
    ("COLS", -2, "COLS = -2, but sizes cannot be negative"),
    ("COL_LEN", 3, "COL_LEN = 3, but ROW_LEN / COLS is 4 / 2"),
    ("COLS", 3, "COL_LEN = 2, but ROW_LEN / COLS is 4 / 3"),
    ("PARAM", 0, "PARAM = 0, but a tensor with elements needs it"),
    ("GRAD", 0, "GRAD = 0, but a tensor with elements needs it"),
    ("BUF", 0, "BUF = 0, but a step with momentum needs it"),
    ("MASK", 0, "MASK = 0, but MASK_KIND 1 needs it"),
    ("LAM", 0, "LAM = 0, but LAM_KIND 1 needs it"),
    ("PROX_LAM", 0, "PROX_LAM = 0, but PROX 2 needs it"),
    ("LAM_COLS", 0, "LAM_COLS = 0, but COLS 2 needs it"),
]


def _ids(cases):
    """Test ids: the patched column and value (row first where there is one)."""
    return ["-".join(str(x) for x in case[:-1]) for case in cases]


def _patch(table, column, value, row=1):
    table[row, C[column] if column in C else column] = value
    return table


def _column_named(column, pattern):
    """The column a message names (the patched one, or the one it disagrees with)."""
    return pattern.split(" = ")[0].split()[-1] if " = " in pattern else column


@pytest.mark.parametrize("column, value, pattern", SGD_BAD_VALUES, ids=_ids(SGD_BAD_VALUES))
def test_cpp_sgd_refuses_a_bad_table_value(column, value, pattern):
    case = SGDCase()
    table = _patch(case.table(), column, value)
    refused(lambda: cpp_sgd(table), case.tensors() + [table], "sgd table row 1 has " + pattern, 1,
            _column_named(column, pattern))


def test_cpp_sgd_refuses_pointers_that_would_be_ignored():
    case = SGDCase()
    for column, kind, pattern in (("MASK", "MASK_KIND", "MASK = .*, but MASK_KIND is 0 .*ignored"),
                                  ("LAM", "LAM_KIND", "LAM = .*, but LAM_KIND is 0 .*ignored")):
        table = _patch(case.table(), kind, 0)
        refused(lambda: cpp_sgd(table), case.tensors() + [table], "sgd table row 1 has " + pattern, 1, column)
    table = _patch(_patch(case.table(), "COLS", 0), "COL_LEN", 0)
    refused(lambda: cpp_sgd(table), case.tensors() + [table], "LAM_COLS = .*, but COLS is 0 .*ignored", 1,
            "LAM_COLS")
    table = _patch(case.table(), "COLS", 0)
    refused(lambda: cpp_sgd(table), case.tensors() + [table], "COL_LEN = 2, but COLS is 0", 1, "COL_LEN")


@pytest.mark.parametrize("lo, hi, column, pattern", [
    (2.0, 1.0, "CLAMP_LO", "CLAMP_LO = 2.0, above CLAMP_HI = 1.0, so the clamp interval is empty"),
    (math.nan, 1.0, "CLAMP_LO", "CLAMP_LO = nan, but a clamp bound cannot be NaN"),
    (-1.0, math.nan, "CLAMP_HI", "CLAMP_HI = nan, but a clamp bound cannot be NaN"),
])
def test_cpp_sgd_refuses_bad_clamp_bounds(lo, hi, column, pattern):
    case = SGDCase()
    table = _patch(_patch(case.table(), "CLAMP_LO", float_bits(lo)), "CLAMP_HI", float_bits(hi))
    refused(lambda: cpp_sgd(table), case.tensors() + [table], pattern, 1, column)


def test_cpp_sgd_ignores_clamp_bounds_without_a_clamp_and_unused_prox_lam():
    """CLAMP 0 leaves the bounds unread; PROX 0 leaves PROX_LAM unread (the
    reference ignores prox_lams of tensors without a prox): both step."""
    case = SGDCase()
    table = _patch(_patch(_patch(case.table(), "CLAMP", 0), "CLAMP_LO", float_bits(math.nan)), "PROX", 0)
    before = snapshot(case.params)
    cpp_sgd(table)
    assert not all(torch.equal(_bits(p), b) for p, b in zip(case.params, before))


@pytest.mark.parametrize("vector, column, at, value", [
    ("lams", "LAM", 2, math.nan),
    ("lam_cols", "LAM_COLS", 1, math.inf),
    ("l1s", "L1", 4, -math.inf),
    ("prox_lams", "PROX_LAM", 0, math.nan),
    ("polars", "POLAR", 0, math.nan),
    ("polars", "POLAR", 1, math.inf),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_sgd_refuses_non_finite_per_row_coefficients(vector, column, at, value, dtype):
    case = SGDCase(dtype)
    getattr(case, vector)[1][at] = value
    table = case.table()
    text = "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    refused(lambda: cpp_sgd(table), case.tensors() + [table],
            f"sgd table row 1 has {text} at entry {at} of its {column} vector; set that tensor's "
            "regularization coefficients to finite values", 1, column)


def test_cpp_sgd_checks_every_row_before_writing_any():
    """A bad value in the last row: the first row is not stepped either."""
    case = SGDCase()
    case.l1s[1][3] = math.nan
    table = case.table()
    refused(lambda: cpp_sgd(table), case.tensors() + [table], "row 1 has nan at entry 3 of its L1", 1, "L1")


def test_cpp_sgd_does_not_read_element_lambdas_or_polar_offsets():
    """The pre-pass reads per-row vectors only: an element LAM (W-sized) and
    POLAR's m and s are not checked (they step to NaN like the reference;
    tensor 1's group lasso turns its NaN rows into zeros)."""
    case = SGDCase()
    case.lams = [torch.full(p.shape, math.nan) for p in case.params]
    case.polars[0][2] = math.nan
    cpp_sgd(case.table())
    assert bool(case.params[0].isnan().all())


# ============================================================================ rda

class RDACase:
    def __init__(self, dtype=torch.float32, triton=False):
        g = torch.Generator().manual_seed(1)
        shapes = [(3, 4), (6, 2)]
        self.params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.gbars = [torch.randn(s, generator=g) for s in shapes]
        self.w0s = [torch.randn(s, generator=g) for s in shapes]
        self.masks = [torch.tensor([True, False, True]), torch.ones(shapes[1], dtype=torch.bool)]
        self.scratch = [None, torch.zeros(6)] if triton else None

    def table(self):
        table = build_rda_table(self.params, self.grads, self.gbars, self.w0s, self.masks, [False, True],
                                self.scratch)
        write_step(table.numpy(), 2.0, 10.0, 0.01)
        return table

    def tensors(self):
        return [*self.params, *self.grads, *self.gbars, *self.w0s, *self.masks,
                *[t for t in self.scratch or [] if t is not None]]


def cpp_rda(table):
    _C().rda_step(table.data_ptr(), table.shape[0], table.shape[1], False, 1.0, 1)


R = RDA_COLUMN
RDA_BAD_VALUES = [
    ("MASK_KIND", 3, "MASK_KIND = 3, which .*0 none, 1 row mask, 2 element mask"),
    ("DTYPE", -1, "DTYPE = -1, which"),
    ("GROUP", 2, "GROUP = 2, which"),
    ("STREAM", 5, "STREAM = 5, which .*0 or 1"),
    ("ROW_LEN", 3, r"NUMEL = 12, but ROWS \* ROW_LEN is 6 \* 3"),
    ("NUMEL", -1, "NUMEL = -1, but sizes cannot be negative"),
    ("GBAR", 0, "GBAR = 0, but a tensor with elements needs it"),
    ("W0", 0, "W0 = 0, but a tensor with elements needs it"),
    ("MASK", 0, "MASK = 0, but MASK_KIND 2 needs it"),
    ("MASK_KIND", 0, "MASK = .*, but MASK_KIND is 0 .*ignored"),
    ("T", float_bits(0.5), "T = 0.5, but the step t counts from 1"),
    ("LAM", float_bits(math.nan), "LAM = nan, but lam must be finite and non-negative"),
    ("LAM", float_bits(-1.0), "LAM = -1.0, but lam must be finite"),
    ("GAMMA", float_bits(0.0), r"GAMMA = 0(\.0)?, but gamma .* must be positive"),
]


@pytest.mark.parametrize("column, value, pattern", RDA_BAD_VALUES, ids=_ids(RDA_BAD_VALUES))
def test_cpp_rda_refuses_a_bad_table_value(column, value, pattern):
    case = RDACase()
    table = case.table()
    table[1, R[column]] = value
    refused(lambda: cpp_rda(table), case.tensors() + [table], "rda table row 1 has " + pattern, 1,
            _column_named(column, pattern))


# ============================================================================ admm

class ZUCase:
    """Tensor 0 keeps 5 of its 12 elements, tensor 1 keeps 2 of its 4 rows,
    tensor 2 takes the soft threshold."""

    def __init__(self, dtype=torch.float32, element_scores=False):
        g = torch.Generator().manual_seed(2)
        shapes = [(3, 4), (4, 3), (2, 5)]
        self.params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.zs = [torch.randn(s, generator=g) for s in shapes]
        self.us = [torch.randn(s, generator=g) for s in shapes]
        self.targets = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.scores = [torch.zeros(12) if element_scores else None, torch.zeros(4, dtype=torch.float64), None]
        self.row_keeps = [None, torch.zeros(4, dtype=torch.bool), None]
        self.modes = [MODE_ELEMENT, MODE_ROWS, MODE_SOFT]
        self.keeps = [5, 2, None]
        self.taus = [None, None, 0.3]

    def table(self):
        return build_zu_table(self.params, self.zs, self.us, self.targets, self.modes, self.keeps, self.taus,
                              self.scores, self.row_keeps)

    def tensors(self):
        return [*self.params, *self.zs, *self.us, *self.targets, *[t for t in self.scores if t is not None],
                self.row_keeps[1]]


Z = ZU_COLUMN
ZU_ENTRIES = ("admm_scores", "admm_select", "admm_zu")
# (row, column, value, pattern)
ZU_BAD_VALUES = [
    (1, "MODE", 3, "MODE = 3, which .*0 top-k elements, 1 top-k rows, 2 soft threshold"),
    (0, "DTYPE", 4, "DTYPE = 4, which"),
    (2, "ROW_LEN", 4, r"NUMEL = 10, but ROWS \* ROW_LEN is 2 \* 4"),
    (0, "Z", 0, "Z = 0, but a tensor with elements needs it"),
    (1, "U", 0, "U = 0, but a tensor with elements needs it"),
    (1, "ROW_KEEP", 0, r"ROW_KEEP = 0, but MODE 1 \(top-k rows\) needs it"),
    (1, "SCORES", 0, "SCORES = 0, but selecting 2 of 4 rows needs it"),
    (1, "KEEP", 5, "KEEP = 5, but MODE 1 keeps between 0 and 4 rows"),
    (0, "KEEP", -1, "KEEP = -1, but MODE 0 keeps between 0 and 12 elements"),
    (0, "CUT", -2, "CUT = -2, but a tie cut lies between -1 and NUMEL = 12"),
    (0, "THRESHOLD", float_bits(math.nan), "THRESHOLD = nan, but a selection threshold cannot be NaN"),
    (2, "THRESHOLD", float_bits(-0.5), "THRESHOLD = -0.5, but the soft-threshold level tau must be finite"),
    (2, "THRESHOLD", float_bits(math.inf), "THRESHOLD = inf, but the soft-threshold level tau must be finite"),
]


@pytest.mark.parametrize("entry", ZU_ENTRIES)
@pytest.mark.parametrize("row, column, value, pattern", ZU_BAD_VALUES, ids=_ids(ZU_BAD_VALUES))
def test_cpp_zu_passes_refuse_a_bad_table_value(entry, row, column, value, pattern):
    case = ZUCase()
    table = case.table()
    table[row, Z[column]] = value
    run = getattr(_C(), entry)
    refused(lambda: run(table.data_ptr(), table.shape[0], table.shape[1], 1), case.tensors() + [table],
            f"zu table row {row} has " + pattern, row, _column_named(column, pattern))


@pytest.mark.parametrize("entry", ZU_ENTRIES)
def test_cpp_zu_passes_refuse_buffers_a_mode_ignores(entry):
    case = ZUCase()
    run = getattr(_C(), entry)
    for row, column, donor, pattern in ((2, "SCORES", 1, r"SCORES = .*, but MODE 2 \(soft threshold\) scores nothing"),
                                        (2, "ROW_KEEP", 1, "ROW_KEEP = .*, but MODE 2 .*keeps no rows"),
                                        (0, "ROW_KEEP", 1, "ROW_KEEP = .*, but MODE 0 .*keeps no rows")):
        table = case.table()
        table[row, Z[column]] = table[donor, Z[column]]
        refused(lambda: run(table.data_ptr(), table.shape[0], table.shape[1], 1), case.tensors() + [table],
                pattern, row, column)


S = SAS_COLUMN


class SASCase:
    def __init__(self, dtype=torch.float32):
        g = torch.Generator().manual_seed(3)
        shapes = [(3, 4), (5,)]
        self.params = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.grads = [torch.randn(s, generator=g).to(dtype) for s in shapes]
        self.state = [[torch.randn(s, generator=g) for s in shapes] for _ in range(5)]

    def table(self):
        table = build_sas_table(self.params, self.grads, *self.state)
        table[:, S["C"]:] = float_bits(0.5)
        return table

    def tensors(self):
        return [*self.params, *self.grads, *[t for ts in self.state for t in ts]]


SAS_BAD_VALUES = [
    ("OUTER", 2, "OUTER = 2, which .*0 or 1"),
    ("DTYPE", 3, "DTYPE = 3, which"),
    ("NUMEL", -5, "NUMEL = -5, but sizes cannot be negative"),
    ("W_BREVE", 0, "W_BREVE = 0, but a tensor with elements needs it"),
    ("GRAD", 0, "GRAD = 0, but a tensor with elements needs it"),
]


@pytest.mark.parametrize("column, value, pattern", SAS_BAD_VALUES, ids=_ids(SAS_BAD_VALUES))
def test_cpp_sas_refuses_a_bad_table_value(column, value, pattern):
    case = SASCase()
    table = case.table()
    table[1, S[column]] = value
    refused(lambda: _C().sas_admm_step(table.data_ptr(), table.shape[0], table.shape[1], 1),
            case.tensors() + [table], "sas table row 1 has " + pattern, 1, column)


def test_cpp_check_entry_points_refuse_like_the_steps_and_write_nothing():
    """check_*_table make a step's checks alone (a caller refuses before it
    writes tensors the reference steps); a good table passes them."""
    C_ = _C()
    sgd = SGDCase()
    good = sgd.table()
    before = snapshot(sgd.tensors() + [good])
    C_.check_sgd_table(good.data_ptr(), *good.shape, 0.9)
    assert_unchanged(sgd.tensors() + [good], before)
    table = _patch(sgd.table(), "PROX", 7)
    refused(lambda: C_.check_sgd_table(table.data_ptr(), *table.shape, 0.0), sgd.tensors() + [table],
            "sgd table row 1 has PROX = 7, which", 1, "PROX")
    table = _patch(sgd.table(), "BUF", 0)
    C_.check_sgd_table(table.data_ptr(), *table.shape, 0.0)  # no momentum: no buffer needed
    refused(lambda: C_.check_sgd_table(table.data_ptr(), *table.shape, 0.5), sgd.tensors() + [table],
            "sgd table row 1 has BUF = 0, but a step with momentum needs it", 1, "BUF")
    rda = RDACase()
    table = rda.table()
    C_.check_rda_table(table.data_ptr(), table.shape[0], table.shape[1])
    table[0, R["MASK_KIND"]] = 3
    refused(lambda: C_.check_rda_table(table.data_ptr(), table.shape[0], table.shape[1]), rda.tensors() + [table],
            "rda table row 0 has MASK_KIND = 3, which", 0, "MASK_KIND")
    zu = ZUCase()
    table = zu.table()
    C_.check_zu_table(table.data_ptr(), table.shape[0], table.shape[1])
    table[2, Z["MODE"]] = 3
    refused(lambda: C_.check_zu_table(table.data_ptr(), table.shape[0], table.shape[1]), zu.tensors() + [table],
            "zu table row 2 has MODE = 3, which", 2, "MODE")
    sas = SASCase()
    table = sas.table()
    C_.check_sas_table(table.data_ptr(), table.shape[0], table.shape[1])
    table[0, S["OUTER"]] = 2
    refused(lambda: C_.check_sas_table(table.data_ptr(), table.shape[0], table.shape[1]), sas.tensors() + [table],
            "sas table row 0 has OUTER = 2, which", 0, "OUTER")
    # every entry point refuses a table of another width than its layout's
    calls = {"sgd": [(C_.sgd_step, (0.1, 0.0, 0.0, False, 0.0, False, 1.0, 1)), (C_.check_sgd_table, (0.0,))],
             "adam": [(C_.adam_step, (0.1, 0.9, 0.999, 1e-8, 0.0, 0.0, False, False, False, 1.0, 1)),
                      (C_.check_adam_table, (False,))],
             "rda": [(C_.rda_step, (False, 1.0, 1)), (C_.check_rda_table, ())],
             "zu": [(C_.admm_scores, (1,)), (C_.admm_select, (1,)), (C_.admm_zu, (1,)), (C_.check_zu_table, ())],
             "sas": [(C_.sas_admm_step, (1,)), (C_.check_sas_table, ())]}
    for name, entry_points in calls.items():
        for entry, options in entry_points:
            with pytest.raises(ValueError, match=f"the {name} table has 5 columns, this build"):
                entry(table.data_ptr(), table.shape[0], 5, *options)


def test_cpp_table_layouts_mirror_the_python_ones():
    from regkern.backends.admm import SAS_FIELDS, ZU_FIELDS
    from regkern.backends.rda import RDA_FIELDS
    C_ = _C()
    assert (C_.RDA_FIELDS, C_.ZU_FIELDS, C_.SAS_FIELDS) == (RDA_FIELDS, ZU_FIELDS, SAS_FIELDS)
    assert issubclass(C_.TableError, ValueError)


# ============================================================================ Triton wrappers

# what a work list (build_units, zu_units) is built from, and so checks
WORK_LIST_COLUMNS = {"PROX", "MASK_KIND", "LAM_KIND", "DTYPE", "CLAMP", "FIRST", "NUMEL", "ROWS", "ROW_LEN", "COLS",
                     "COL_LEN", "GROUP", "STREAM", "MODE"}


def _work_list_sees(column, pattern):
    return column in WORK_LIST_COLUMNS and "needs it" not in pattern and "ignored" not in pattern


def _triton(module):
    pytest.importorskip("triton")
    return pytest.importorskip(f"regkern.kernels.{module}")


def test_triton_modules_declare_the_variants_they_implement():
    sgd, rda, admm = _triton("sgd"), _triton("rda"), _triton("admm")
    assert sgd.PROX_KINDS == (0, 1, 2) and sgd.MASK_KINDS == (0, 1, 2) and sgd.LAM_KINDS == (0, 1, 2)
    assert rda.MASK_KINDS == (0, 1, 2) and rda.GROUP_KINDS == (0, 1)
    assert admm.ZU_MODES == (MODE_ELEMENT, MODE_ROWS, MODE_SOFT) and admm.SAS_OUTER == (0, 1)


def _triton_sgd(table, momentum=0.9, units=None):
    _triton("sgd").sgd_step(table, torch.float32, lr=0.1, momentum=momentum, dampening=0.0, nesterov=False,
                            weight_decay=0.0, maximize=False, units=units)


@pytest.mark.parametrize("column, value, pattern", SGD_BAD_VALUES, ids=_ids(SGD_BAD_VALUES))
def test_triton_sgd_refuses_a_bad_table_value(column, value, pattern):
    case = SGDCase()
    table = _patch(case.table(), column, value)
    refused(lambda: _triton_sgd(table), case.tensors() + [table], "sgd table row 1 has " + pattern, 1,
            _column_named(column, pattern))


def test_triton_sgd_refuses_bad_clamps_ignored_pointers_and_a_foreign_dtype():
    sgd = _triton("sgd")
    case = SGDCase()
    good_units = sgd.build_units(case.table())
    table = _patch(_patch(case.table(), "CLAMP_LO", float_bits(3.0)), "CLAMP_HI", float_bits(1.0))
    refused(lambda: _triton_sgd(table, units=good_units), case.tensors() + [table],
            "CLAMP_LO = 3.0, above CLAMP_HI = 1.0", 1, "CLAMP_LO")
    table = _patch(case.table(), "MASK_KIND", 0)
    refused(lambda: _triton_sgd(table), case.tensors() + [table], "MASK = .*, but MASK_KIND is 0", 1, "MASK")
    table = case.table()
    refused(lambda: sgd.sgd_step(table, torch.float16, lr=0.1, momentum=0.0, dampening=0.0, nesterov=False,
                                 weight_decay=0.0, maximize=False),
            case.tensors() + [table], r"row 0 has DTYPE = 0, but this launch steps float16 tensors \(DTYPE 2\)",
            0, "DTYPE")
    with pytest.raises(ValueError, match="sgd table row 1 has PROX = 9"):
        sgd.build_units(_patch(case.table(), "PROX", 9))


TRITON_RDA_BAD_VALUES = RDA_BAD_VALUES + [("NORM_SQ", 0, "NORM_SQ = 0, but GROUP 1 .* needs it")]


@pytest.mark.parametrize("column, value, pattern", TRITON_RDA_BAD_VALUES, ids=_ids(TRITON_RDA_BAD_VALUES))
def test_triton_rda_refuses_a_bad_table_value(column, value, pattern):
    rda = _triton("rda")
    case = RDACase(triton=True)
    table = case.table()
    table[1, R[column]] = value
    refused(lambda: rda.rda_step(table, torch.float32), case.tensors() + [table], "rda table row 1 has " + pattern,
            1, _column_named(column, pattern))
    if _work_list_sees(column, pattern):  # the launch checks pointers and values too
        with pytest.raises(ValueError, match="rda table row 1 has " + pattern):
            rda.build_units(table)


TRITON_ZU_BAD_VALUES = ZU_BAD_VALUES + [(0, "SCORES", 0, "SCORES = 0, but selecting 5 of 12 elements needs it")]


@pytest.mark.parametrize("entry", ["admm_scores", "admm_zu"])
@pytest.mark.parametrize("row, column, value, pattern", TRITON_ZU_BAD_VALUES, ids=_ids(TRITON_ZU_BAD_VALUES))
def test_triton_zu_passes_refuse_a_bad_table_value(entry, row, column, value, pattern):
    admm = _triton("admm")
    case = ZUCase(element_scores=True)
    table = case.table()
    table[row, Z[column]] = value
    run = getattr(admm, entry)
    refused(lambda: run(table, torch.float32), case.tensors() + [table], f"zu table row {row} has " + pattern, row,
            _column_named(column, pattern))
    if _work_list_sees(column, pattern):
        with pytest.raises(ValueError, match=f"zu table row {row} has " + pattern):
            admm.zu_units(table)


@pytest.mark.parametrize("column, value, pattern", SAS_BAD_VALUES, ids=_ids(SAS_BAD_VALUES))
def test_triton_sas_refuses_a_bad_table_value(column, value, pattern):
    admm = _triton("admm")
    case = SASCase()
    table = case.table()
    table[1, S[column]] = value
    refused(lambda: admm.sas_admm_step(table, torch.float32), case.tensors() + [table],
            "sas table row 1 has " + pattern, 1, column)
