"""The `admm` kernel family (docs/admm.md) on every backend against the reference.

- Classic Z/U update (``regkern.backends.admm.admm_zu_step``): C++ (every ISA
  variant the CPU runs, several thread counts) and Triton (interpreter on CPU,
  small shapes and blocks; a GPU when present) against
  ``reference.admm.admm_zu_step`` bit for bit, on empty, 0-d, 1-element, odd
  and conv shapes, fp32 / bf16 / fp16 W, top-k elements, top-k rows and soft
  threshold mixed in one call; exact k under heavy ties (ties kept by lowest
  index); refused calls write nothing; ``regkern.admm.update`` on a
  ``regkern.SGD`` with per-layer ratios.
- SAS-ADMM step (``SASPlan``): kernels against ``reference.admm.sas_admm_step``
  bit for bit, inner and outer steps, dense non-contiguous layouts
  (channels_last); ``regkern.SASADMM`` on each backend against the reference
  backend bit for bit and against the official ``sasPrun`` loop.
"""
import copy
import importlib
import math
import random

import pytest
import torch

import regkern
from regkern.backends import admm as backend_admm
from regkern.admm import admm_update, admm_update_all, kept_count, update
from regkern.backends.admm import SAS_COLUMN, SAS_FIELDS, ZU_COLUMN, ZU_FIELDS, SASPlan, admm_zu_step, build_sas_table, build_zu_table, element_thresholds
from regkern.optim.sas_admm import SASADMM
from regkern.reference import admm as ref
from regkern.reference.sgd import num_rows
from optim_helpers import CPU_BACKENDS, assert_unchanged, snapshot

_C = pytest.importorskip("regkern._C", reason="the C++ extension is not built (pip install -e .)")
ISAS = _C._available_isas()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(), (0,), (0, 3), (3, 0), (1,), (7,), (64,), (5, 1), (3, 17), (33, 129), (16, 3, 3, 3), (2, 1000),
          (1, 4099), (257, 9)]
SMALL_SHAPES = [(), (0, 3), (1,), (7,), (5, 1), (3, 17), (6, 40), (4, 3, 3, 3), (1, 90)]

try:
    import triton  # noqa: F401
    from regkern.kernels import admm as triton_admm
    INTERPRET = triton.knobs.runtime.interpret
    if INTERPRET and type(triton_admm._zu_kernel).__name__ != "InterpretedFunction":
        triton_admm = importlib.reload(triton_admm)  # imported before TRITON_INTERPRET was set
    TRITON_DEVICE = "cpu" if INTERPRET else ("cuda" if torch.cuda.is_available() else None)
except ImportError:
    triton_admm, TRITON_DEVICE = None, None
needs_triton = pytest.mark.skipif(TRITON_DEVICE is None, reason="no triton, or no GPU and no interpreter")
FAST = ["cpp"] + (["triton"] if TRITON_DEVICE == "cpu" else [])


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def small_triton_blocks(monkeypatch):
    """Pieces of 32 elements, units of 64: rows over several pieces, units over several rows."""
    if triton_admm is not None:
        monkeypatch.setattr(triton_admm, "DEFAULT_BLOCK", 32)
        monkeypatch.setattr(triton_admm, "DEFAULT_CHUNK", 64)


@pytest.fixture(params=ISAS)
def isa(request):
    before = _C.isa()
    _C._set_isa(request.param)
    yield request.param
    _C._set_isa(before)


def device_of(backend):
    return TRITON_DEVICE if backend == "triton" else "cpu"


# =========================================================================== Z/U update


