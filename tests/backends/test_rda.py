"""L1 regularized dual averaging (docs/rda.md): kernels against the reference, and
``regkern.RDA`` against an independent float64 closed form.

- C++ (every ISA variant the CPU runs) and Triton (interpreter on CPU, small
  shapes; a GPU when one is present) against ``reference.rda.rda_step``: the
  element variant and gbar / W0 bit for bit in C++ (same fp32 operations);
  the group variant's W within a few ulps (its row norm is summed in another
  order), bit-identical across ISAs and thread counts.
- ``regkern.RDA`` over 50 steps against the closed form computed in float64
  from the gradient sums, element and group, lam > 0 and lam = 0, with a
  StepLR changing gamma = 1 / lr mid-way; exact zeros; masks; GradScaler
  hooks; state_dict resume; bad input refused with nothing changed.
"""
import copy
import importlib
import io
import math
import random

import numpy as np
import pytest
import torch

import regkern
from regkern.backends import rda as backend_rda
from regkern.backends.rda import RDA_COLUMN, RDA_FIELDS, build_rda_table, write_step
from regkern.reference.rda import rda_coefficients, rda_step as reference_step
from optim_helpers import CPU_BACKENDS, assert_unchanged, snapshot

_C = pytest.importorskip("regkern._C", reason="the C++ extension is not built (pip install -e .)")
ISAS = _C._available_isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (0,), (0, 3), (1,), (7,), (64,), (5, 1), (3, 17), (33, 129), (16, 3, 3, 3), (2, 1000),
          (1, 4099), (257, 9)]
SMALL_SHAPES = [(), (0, 3), (1,), (7,), (5, 1), (3, 17), (6, 40), (4, 3, 3, 3), (1, 300)]
# (rtol, atol) of a result that may differ from the reference by a rounding or two.
# A group row's W = v * (1 - kappa / ||v||): a norm one ulp apart moves the
# factor by ~eps * kappa / ||v||, which is large against a factor near 0, so
# the absolute error scales with |v| (about 1 here), not with W.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1.6e-2, 1e-3), torch.float16: (2e-3, 2e-4)}


# --------------------------------------------------------------------------- cases


class Case:
    """Tensors and options of one functional rda step."""

    def __init__(self, rng, shapes, dtype, device="cpu", *, group=None, mask=None, maximize=None,
                 grad_scale=None):
        gen = torch.Generator().manual_seed(rng.randrange(2**31))

        def rand(shape, dt=torch.float32):
            return torch.randn(shape, generator=gen).to(device=device, dtype=dt)

        self.params, self.grads, self.gbars, self.w0s, self.masks = [], [], [], [], []
        scale = rng.choice([None, 4.0, 1024.0]) if grad_scale is None else grad_scale
        self.options = dict(
            step=[rng.randrange(1, 50) for _ in shapes],
            gamma=rng.choice([3.0, 10.0, 0.7]),
            lams=[rng.choice([0.0, 0.05, 0.3, 1.0]) for _ in shapes],
            group=[rng.random() < 0.5 if group is None else group for _ in shapes],
            maximize=rng.random() < 0.3 if maximize is None else maximize,
            grad_scale=None if not scale else torch.tensor(scale, device=device),
        )
        for shape in shapes:
            self.params.append(rand(shape, dtype))
            self.grads.append(rand(shape, dtype) * (scale or 1.0))
            self.gbars.append(rand(shape))
            self.w0s.append(rand(shape) * 0.5)
            rows = shape[0] if shape else 1
            use_mask = rng.random() < 0.4 if mask is None else mask
            kind = rng.choice([(rows,), tuple(shape)])
            self.masks.append((torch.rand(kind, generator=gen) < 0.6).to(device) if use_mask else None)

    def run(self, step_fn, **extra):
        out = copy.deepcopy(self)
        step_fn(out.params, out.grads, out.gbars, out.w0s, masks=out.masks, **out.options, **extra)
        return out


def bits(t):
    return t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()