class ZUCase:
    """Tensors and per-tensor options of one Z/U update."""

    def __init__(self, rng, shapes, dtype, device="cpu", modes=None, values=None):
        gen = torch.Generator().manual_seed(rng.randrange(2**31))
        self.params, self.zs, self.us, self.targets = [], [], [], []
        self.keep, self.rows, self.tau = [], [], []
        for j, shape in enumerate(shapes):
            if values is None:
                w = torch.randn(shape, generator=gen)
                u = torch.randn(shape, generator=gen) * 0.5
            else:
                w, u = values(shape, gen)
            self.params.append(w.to(device=device, dtype=dtype))
            self.zs.append(torch.randn(shape, generator=gen).to(device))
            self.us.append(u.to(device))
            self.targets.append(None if rng.random() < 0.2 else torch.full(shape, 7.0, dtype=dtype, device=device))
            mode = rng.choice(["element", "rows", "soft"]) if modes is None else modes[j % len(modes)]
            n = num_rows(w) if mode == "rows" else w.numel()
            self.rows.append(mode == "rows")
            if mode == "soft":
                self.keep.append(None)
                self.tau.append(rng.choice([0.0, 0.1, 0.7]))
            else:
                self.keep.append(rng.choice([0, n, rng.randrange(n + 1), rng.randrange(n + 1)]))
                self.tau.append(None)

    def run(self, fn, **extra):
        out = copy.deepcopy(self)
        fn(out.params, out.zs, out.us, out.targets, keep=out.keep, rows=out.rows, tau=out.tau, **extra)
        return out


def assert_same(actual, expected, names=("params", "zs", "us", "targets")):
    """Equal values (a zero's sign aside), NaN where NaN."""
    for name in names:
        for i, (a, e) in enumerate(zip(getattr(actual, name), getattr(expected, name))):
            if e is None:
                assert a is None
                continue
            a, e = a.detach().cpu(), e.detach().cpu()
            assert a.dtype == e.dtype and a.shape == e.shape
            same = (a == e) | (a.isnan() & e.isnan())
            assert bool(same.all()), f"{name}[{i}] {tuple(e.shape)} {e.dtype}: {int((~same).sum())} values differ"


def zu_backend(backend):
    def run(params, zs, us, targets, **options):
        admm_zu_step(params, zs, us, targets, backend=backend, **options)
    return run