def assert_matches(actual, expected, exact_element=True):
    """gbar and W0 bit for bit; W bit for bit (element tensors, when
    ``exact_element``) or within a rounding or two (group rows)."""
    for i, (a, e, grouped) in enumerate(zip(actual.params, expected.params, expected.options["group"])):
        assert bits(actual.grads[i]) == bits(expected.grads[i]), f"grad {i} was modified"
        if exact_element:
            assert bits(actual.gbars[i]) == bits(expected.gbars[i]), f"gbar {i} {tuple(e.shape)}"
            assert bits(actual.w0s[i]) == bits(expected.w0s[i]), f"w0 {i} {tuple(e.shape)}"
        else:
            torch.testing.assert_close(actual.gbars[i], expected.gbars[i], rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(actual.w0s[i], expected.w0s[i], rtol=0, atol=0)
        if exact_element and not grouped:
            assert bits(a) == bits(e), f"param {i} ({e.dtype} {tuple(e.shape)}) differs from the reference"
        else:
            rtol, atol = TOLERANCE[e.dtype]
            torch.testing.assert_close(a, e, rtol=rtol, atol=atol, msg=lambda m: f"param {i}: {m}")
            assert torch.equal(a == 0, e == 0) or e.numel() > 64, f"param {i}: zeros differ"
        assert not bool((a == 0).logical_and(a.signbit()).any()), f"param {i} holds -0.0"


def cpp_step(params, grads, gbars, w0s, *, masks, step, gamma, lams, group, maximize, grad_scale,
             num_threads=2, stream=False):
    """One regkern._C.rda_step call over a table built here (``stream``:
    non-temporal stores of fp32 W)."""
    table = build_rda_table(params, grads, gbars, w0s, masks, group, stream=stream)
    write_step(table.numpy(), step, gamma, lams)
    scale = 1.0 if grad_scale is None else float(grad_scale)
    _C.rda_step(table.data_ptr(), table.shape[0], table.shape[1], bool(maximize), scale, num_threads)


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.isa()
    _C._set_isa(request.param)
    yield request.param
    _C._set_isa(before)


# --------------------------------------------------------------------------- reference


COEFFICIENT_CASES = [(1, 7.3, 0.0), (2, 7.3, 0.1), (7, 0.3, 3e-4), (50, 1e3, 2.0), (12345, 7.3, 1e-6),
                     (3, math.inf, 0.5), (16777216, 0.01, 0.07)]


def probe_coefficients(step_fn, t, gamma, lam, row_len=9, device="cpu"):
    """Run ``step_fn`` on tensors whose results expose the kernel's fp32
    coefficients, and compare them with ``rda_coefficients`` rounded to fp32."""
    f32 = np.float32
    a, c, tau, kappa = (f32(x) for x in rda_coefficients(t, gamma, lam, row_len))
    zero, one, row = torch.zeros(1), torch.ones(1), torch.zeros(1, row_len)
    tensors = [[zero, zero, zero, row],                            # W
               [zero, torch.tensor([float(t)]), zero, row],        # g
               [one, zero, zero, row],                             # gbar
               [zero, zero, one, row + 1]]                         # W0
    params, grads, gbars, w0s = ([x.clone().to(device) for x in xs] for xs in tensors)
    step_fn(params, grads, gbars, w0s, masks=[None] * 4, step=[t] * 4, gamma=gamma, lams=[0.0, 0.0, lam, lam],
            group=[False, False, False, True], maximize=False, grad_scale=None)
    params, gbars = [x.cpu().numpy() for x in params], [x.cpu().numpy() for x in gbars]
    assert gbars[0][0] == a                                     # gbar = 1 * a + 0 / t
    assert params[1][0] == -c + f32(0)                          # gbar = 1, W = v = -c * 1
    assert params[2][0] == max(f32(1) - tau, f32(0))            # v = 1, W = 1 - tau
    norm = f32(math.sqrt(row_len))                              # v = 1 in a row of row_len
    assert (params[3] == max(f32(1) - kappa / norm, f32(0)) * f32(1) + f32(0)).all()


@pytest.mark.parametrize("t, gamma, lam", COEFFICIENT_CASES)
def test_cpp_coefficients_are_the_reference_doubles(t, gamma, lam):
    probe_coefficients(cpp_step, t, gamma, lam)
    probe_coefficients(reference_step, t, gamma, lam)


def test_write_step_fills_the_step_columns():
    params = [torch.zeros(3), torch.zeros(2, 2)]
    table = build_rda_table(params, params, params, params, [None, None], [False, True])
    cols = table.numpy()
    write_step(cols, [4, 9], 2.5, 0.25)
    assert list(cols[:, RDA_COLUMN["T"]].view(np.float64)) == [4.0, 9.0]
    assert list(cols[:, RDA_COLUMN["LAM"]].view(np.float64)) == [0.25, 0.25]
    assert list(cols[:, RDA_COLUMN["GAMMA"]].view(np.float64)) == [2.5, 2.5]
    assert list(cols[:, RDA_COLUMN["STREAM"]]) == [0, 0]
    streamed = build_rda_table(params + [torch.zeros(2, dtype=torch.bfloat16)], params * 2, params * 2,
                               params * 2, [None] * 3, [False] * 3, stream=True)
    assert list(streamed[:, RDA_COLUMN["STREAM"]]) == [1, 1, 0]  # fp32 W only


def test_reference_is_spec_4():
    """One step by hand in float64: element and group, with a row mask."""
    gen = torch.Generator().manual_seed(0)
    w0, gbar, g = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3))
    t, gamma, lam = 5, 2.0, 0.4
    new_gbar = gbar * (t - 1) / t + g / t
    v = w0 - math.sqrt(t) / gamma * new_gbar
    tau = lam * math.sqrt(t) / gamma
    element = v.sign() * (v.abs() - tau).clamp_min(0)
    norm = v.norm(dim=1, keepdim=True)
    grouped = v * (1 - tau * math.sqrt(6) / norm).clamp_min(0)
    for is_group, want in ((False, element), (True, grouped)):
        w, gb, w0_ = torch.zeros(4, 6, dtype=torch.float64), gbar.clone(), w0.clone()
        reference_step([w], [g], [gb], [w0_], step=t, gamma=gamma, lams=lam, group=is_group)
        torch.testing.assert_close(w, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gb, new_gbar, rtol=1e-12, atol=1e-12)
        assert torch.equal(w0_, w0)
    # a row mask zeroes v, gbar and W0 of its rows; a zero row stays 0
    keep = torch.tensor([True, False, True, True])
    w, gb, w0_ = torch.zeros(4, 6, dtype=torch.float64), gbar.clone(), w0.clone()
    reference_step([w], [g], [gb], [w0_], step=t, gamma=gamma, lams=lam, group=True, masks=[keep])
    assert bool((w[1] == 0).all() and (gb[1] == 0).all() and (w0_[1] == 0).all())
    torch.testing.assert_close(w[keep], grouped[keep])
    # lam = 0: plain dual averaging
    w = torch.zeros(4, 6, dtype=torch.float64)
    reference_step([w], [g], [gbar.clone()], [w0.clone()], step=t, gamma=gamma, lams=0.0, group=False)
    torch.testing.assert_close(w, v, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- C++


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [False, True], ids=["element", "group"])
@pytest.mark.parametrize("mask", [False, True], ids=["nomask", "mask"])
def test_cpp_matches_reference(isa, dtype, group, mask):
    case = Case(random.Random(f"{isa}{dtype}{group}{mask}"), SHAPES, dtype, group=group, mask=mask)
    assert_matches(case.run(cpp_step), case.run(reference_step))