def test_reference_is_spec_6():
    """One update by hand: top-k, top rows, soft threshold; U and the target."""
    w = torch.tensor([[3.0, -1.0, 0.5], [0.1, -4.0, 2.0]])
    u = torch.tensor([[0.5, 0.0, -0.25], [0.0, 0.5, -1.0]])
    # v = W + U = [[3.5, -1, 0.25], [0.1, -3.5, 1]]
    for options, z_want in (
            (dict(keep=3), torch.tensor([[3.5, -1.0, 0.0], [0.0, -3.5, 0.0]])),  # |-1| ties |1|: lower index
            (dict(keep=1, rows=True), torch.tensor([[3.5, -1.0, 0.25], [0.0, 0.0, 0.0]])),  # 13.31 > 13.26
            (dict(tau=1.0), torch.tensor([[2.5, 0.0, 0.0], [0.0, -2.5, 0.0]]))):
        z, uu, target = torch.empty(2, 3), u.clone(), torch.empty(2, 3, dtype=torch.bfloat16)
        ref.admm_zu_step([w], [z], [uu], [target], **options)
        assert torch.equal(z, z_want), options
        assert torch.equal(uu, u + w - z_want)
        assert torch.equal(target, (z_want - uu).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cpp_matches_reference(isa, dtype):
    case = ZUCase(random.Random(f"{isa}{dtype}"), SHAPES * 2, dtype)
    assert_same(case.run(zu_backend("cpp")), case.run(ref.admm_zu_step))


@pytest.mark.parametrize("mode", ["element", "rows", "soft"])
def test_cpp_results_do_not_depend_on_threads(mode):
    case = ZUCase(random.Random(mode), [(60, 500), (3000, 9), (1, 40000), (40000,), (7,)], torch.bfloat16,
                  modes=[mode])
    expected = case.run(ref.admm_zu_step)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert_same(case.run(zu_backend("cpp")), expected)
    finally:
        torch.set_num_threads(threads)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_matches_reference(small_triton_blocks, dtype):
    case = ZUCase(random.Random(f"t{dtype}"), SMALL_SHAPES * 2, dtype, TRITON_DEVICE)
    assert_same(case.run(zu_backend("triton")), case.run(ref.admm_zu_step))


def _tied_values(shape, gen):
    """W in {+-1, +-2, +-3}, U = 0: most magnitudes tie."""
    w = torch.randint(1, 4, shape, generator=gen).float() * (torch.randint(0, 2, shape, generator=gen) * 2 - 1)
    return w, torch.zeros(shape)


def _tied_rows(shape, gen):
    """Rows drawn from three prototypes (and their negatives): row norms tie exactly."""
    protos = torch.randn((3,) + tuple(shape[1:]), generator=gen)
    pick = torch.randint(0, 3, (shape[0],), generator=gen)
    sign = (torch.randint(0, 2, (shape[0],), generator=gen) * 2 - 1).float()
    return protos[pick] * sign.view((-1,) + (1,) * (len(shape) - 1)), torch.zeros(shape)


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("rows", [False, True], ids=["elements", "rows"])
def test_exact_k_under_ties(small_triton_blocks, backend, rows):
    """Exactly k survive; among equal scores the lowest indices (rows)."""
    shapes = [(40,), (6, 7), (5, 2, 3, 3), (129,)] if backend == "triton" else [(100,), (37, 11), (16, 4, 3, 3), (4099,)]
    case = ZUCase(random.Random(backend), shapes, torch.float32, device_of(backend),
                  modes=["rows" if rows else "element"], values=_tied_rows if rows else _tied_values)
    out = case.run(zu_backend(backend))
    if backend != "reference":
        assert_same(out, case.run(ref.admm_zu_step))
    for w, z, keep in zip(case.params, out.zs, case.keep):
        w, z = w.cpu(), z.cpu()
        if rows:
            alive = ref.as_rows(z).ne(0).any(dim=1)
            score = ref.as_rows(w).double().square().sum(dim=1)
        else:
            alive = z.reshape(-1) != 0
            score = w.reshape(-1).abs().double()
        assert int(alive.sum()) == keep
        if 0 < keep < len(score):
            threshold = score[alive].min()
            assert bool((score[~alive] <= threshold).all())
            tied = (score == threshold).nonzero().view(-1)
            kept_tied = tied[alive[tied]]
            assert torch.equal(kept_tied, tied[:len(kept_tied)])  # the lowest indices


def _non_finite(shape, gen):
    """Gaussian W with NaN, +inf and -inf sprinkled in: a NaN score counts as +inf."""
    w = torch.randn(shape, generator=gen)
    flat = w.view(-1)
    pick = torch.randint(0, max(flat.numel(), 1), (max(flat.numel() // 8, 1),), generator=gen)
    if flat.numel():
        flat[pick] = torch.tensor([math.nan, math.inf, -math.inf])[torch.arange(len(pick)) % 3]
    return w, torch.randn(shape, generator=gen) * 0.1


@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on inf - inf
@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("mode", ["element", "rows", "soft"])
def test_nan_and_inf(small_triton_blocks, backend, mode):
    shapes = [(40,), (6, 7), (9, 3, 2, 2)] if backend == "triton" else [(600,), (37, 11), (16, 4, 3, 3)]
    case = ZUCase(random.Random(mode), shapes, torch.float32, device_of(backend), modes=[mode], values=_non_finite)
    assert_same(case.run(zu_backend(backend)), case.run(ref.admm_zu_step))


@pytest.mark.parametrize("backend", FAST)
def test_functional_routes_what_the_kernels_cannot_take_to_the_reference(small_triton_blocks, backend):
    """float64 W, bf16 Z/U, a target of another dtype and a strided view,
    beside fast tensors, in one call."""
    device = device_of(backend)
    case = ZUCase(random.Random(5), [(6, 40), (3, 17), (7,), (5, 4), (9,)], torch.float32, device,
                  modes=["element", "rows", "soft"])
    case.params[1] = case.params[1].double()
    case.zs[1], case.us[1] = case.zs[1].double(), case.us[1].double()
    case.zs[2], case.us[2] = case.zs[2].bfloat16(), case.us[2].bfloat16()
    case.targets[3] = torch.zeros(5, 4, dtype=torch.float16, device=device)
    case.params[4] = torch.randn(9, 3, device=device).t()[0]
    assert_same(case.run(zu_backend(backend)), case.run(ref.admm_zu_step))


BAD_CALLS = [
    ("z shape", lambda c: c.zs.__setitem__(1, torch.zeros(3, 18)), {}, "tensor 1: z has shape"),
    ("u shape", lambda c: c.us.__setitem__(2, torch.zeros(9)), {}, "tensor 2: u has shape"),
    ("target shape", lambda c: c.targets.__setitem__(0, torch.zeros(40, 6)), {}, "tensor 0: target has shape"),
    ("dtype mix", lambda c: c.us.__setitem__(1, c.us[1].half()), {}, "share a dtype"),
    ("shared memory", lambda c: c.zs.__setitem__(2, c.us[2]), {}, "distinct"),
    ("integer W", lambda c: c.params.__setitem__(1, torch.ones(3, 17, dtype=torch.int32)), {}, "floating-point"),
    ("k range", None, dict(k=[3, 2, 99]), "tensor 2: k=99 is out of range"),
    ("row k range", None, dict(k=[3, 4, 1], rows=True), "tensor 1: k=4 is out of range"),
    ("ratio", None, dict(ratio=[0.5, 0.5, 1.5]), "ratio=1.5"),
    ("ratio count", None, dict(ratio=[0.5, 0.5]), "one entry per tensor"),
    ("prox", None, dict(prox=["topk", "l2", "topk"], k=1), "prox must be one of"),
    ("l1 rho", None, dict(prox="l1", lam=0.1, rho=[1.0, 0.0, 1.0]), "tensor 1: prox='l1' needs lam >= 0 and rho > 0"),
]


@pytest.mark.parametrize("backend", FAST + ["reference"])
@pytest.mark.parametrize("what,breaker,options,message", BAD_CALLS, ids=[b[0] for b in BAD_CALLS])
def test_refused_calls_write_nothing(backend, what, breaker, options, message):
    device = device_of(backend)
    case = ZUCase(random.Random(0), [(6, 40), (3, 17), (8,)], torch.float32, device)
    case.targets = [torch.zeros(s, device=device) for s in ((6, 40), (3, 17), (8,))]
    if breaker is not None:
        breaker(case)
    before = copy.deepcopy(case)
    with pytest.raises(ValueError, match=message):
        admm_update_all(case.params, case.zs, case.us, case.targets, backend=backend,
                        **(options or dict(ratio=0.5)))
    assert_same(case, before)


def test_element_thresholds_resolve_ties_with_one_cut():
    s = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.5, 2.0, 2.0])
    (threshold,), (cut,) = element_thresholds([s], [4])  # 3, then the first three 2s
    assert threshold == 2.0 and cut == 5
    (threshold,), (cut,) = element_thresholds([s], [6])  # every 2 is kept
    assert threshold == 1.0 and cut == 6


def test_cpp_refuses_tables_of_another_layout():
    with pytest.raises(ValueError, match="columns"):
        _C.admm_zu(0, 0, len(ZU_FIELDS) + 1, 1)
    with pytest.raises(ValueError, match="columns"):
        _C.admm_scores(0, 0, len(ZU_FIELDS) - 1, 1)
    with pytest.raises(ValueError, match="columns"):
        _C.sas_admm_step(0, 0, len(SAS_FIELDS) + 1, 1)


@needs_triton
@pytest.mark.parametrize("chunk", [1, 64, 4096])
def test_triton_units_cover_every_element_once(chunk):
    tensors = [torch.zeros(s) for s in SHAPES]
    modes = [i % 3 for i in range(len(tensors))]
    scores = [torch.zeros(1) if m != 2 else None for m in modes]  # any non-zero pointer asks for scores
    keeps = [None if m == 2 else 1 for m in modes]
    taus = [0.1 if m == 2 else None for m in modes]
    table = build_zu_table(tensors, tensors, tensors, [None] * len(tensors), modes, keeps, taus, scores, None)
    score_units, units = triton_admm.zu_units(table, chunk)
    for i, t in enumerate(tensors):
        for which, covered in ((units, True), (score_units, modes[i] != 2)):
            mine = which[which[:, 0] == i]
            if t.numel() == 0 or not covered:
                assert len(mine) == 0
                continue
            assert mine[0, 1] == 0 and mine[-1, 2] == t.numel()
            assert torch.equal(mine[1:, 1], mine[:-1, 2])
            if which is score_units and modes[i] == 1:
                row_len = t.numel() // num_rows(t)
                assert bool((mine[:, 1:] % row_len == 0).all())


# --------------------------------------------------------------------------- the public API


def test_admm_update_matches_admm_update_all_and_ratio():
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(12, 5, generator=gen).bfloat16()
    z, u, target = torch.zeros(12, 5), torch.randn(12, 5, generator=gen), torch.empty(12, 5, dtype=torch.bfloat16)
    twins = [t.clone() for t in (z, u, target)]
    admm_update(w, z, u, target, ratio=0.85)
    assert int((z != 0).sum()) == kept_count(60, ratio=0.85) == 9
    ref.admm_zu_step([w], [twins[0]], [twins[1]], [twins[2]], keep=9)
    assert torch.equal(z, twins[0]) and torch.equal(u, twins[1]) and torch.equal(target, twins[2])


def _admm_model(dtype=torch.float32):
    gen = torch.Generator().manual_seed(8)
    shapes = [(8, 3, 3, 3), (8,), (16, 8, 3, 3), (16,), (10, 16), (10,)]
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


@pytest.mark.parametrize("backend", FAST + ["reference"])
def test_update_of_a_regkern_sgd_with_per_layer_ratios(backend):
    params = _admm_model()
    weights, vectors = params[0::2], params[1::2]
    opt = regkern.SGD([{"params": weights, "regularizer": regkern.ADMM(0.5)}, {"params": vectors}],
                      lr=0.05, momentum=0.9, backend="cpp" if backend == "triton" else backend)
    ratios = {weights[0]: 0.5, weights[1]: 0.9, weights[2]: 0.25}
    for step in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step)) + 0.1 * p.detach()
        opt.step()
        expected = [[t.clone() for t in (opt.state[p]["admm_z"], opt.state[p]["admm_u"], opt.state[p]["admm_target"])]
                    for p in weights]
        for p, (z, u, target) in zip(weights, expected):
            ref.admm_zu_step([p.detach()], [z], [u], [target], keep=kept_count(p.numel(), ratio=ratios[p]))
        update(opt, ratio=ratios, backend=backend)
        for p, (z, u, target) in zip(weights, expected):
            st = opt.state[p]
            assert torch.equal(st["admm_z"], z) and torch.equal(st["admm_u"], u) and torch.equal(st["admm_target"], target)
            assert int((st["admm_z"] != 0).sum()) == kept_count(p.numel(), ratio=ratios[p])
    # rows, one ratio per parameter as a list; l1 with the group's rho
    update(opt, ratio=[0.5, 0.5, 0.2], rows=True, backend=backend)
    assert [int(opt.state[p]["admm_z"].flatten(1).ne(0).any(1).sum()) for p in weights] == [4, 8, 8]
    w = weights[2].detach().clone()
    u = opt.state[weights[2]]["admm_u"].clone()
    update(opt, prox="l1", lam=0.25, backend=backend)  # tau = lam / rho = 0.5
    x = w + u
    assert torch.equal(opt.state[weights[2]]["admm_z"], x - x.clamp(-0.5, 0.5))


def test_update_refuses_bad_input_and_writes_nothing():
    params = _admm_model()
    plain = regkern.SGD(params, lr=0.1)
    with pytest.raises(ValueError, match="no ADMM parameters"):
        update(plain, ratio=0.5)
    opt = regkern.SGD([{"params": params[0::2], "regularizer": regkern.ADMM(0.5)}, {"params": params[1::2]}], lr=0.1)
    before = copy.deepcopy(opt.state_dict())
    for options, message in ((dict(ratio={params[0]: 0.5, params[2]: 0.5}), "no entry for ADMM parameter 2"),
                             (dict(ratio=[0.5, 0.5]), "one entry per tensor"),
                             (dict(k={params[0]: 3, params[2]: 3, params[4]: 1000}), "ADMM parameter 2: k=1000")):
        with pytest.raises(ValueError, match=message):
            update(opt, **options)
    after = opt.state_dict()
    for key, entry in before["state"].items():
        for name, value in entry.items():
            assert torch.equal(value, after["state"][key][name])


# =========================================================================== SAS-ADMM


class SASCase:
    """Parameters, gradients, SAS state and per-tensor coefficients of one step."""

    def __init__(self, rng, shapes, dtype, device="cpu", outer=None, layout=torch.contiguous_format):
        gen = torch.Generator().manual_seed(rng.randrange(2**31))

        def rand(shape, dt=torch.float32, scale=1.0):
            t = (torch.randn(shape, generator=gen) * scale).to(device=device, dtype=dt)
            return t.contiguous(memory_format=layout) if len(shape) == 4 else t

        self.params = [rand(s, dtype) for s in shapes]
        self.grads = [rand(s, dtype) for s in shapes]
        self.state = [[rand(s) for _ in range(5)] for s in shapes]  # w, w_breve, anchor, z, u
        self.coefficients = []
        for _ in shapes:
            t = rng.randrange(1, 8)
            m_k = t if (rng.random() < 0.5 if outer is None else outer) else t + 3
            self.coefficients.append(ref.sas_coefficients(
                t, m_k, rng.choice([0.04, 0.5, 2.0]), beta=rng.choice([0.04, 0.3, 1.0]),
                lam=rng.choice([0.0, 1e-4, 0.05]), r=0.9, s=1.09, rho=rng.choice([0.0, 0.04, 0.7])))

    def run(self, fn):
        out = copy.deepcopy(self)
        w, wb, anchor, z, u = (list(x) for x in zip(*out.state)) if out.state else ([],) * 5
        fn(out.params, out.grads, w, wb, anchor, z, u, coefficients=out.coefficients)
        return out