@pytest.mark.parametrize("seed", range(4))
def test_cpp_mixed_tables(seed):
    """Element and group tensors, all dtypes, masks, maximize and grad_scale
    drawn at random, in one call."""
    rng = random.Random(seed)
    cases = [Case(rng, rng.sample(SHAPES, 5), dtype) for dtype in DTYPES]
    mixed = cases[0]
    for other in cases[1:]:
        for name in ("params", "grads", "gbars", "w0s", "masks"):
            getattr(mixed, name).extend(getattr(other, name))
        for name in ("step", "lams", "group"):
            mixed.options[name] += other.options[name]
    for c in cases[1:]:  # one grad_scale for the call: rescale the others' gradients
        ratio = (1.0 if mixed.options["grad_scale"] is None else float(mixed.options["grad_scale"])) / \
                (1.0 if c.options["grad_scale"] is None else float(c.options["grad_scale"]))
        for g in c.grads:
            g.mul_(ratio)
    assert_matches(mixed.run(cpp_step), mixed.run(reference_step))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_results_do_not_depend_on_isa_or_threads(dtype):
    """Big tensors (several OpenMP shares), long and short group rows: W
    bit-identical whatever the variant and the thread count."""
    case = Case(random.Random(7), [(60, 500), (3000, 9), (1, 40000), (40000,)], dtype, mask=True)
    case.options["group"] = [True, True, True, False]
    outs = []
    before = _C.isa()
    try:
        for name in ISAS:
            _C._set_isa(name)
            outs += [case.run(cpp_step, num_threads=n) for n in (1, 2, 3)]
    finally:
        _C._set_isa(before)
    for out in outs[1:]:
        for name in ("params", "gbars", "w0s"):
            assert [bits(t) for t in getattr(out, name)] == [bits(t) for t in getattr(outs[0], name)], name
    assert_matches(outs[0], case.run(reference_step))


def test_cpp_edge_values():
    """NaN and inf gradients, a zero row, gamma = inf (lr = 0): like the reference."""
    g = torch.tensor([[1.0, float("nan"), 2.0], [0.0, 0.0, 0.0], [float("inf"), 1.0, -1.0], [3.0, -3.0, 0.5]])
    for group in (False, True):
        for gamma in (2.0, math.inf):
            case = Case(random.Random(0), [(4, 3)], torch.float32, group=group, mask=False, grad_scale=False)
            case.grads[0] = g.clone()
            case.w0s[0][1] = 0.0
            case.gbars[0][1] = 0.0
            case.options.update(gamma=gamma, maximize=False)
            expected = case.run(reference_step)
            actual = case.run(cpp_step)
            for a, e in zip(actual.params + actual.gbars, expected.params + expected.gbars):
                torch.testing.assert_close(a, e, equal_nan=True, rtol=1e-6, atol=1e-6)
            assert torch.equal(actual.params[0][1], torch.zeros(3))


def test_functional_step_routes_what_the_kernels_cannot_take_to_the_reference():
    """float64 and non-contiguous tensors beside fast ones, in one call."""
    case = Case(random.Random(5), [(6, 40), (3, 17), (7,)], torch.float32, mask=True)
    case.params[1] = case.params[1].double()
    case.grads[1], case.gbars[1], case.w0s[1] = case.grads[1].double(), case.gbars[1].double(), case.w0s[1].double()
    case.params[2] = torch.randn(7, 4).t()[0]  # a strided view
    expected = case.run(reference_step)
    actual = case.run(backend_rda.rda_step, backend="cpp")
    for a, e in zip(actual.params + actual.gbars, expected.params + expected.gbars):
        torch.testing.assert_close(a, e, rtol=1e-6, atol=1e-6)
    plan = backend_rda.RDAPlan(case.params, case.gbars, case.w0s, case.masks, False, "cpp")
    assert plan.slow_index == [1, 2]


@pytest.mark.parametrize("group", [False, True], ids=["element", "group"])
def test_cpp_stream_stores_give_the_same_bits(isa, group):
    """Non-temporal stores of W (big steps) write what plain stores write,
    also from addresses not aligned to a vector (tensors at odd offsets)."""
    case = Case(random.Random(11), [(3, 1000), (40000,), (5, 17), (7,), (1, 4099)], torch.float32, group=group)
    for i, offset in enumerate((1, 3, 0, 5, 7)):  # W in a buffer at an odd element offset
        w = case.params[i]
        case.params[i] = torch.empty(w.numel() + offset)[offset:].view(w.shape).copy_(w)
    plain = case.run(cpp_step)
    streamed = case.run(cpp_step, stream=True)
    for name in ("params", "gbars", "w0s"):
        assert [bits(t) for t in getattr(streamed, name)] == [bits(t) for t in getattr(plain, name)], name
    assert_matches(streamed, case.run(reference_step), exact_element=True)


def test_streams_w_only_for_steps_larger_than_the_caches():
    assert not backend_rda.streams_w([torch.zeros(1000)])
    huge = torch.zeros(1).expand(backend_rda.cache_bytes() // 16 + 1)  # only its size is read
    assert backend_rda.streams_w([huge])


def test_cpp_refuses_a_table_of_another_layout():
    with pytest.raises(ValueError, match="columns"):
        _C.rda_step(0, 0, len(RDA_FIELDS) + 1, False, 1.0, 1)


def test_cpp_exact_zeros_and_no_negative_zero():
    case = Case(random.Random(3), [(64, 50)], torch.float32, group=False, mask=False, grad_scale=False)
    case.options.update(lams=[1.0], step=[10], gamma=3.0)
    out = case.run(cpp_step)
    w = out.params[0]
    assert 0.2 < float((w == 0).float().mean()) < 0.99
    assert not bool(w.signbit()[w == 0].any())


# --------------------------------------------------------------------------- Triton

try:
    import triton  # noqa: F401
    from regkern.kernels import rda as triton_rda
    INTERPRET = triton.knobs.runtime.interpret
    if INTERPRET and type(triton_rda._rda_kernel).__name__ != "InterpretedFunction":
        triton_rda = importlib.reload(triton_rda)  # imported before TRITON_INTERPRET was set
    TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
except ImportError:
    triton_rda, TRITON_DEVICE = None, None
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="no triton, or no GPU and no interpreter")


def triton_step(params, grads, gbars, w0s, *, masks, step, gamma, lams, group, maximize, grad_scale,
                found_inf=None, block=128, chunk=256):
    """One launch per dtype."""
    count = len(params)
    keep = []  # scratch must outlive the launch
    for dtype in DTYPES:
        index = [i for i in range(count) if params[i].dtype == dtype]
        if not index:
            continue
        pick = lambda xs: [xs[i] for i in index]  # noqa: E731
        scratch = [torch.empty(params[i].shape[0] if params[i].dim() else 1, device=params[i].device)
                   if group[i] else None for i in index]
        keep.append(scratch)
        table = build_rda_table(pick(params), pick(grads), pick(gbars), pick(w0s), pick(masks), pick(group),
                                scratch)
        write_step(table.numpy(), pick(step), gamma, pick(lams))
        device = params[index[0]].device
        triton_rda.rda_step(table.to(device), dtype, units=triton_rda.build_units(table, chunk).to(device),
                            block=block, maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)