def sas_backend(backend):
    def run(params, grads, w, wb, anchor, z, u, *, coefficients):
        backend_admm.sas_admm_step(params, grads, w, wb, anchor, z, u, coefficients=coefficients, backend=backend)
    return run


def assert_sas_same(actual, expected):
    assert_same(actual, expected, ("params", "grads"))
    for i, (a, e) in enumerate(zip(actual.state, expected.state)):
        for name, x, y in zip(("w", "w_breve", "anchor", "z", "u"), a, e):
            same = (x == y) | (x.isnan() & y.isnan())
            assert bool(same.all()), f"{name} of tensor {i} ({tuple(y.shape)}): {int((~same).sum())} values differ"


def test_sas_reference_is_the_spec():
    """The reference step against the formulas of the SASADMM docstring in float64."""
    gen = torch.Generator().manual_seed(1)
    p, g, w, wb, anchor, z, u = (torch.randn(20, generator=gen, dtype=torch.float64) for _ in range(7))
    state = [t.clone() for t in (w, wb, anchor, z, u)]
    t, m_k, eta, beta, lam, rho = 3, 3, 0.5, 0.3, 0.05, 0.2
    co = ref.sas_coefficients(t, m_k, eta, beta=beta, lam=lam, r=0.9, s=1.09, rho=rho)
    ref.sas_admm_step([p], [g], *([s] for s in state), coefficients=co)
    c, b = 2 / (eta * t), 2 / (t + 1)
    wb_new = (c * wb + anchor - g) / (c + rho)
    w_new = b * wb_new + (1 - b) * w
    u_half = u - 0.9 * beta * (w_new - z)
    x = w_new - u_half / beta
    z_new = x.sign() * (x.abs() - lam / beta).clamp_min(0)
    u_new = u_half - 1.09 * beta * (w_new - z_new)
    for mine, want in zip(state + [p], (w_new, wb_new, rho * w_new + u_new - beta * (w_new - z_new), z_new, u_new,
                                        wb_new)):  # the next t is 1: W_hat = W_breve
        torch.testing.assert_close(mine, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sas_cpp_matches_reference(isa, dtype):
    case = SASCase(random.Random(f"{isa}{dtype}"), SHAPES, dtype)
    assert_sas_same(case.run(sas_backend("cpp")), case.run(ref.sas_admm_step))


def test_sas_cpp_results_do_not_depend_on_threads():
    case = SASCase(random.Random(9), [(60, 500), (3000, 9), (40000,), (7,)], torch.bfloat16)
    expected = case.run(ref.sas_admm_step)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            assert_sas_same(case.run(sas_backend("cpp")), expected)
    finally:
        torch.set_num_threads(threads)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sas_triton_matches_reference(small_triton_blocks, dtype):
    case = SASCase(random.Random(f"t{dtype}"), SMALL_SHAPES, dtype, TRITON_DEVICE)
    assert_sas_same(case.run(sas_backend("triton")), case.run(ref.sas_admm_step))


@pytest.mark.parametrize("backend", FAST)
def test_sas_dense_layouts_take_the_fast_path(small_triton_blocks, backend):
    """channels_last parameters and state walk as flat arrays; a gradient in
    another layout is copied into the parameter's."""
    device = device_of(backend)
    case = SASCase(random.Random(2), [(4, 3, 3, 3), (6, 2, 1, 5)], torch.bfloat16, device, layout=torch.channels_last)
    case.grads[1] = case.grads[1].contiguous()
    assert not case.params[0].is_contiguous()
    w, wb, anchor, z, u = zip(*case.state)
    assert SASPlan(case.params, w, wb, anchor, z, u, backend).slow_index == []
    assert_sas_same(case.run(sas_backend(backend)), case.run(ref.sas_admm_step))


def test_sas_functional_routes_float64_and_mixed_layouts_to_the_reference():
    case = SASCase(random.Random(3), [(5, 4), (6,), (3, 3)], torch.float32)
    case.params[1], case.grads[1] = case.params[1].double(), case.grads[1].double()
    case.state[1] = [t.double() for t in case.state[1]]
    case.state[2][3] = case.state[2][3].t().contiguous().t()  # z of tensor 2 transposed
    w, wb, anchor, z, u = zip(*case.state)
    assert SASPlan(case.params, w, wb, anchor, z, u, "cpp").slow_index == [1, 2]
    assert_sas_same(case.run(sas_backend("cpp")), case.run(ref.sas_admm_step))


def test_sas_table_columns():
    case = SASCase(random.Random(4), [(3, 4)], torch.float32)
    table = build_sas_table(case.params, case.grads, *([s] for s in case.state[0]))
    assert table.shape == (1, len(SAS_FIELDS)) and int(table[0, SAS_COLUMN["NUMEL"]]) == 12
    assert len(ZU_FIELDS) == ZU_COLUMN["KEEP"] + 1


# --------------------------------------------------------------------------- regkern.SASADMM


def _train(opt, params, steps, start=0):
    for step in range(start, start + steps):
        for i, p in enumerate(params):
            g = torch.Generator().manual_seed(100 * step + i)
            p.grad = (0.5 * p.detach().float() + torch.randn(p.shape, generator=g)).to(p.dtype)
        opt.step()


@pytest.mark.parametrize("backend", [b for b in CPU_BACKENDS if b != "reference"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sasadmm_backends_follow_the_reference_bit_for_bit(small_triton_blocks, backend, dtype):
    if backend == "triton" and TRITON_DEVICE != "cpu":
        pytest.skip("triton steps CPU tensors only under the interpreter")
    gen = torch.Generator().manual_seed(6)
    shapes = [(6, 3, 3, 3), (6,), (4, 5), (1,)]
    base = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    runs = {}
    for name in ("reference", backend):
        params = [torch.nn.Parameter(b.clone()) for b in base]
        groups = [{"params": params[:2]}, {"params": params[2:], "lam": 0.0, "rho": 0.1}]
        opt = SASADMM(groups, beta=0.3, lam=0.05, M=3, k0=2, q=1.5, v=4.0, backend=name)
        _train(opt, params, 11)  # outer steps at t = 3, 6, then M_k grows
        runs[name] = (params, opt)
    (ps, opt), (qs, opt2) = runs["reference"], runs[backend]
    for a, b in zip(ps, qs):
        assert torch.equal(a, b)
        for key in ("w", "w_breve", "z", "u", "anchor", "k", "t"):
            x, y = opt.state[a][key], opt2.state[b][key]
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    assert opt2._plans[0].plan.backend.name == backend and opt2._plans[0].plan.slow_index == []


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_sasadmm_fp32_follows_the_official_loop(backend):
    """The official sasPrun loop (float64) and regkern.SASADMM (fp32) on each
    backend, step for step, across the change of M_k at k0."""
    from test_admm import _lasso_problem, _minibatch_grad, official_sas
    A, b, lam, _ = _lasso_problem()
    grad_at = _minibatch_grad(A, b)
    hyper = dict(beta=0.5, lam=lam, M=4, k0=3, q=1.1, v=2.0)
    w0 = torch.randn(A.shape[1], generator=torch.Generator().manual_seed(9)).double()
    hats, W, Z, U = official_sas(w0, grad_at, max_iter=5, **hyper)
    p = torch.nn.Parameter(w0.float())
    opt = SASADMM([p], backend=backend, **hyper)
    for step, hat in enumerate(hats):
        torch.testing.assert_close(p.detach().double(), hat, rtol=1e-4, atol=1e-5)
        p.grad = grad_at(p.detach().double(), step).float()
        opt.step()
    st = opt.state[p]
    assert (st["k"], st["t"]) == (6, 1)
    for mine, theirs in ((st["w"], W), (st["z"], Z), (st["u"], U)):
        torch.testing.assert_close(mine.double(), theirs, rtol=1e-4, atol=1e-5)
    assert torch.equal(st["z"] == 0, Z == 0)


def test_sasadmm_refuses_bad_state_and_changes_nothing():
    params = _admm_model()
    opt = SASADMM(params, M=2)
    _train(opt, params, 3)
    victim = params[2]
    for name, bad, message in (("w", lambda st: torch.zeros(3), "'w'"),
                               ("u", lambda st: st["u"].half(), "'u'"),
                               ("t", lambda st: 0, "counter t=0")):
        saved = opt.state[victim][name]
        opt.state[victim][name] = bad(opt.state[victim])
        for p in params:
            p.grad = torch.ones_like(p)
        before = snapshot(opt, params)
        with pytest.raises(ValueError, match=message):
            opt.step()
        assert_unchanged(before, opt, params)
        opt.state[victim][name] = saved
    _train(opt, params, 1, start=3)  # repaired: steps again


def test_sasadmm_reuses_its_plan_and_sees_new_state():
    params = _admm_model()
    opt = SASADMM(params, M=3)
    _train(opt, params, 2)
    plan = opt._plans[0]
    _train(opt, params, 2, start=2)
    assert opt._plans[0] is plan  # counters moving in state do not rebuild the plan
    opt.state[params[0]]["u"] = torch.zeros_like(opt.state[params[0]]["u"])
    _train(opt, params, 1, start=4)
    assert opt._plans[0] is not plan
    assert math.isfinite(float(params[0].detach().sum()))