@needs_triton
@pytest.mark.parametrize("t, gamma, lam", COEFFICIENT_CASES)
def test_triton_coefficients_are_the_reference_doubles(t, gamma, lam):
    probe_coefficients(triton_step, t, gamma, lam, device=TRITON_DEVICE)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group", [False, True], ids=["element", "group"])
def test_triton_matches_reference(dtype, group):
    case = Case(random.Random(f"t{dtype}{group}"), SMALL_SHAPES, dtype, TRITON_DEVICE, group=group)
    # small pieces and units: rows over several pieces, units over several rows
    assert_matches(case.run(triton_step, block=32, chunk=64), case.run(reference_step), exact_element=False)


@needs_triton
def test_triton_mixed_and_found_inf():
    case = Case(random.Random(11), SMALL_SHAPES, torch.float32, TRITON_DEVICE, mask=True)
    case.options["found_inf"] = torch.tensor(1.0, device=TRITON_DEVICE)
    skipped = case.run(triton_step)
    for name in ("params", "gbars", "w0s"):
        assert [bits(t) for t in getattr(skipped, name)] == [bits(t) for t in getattr(case, name)]
    case.options["found_inf"] = torch.tensor(0.0, device=TRITON_DEVICE)
    assert_matches(case.run(triton_step), case.run(reference_step), exact_element=False)


@needs_triton
@pytest.mark.parametrize("chunk", [1, 64, 4096])
def test_triton_units_cover_every_element_once(chunk):
    tensors = [torch.zeros(s) for s in SHAPES]
    groups = [i % 2 == 1 for i in range(len(tensors))]
    table = build_rda_table(tensors, tensors, tensors, tensors, [None] * len(tensors), groups)
    units = triton_rda.build_units(table, chunk)
    for i, t in enumerate(tensors):
        mine = units[units[:, 0] == i]
        if t.numel() == 0:
            assert len(mine) == 0
            continue
        assert mine[0, 1] == 0 and mine[-1, 2] == t.numel()
        assert torch.equal(mine[1:, 1], mine[:-1, 2])
        if groups[i]:
            row_len = t.numel() // (t.shape[0] if t.dim() else 1)
            assert bool((mine[:, 1:] % row_len == 0).all())


# --------------------------------------------------------------------------- the optimizer

OPT_SHAPES = [(8, 3, 3, 3), (8,), (10, 8), (10,), (5, 7), (1,), (33,)]


def opt_params(dtype=torch.float32, seed=0, shapes=OPT_SHAPES, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=gen) * scale).to(dtype)) for s in shapes]


def grads_for(weights, step, maximize=False):
    """Deterministic gradients with a mild dependence on W (float64)."""
    out = []
    for i, w in enumerate(weights):
        noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(1000 * step + i), dtype=torch.float64)
        g = 0.3 * w.detach().double() + noise - 0.2
        out.append(-g if maximize else g)
    return out


class ClosedForm:
    """docs/rda.md in float64 from the sums of the gradients (no running mean):
    W_t = S(W0 - sqrt(t) lr_t * sum(g) / t), threshold lam sqrt(t) lr_t."""

    def __init__(self, params, lam, group):
        self.w0 = [p.detach().double().clone() for p in params]
        self.w = [w.clone() for w in self.w0]
        self.sums = [torch.zeros_like(w) for w in self.w0]
        self.t, self.lam, self.group = 0, lam, group

    def step(self, grads, lr):
        self.t += 1
        root = math.sqrt(self.t)
        for i, g in enumerate(grads):
            self.sums[i] += g
            v = self.w0[i] - root * lr * self.sums[i] / self.t
            tau = self.lam * root * lr
            if self.group:
                rows = v.reshape(v.shape[0] if v.dim() else 1, -1)
                norm = rows.norm(dim=1, keepdim=True)
                shrink = (1 - tau * math.sqrt(rows.shape[1]) / norm).clamp_min(0)
                self.w[i] = torch.where(norm > 0, rows * shrink, 0.0).reshape(v.shape)
            else:
                self.w[i] = v.sign() * (v.abs() - tau).clamp_min(0)


def train_rda(opt, params, steps, start=0, scheduler=None):
    maximize = opt.param_groups[0]["maximize"]
    for t in range(start, start + steps):
        for p, g in zip(params, grads_for(params, t, maximize)):
            p.grad = g.to(p.dtype)
        opt.step()
        if scheduler is not None:
            scheduler.step()


OPT_BACKENDS = [b for b in CPU_BACKENDS if b != "triton"] + (["triton"] if TRITON_DEVICE == "cpu" else [])
# The interpreter runs a group row's segmented scan one element at a time over
# a whole block: the optimizer runs its group steps on the other backends (the
# Triton group kernel is held to the reference above, with small blocks).
SLOW_TRITON = "the Triton interpreter is slow: this case runs on the other backends"


@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("group", [False, True], ids=["element", "group"])
@pytest.mark.parametrize("lam", [0.0, 1.5])
def test_optimizer_matches_closed_form_with_a_gamma_schedule(backend, group, lam):
    if backend == "triton" and (lam == 0.0 or group):
        pytest.skip(SLOW_TRITON)
    params = opt_params(scale=0.3)
    exact = ClosedForm(params, lam, group)
    opt = regkern.RDA(params, lr=0.1, lam=lam, group=group, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)  # gamma = 1/lr doubles at t = 21, 41
    lrs = []
    for t in range(50):
        lr = opt.param_groups[0]["lr"]
        lrs.append(lr)
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g.float()
        opt.step()
        sched.step()
        exact.step(grads_for(exact.w, t), lr)
    assert lrs[0] == 0.1 and lrs[25] == 0.05 and lrs[45] == 0.025
    for p, w in zip(params, exact.w):
        torch.testing.assert_close(p.detach().double(), w, rtol=2e-5, atol=2e-5)
    if lam:  # exact zeros: elements, or whole rows of the conv and linear weights
        zeros = sum(int((p == 0).sum()) for p in params)
        zero_rows = sum(int((p.reshape(p.shape[0], -1).abs().sum(1) == 0).sum()) for p in params if p.dim() > 1)
        assert (zero_rows >= 3) if group else (zeros > 100), "the L1 term should leave exact zeros"
        assert not any(bool(p.detach().signbit()[p == 0].any()) for p in params)
        exact_zeros = sum(int((w == 0).sum()) for w in exact.w)
        assert abs(zeros - exact_zeros) <= 2
    state = opt.state[params[0]]
    assert float(state["step"]) == 50 and state["gbar"].dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
@pytest.mark.parametrize("group", [False, True], ids=["element", "group"])
def test_optimizer_other_dtypes_against_closed_form(dtype, group):
    params = opt_params(dtype)
    exact = ClosedForm(params, 1.0, group)
    opt = regkern.RDA(params, lr=0.1, lam=1.0, group=group)
    for t in range(30):
        for p, g in zip(params, grads_for(params, t)):
            p.grad = g.to(dtype)
        opt.step()
        exact.step(grads_for(exact.w, t), 0.1)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-2, atol=2e-2)
    for p, w in zip(params, exact.w):
        torch.testing.assert_close(p.detach().double(), w, **tol)
    for st in opt.state.values():
        assert st["gbar"].dtype == st["w0"].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


def test_masks_keep_pruned_weights_at_zero():
    params = opt_params()
    opt = regkern.RDA([{"params": params[:2], "group": True}, {"params": params[2:]}], lr=0.1, lam=0.2)
    train_rda(opt, params, 2)
    row_mask = torch.tensor([True, False] * 4)
    element_mask = torch.rand(10, 8, generator=torch.Generator().manual_seed(0)) < 0.5
    opt.state[params[0]]["mask"] = row_mask
    opt.state[params[2]]["mask"] = element_mask
    train_rda(opt, params, 5, start=2)
    assert bool((params[0][~row_mask] == 0).all()) and bool((params[2][~element_mask] == 0).all())
    for p, keep in ((params[0], row_mask), (params[2], element_mask)):
        st = opt.state[p]
        assert bool((st["gbar"][~keep] == 0).all()) and bool((st["w0"][~keep] == 0).all())
        assert bool((p[keep] != 0).any())


def test_gradscaler_hooks_and_maximize():
    base = opt_params()
    runs = []
    for scale, maximize in ((None, False), (1024.0, False), (None, True)):
        params = [torch.nn.Parameter(p.detach().clone()) for p in base]
        opt = regkern.RDA(params, lr=0.1, lam=0.5, maximize=maximize)
        for t in range(5):
            for p, g in zip(params, grads_for(params, t)):
                p.grad = (-g if maximize else g).float() * (scale or 1.0)
            if scale:
                opt.grad_scale = torch.tensor(scale)
                opt.found_inf = torch.tensor(0.0)
            opt.step()
        if scale:  # an overflow step changes nothing, not even the step count
            before = snapshot(opt, params)
            opt.found_inf = torch.tensor(1.0)
            opt.step()
            assert_unchanged(before, opt, params)
        runs.append(params)
    for other in runs[1:]:
        for a, b in zip(other, runs[0]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_step_counts_share_one_tensor_and_honour_writes():
    """A group's step counts are views of one fp32 vector (one numpy
    operation per step reads and advances them all); the plan stays cached;
    a count written in place or a new count tensor takes effect."""
    params = opt_params()
    opt = regkern.RDA(params, lr=0.1, lam=0.2)
    train_rda(opt, params, 2)
    plan = opt._plans[0]
    train_rda(opt, params, 1, start=2)
    assert opt._plans[0] is plan  # no rebuild per step
    steps = [opt.state[p]["step"] for p in params]
    base = steps[0]._base
    assert base is not None and all(s._base is base for s in steps)
    assert all(s.dtype == torch.float32 and s.dim() == 0 and float(s) == 3 for s in steps)

    # in place (no rebuild) and by assignment (a rebuild): t = 10 and t = 5 for the next step
    opt.state[params[0]]["step"].fill_(9.0)
    opt.state[params[1]]["step"] = torch.tensor(4.0)
    twins = [p.detach().clone() for p in params]
    gbars = [opt.state[p]["gbar"].clone() for p in params]
    w0s = [opt.state[p]["w0"].clone() for p in params]
    grads = grads_for(params, 3)
    for p, g in zip(params, grads):
        p.grad = g.float()
    opt.step()
    expected_t = [10, 5] + [4] * (len(params) - 2)
    reference_step(twins, [g.float() for g in grads], gbars, w0s, step=expected_t, gamma=10.0, lams=0.2)
    for p, w in zip(params, twins):
        torch.testing.assert_close(p.detach(), w, rtol=1e-6, atol=1e-7)
    assert [float(opt.state[p]["step"]) for p in params] == [float(t) for t in expected_t]


def test_parameters_without_gradients_keep_their_own_step():
    params = opt_params()
    opt = regkern.RDA(params, lr=0.1, lam=0.1)
    train_rda(opt, params, 3)
    params[1].grad = None
    before = params[1].detach().clone()
    opt.step()
    assert torch.equal(params[1].detach(), before)
    assert float(opt.state[params[1]]["step"]) == 3 and float(opt.state[params[0]]["step"]) == 4
    late = torch.nn.Parameter(torch.randn(4, 4))
    opt.add_param_group({"params": [late], "lam": 0.0})
    late.grad = torch.ones(4, 4)
    w0 = late.detach().clone()
    opt.step()
    assert float(opt.state[late]["step"]) == 1
    torch.testing.assert_close(late.detach(), w0 - 0.1 * torch.ones(4, 4))  # t = 1: W = W0 - lr g


@pytest.mark.parametrize("backend", OPT_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_resume_gives_the_same_trajectory(backend, dtype):
    if backend == "triton" and dtype != torch.float32:
        pytest.skip(SLOW_TRITON)
    params = opt_params(dtype)
    rows = backend != "triton"  # see SLOW_TRITON
    groups = [{"params": params[:3], "group": rows, "lam": 0.3}, {"params": params[3:]}]
    opt = regkern.RDA(groups, lr=0.1, lam=0.1, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    opt.state[params[2]]["mask"] = torch.tensor([True] * 7 + [False] * 3)
    train_rda(opt, params, 6, scheduler=sched)
    buffer = io.BytesIO()
    torch.save({"params": [p.detach() for p in params], "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)
    train_rda(opt, params, 6, start=6, scheduler=sched)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = [torch.nn.Parameter(p.clone()) for p in saved["params"]]
    groups2 = [{"params": resumed[:3], "group": rows, "lam": 0.3}, {"params": resumed[3:]}]
    opt2 = regkern.RDA(groups2, lr=0.1, lam=0.1, backend=backend)
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, step_size=4, gamma=0.5)
    opt2.load_state_dict(saved["opt"])
    sched2.load_state_dict(saved["sched"])
    for p in resumed:
        st = opt2.state[p]
        assert st["gbar"].dtype == st["w0"].dtype == torch.float32
        assert st["step"].dtype == torch.float32 and st["step"].dim() == 0 and float(st["step"]) == 6
    assert opt2.state[resumed[2]]["mask"].dtype == torch.bool
    train_rda(opt2, resumed, 6, start=6, scheduler=sched2)
    for a, b in zip(params, resumed):
        assert bits(a) == bits(b)
    for a, b in zip(params, resumed):
        for name in ("gbar", "w0"):
            assert bits(opt.state[a][name]) == bits(opt2.state[b][name])
    assert saved["opt"]["state"][0]["step"] == 6  # the checkpoint was not advanced by the resumed run


def _break(name):
    """Ways to make the next step invalid, each with the message it must give."""
    return {
        "negative lam": (lambda ps, opt: opt.param_groups[0].__setitem__("lam", -0.1), "lam"),
        "nan lr": (lambda ps, opt: opt.param_groups[1].__setitem__("lr", float("nan")), "learning rate"),
        "group not bool": (lambda ps, opt: opt.param_groups[1].__setitem__("group", "rows"), "group"),
        "sparse gradient": (lambda ps, opt: setattr(ps[4], "grad", ps[4].grad.to_sparse()), "sparse gradient"),
        "gradient shape": (lambda ps, opt: setattr(ps[4].grad, "data", torch.zeros(5, 3)), "gradient of"),
        "gbar dtype": (lambda ps, opt: opt.state[ps[0]].__setitem__("gbar", opt.state[ps[0]]["gbar"].half()), "gbar"),
        "w0 shape": (lambda ps, opt: opt.state[ps[2]].__setitem__("w0", torch.zeros(3)), "w0"),
        "mask shape": (lambda ps, opt: opt.state[ps[2]].__setitem__("mask", torch.ones(3, dtype=torch.bool)), "mask"),
        "mask dtype": (lambda ps, opt: opt.state[ps[2]].__setitem__("mask", torch.ones(10)), "bool"),
        "step count": (lambda ps, opt: opt.state[ps[5]].__setitem__("step", torch.ones(2)), "step count"),
    }[name]


@pytest.mark.parametrize("backend", [b for b in OPT_BACKENDS if b != "triton"])
@pytest.mark.parametrize("what", ["negative lam", "nan lr", "group not bool", "sparse gradient", "gradient shape",
                                  "gbar dtype", "w0 shape", "mask shape", "mask dtype", "step count"])
def test_bad_input_is_refused_and_changes_nothing(backend, what):
    params = opt_params()
    opt = regkern.RDA([{"params": params[:3], "group": True}, {"params": params[3:]}], lr=0.1, lam=0.2,
                      backend=backend)
    train_rda(opt, params, 3)  # state exists, the plans are cached
    for p, g in zip(params, grads_for(params, 3)):
        p.grad = g.float()
    breaker, message = _break(what)
    breaker(params, opt)
    before = snapshot(opt, params)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_unchanged(before, opt, params)


def test_bad_constructor_arguments():
    p = [torch.nn.Parameter(torch.randn(3))]
    for kwargs, match in [(dict(lr=-1.0), "learning rate"), (dict(lr=float("inf")), "learning rate"),
                          (dict(lam=-1.0), "lam"), (dict(group=1), "group"),
                          (dict(lr=torch.tensor([0.1, 0.2])), "1-element")]:
        with pytest.raises(ValueError, match=match):
            regkern.RDA(p, **{"lr": 0.1, **kwargs})
    opt = regkern.RDA(p, lr=0.1)
    with pytest.raises(ValueError, match="lam"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(2))], "lam": -1.0})
    assert len(opt.param_groups) == 1


def test_tensor_lr_and_zero_lr():
    params = opt_params()
    opt = regkern.RDA(params, lr=torch.tensor(0.1), lam=0.2)
    train_rda(opt, params, 2)
    opt.param_groups[0]["lr"] = 0.0  # gamma = inf: W = W0
    train_rda(opt, params, 1, start=2)
    for p in params:
        assert torch.equal(p.detach(), opt.state[p]["w0"])


def test_non_contiguous_parameters_and_new_state_tensors():
    base = torch.randn(12, 8)
    transposed = torch.nn.Parameter(base.t())  # a non-contiguous leaf: stepped by the reference
    plain = torch.nn.Parameter(base.t().contiguous())
    opts = [regkern.RDA([p], lr=0.1, lam=0.3, group=True) for p in (transposed, plain)]
    for t in range(4):
        for p, opt in zip((transposed, plain), opts):
            p.grad = grads_for([p], t)[0].float().contiguous()
            opt.step()
    torch.testing.assert_close(transposed.detach(), plain.detach(), rtol=1e-6, atol=1e-6)
    # a new mask tensor is picked up by the cached plan
    opts[1].state[plain]["mask"] = torch.zeros(8, dtype=torch.bool)
    plain.grad = torch.randn(8, 12)
    opts[1].step()
    assert bool((plain == 0).all())


def test_dtensor_parameters_step_like_plain_ones():
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        full = [t.detach() for t in opt_params(shapes=[(8, 3, 3), (8,)])]
        sharded = [torch.nn.Parameter(distribute_tensor(t.clone(), mesh, [Shard(0)])) for t in full]
        plain = [torch.nn.Parameter(t.clone()) for t in full]
        opts = [regkern.RDA(ps, lr=0.1, lam=0.3, group=True) for ps in (sharded, plain)]
        for t in range(4):
            for p, q, g in zip(sharded, plain, grads_for(full, t)):
                p.grad = distribute_tensor(g.float(), mesh, [Shard(0)])
                q.grad = g.float()
            for opt in opts:
                opt.step()
        assert isinstance(opts[0].state[sharded[0]]["gbar"], DTensor)
        for p, q in zip(sharded, plain):
            torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-6, atol=1e-6)
    finally:
        if created:
            dist.destroy_process_group()


def test_exported():
    assert regkern.RDA is regkern.optim.RDA
