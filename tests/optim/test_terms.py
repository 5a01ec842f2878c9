"""regkern.terms: the state declarations agree with what the regularizers
create, and checkpoint loading, slicing, routing, the coefficient checks and
the torch-op path read their lists from it."""
import inspect
import io
import math

import pytest
import torch
from torch import nn

import regkern
from regkern import slicing, terms
from regkern.backends import sgd as backend
from regkern.backends.backend import choose_backend
from regkern.groups import find_groups
from regkern.optim import torch_path
from regkern.reference.sgd import sgd_step as reference_sgd_step
from regkern.regularizers import Regularizer

from optim_helpers import CPU_BACKENDS

SHAPES = [(), (6,), (5, 4), (3, 4, 2, 2)]


def every_regularizer():
    """One instance of each registered regularizer, RowL2 with all its options."""
    regs = [cls() for cls in Regularizer.registry.values() if cls is not regkern.RowL2]
    return regs + [regkern.RowL2(), regkern.RowL2(track_norms=True, columns=True)]


def created_state(reg, param):
    state = {}
    reg.init_group([param], [state])
    return state


@pytest.mark.parametrize("reg", every_regularizer(), ids=lambda r: repr(r))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_regularizers_create_exactly_their_declared_entries(reg, shape, dtype):
    param = nn.Parameter(torch.randn(shape).to(dtype))
    state = created_state(reg, param)
    layouts = reg.state_layouts(param)
    assert list(state) == list(layouts)
    for key, value in state.items():
        entry = terms.STATE_BY_KEY[key]
        assert layouts[key] in entry.layouts
        assert value.shape == terms.layout_shape(layouts[key], param.shape, entry), key
        assert value.dtype == terms.entry_dtype(key, param.dtype), key
        assert value.device == param.device


def test_every_declared_entry_is_made_by_a_regularizer_or_is_a_mask():
    made = set()
    for reg in every_regularizer():
        for shape in SHAPES:
            made |= set(created_state(reg, nn.Parameter(torch.randn(shape))))
    assert made | {"mask"} == set(terms.STATE_BY_KEY)
    assert all(set(e.layouts) <= set(terms.LAYOUTS) for e in terms.SGD_STATE)


def test_existing_entries_are_kept():
    param = nn.Parameter(torch.randn(5, 4))
    for reg in every_regularizer():
        state = created_state(reg, param)
        before = dict(state)
        reg.init_group([param], [state])
        assert all(state[k] is before[k] for k in before if k != "polar")  # polar: shared anew


def test_step_options_are_declared():
    for reg in every_regularizer():
        assert set(reg.step_options()) <= set(terms.STEP_OPTIONS)


# --------------------------------------------------------------------------- checkpoints

def test_fixed_dtype_entries_load_as_saved():
    assert set(regkern.SGD.fixed_dtype_state) == {e.key for e in terms.SGD_STATE if e.dtype is not None}
    torch.manual_seed(0)

    def build():
        weight = nn.Parameter(torch.randn(6, 4, dtype=torch.bfloat16))
        other = nn.Parameter(torch.randn(5, 3, dtype=torch.bfloat16))
        scales = nn.Parameter(torch.rand(6, dtype=torch.bfloat16))
        opt = regkern.SGD([{"params": [weight], "regularizer": [regkern.RowL2(track_norms=True, columns=True),
                                                                 regkern.L1(), regkern.ProxL1()]},
                           {"params": [other], "regularizer": regkern.ADMM()},
                           {"params": [scales], "regularizer": regkern.Polarization()}], lr=0.1, momentum=0.9)
        opt.state[weight]["mask"] = torch.ones(6, dtype=torch.bool)
        return [weight, other, scales], opt

    params, opt = build()
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    params2, opt2 = build()
    opt2.load_state_dict(torch.load(buffer, weights_only=True))
    seen = set()
    for p, q in zip(params, params2):
        for key, value in opt.state[p].items():
            loaded = opt2.state[q][key]
            if key in terms.STATE_BY_KEY:
                seen.add(key)
                assert loaded.dtype == terms.entry_dtype(key, q.dtype), key
            if key == "polar":  # made anew by init_group; m and s are refreshed before each step
                loaded, value = loaded[:2], value[:2]
            assert torch.equal(loaded.float(), value.float()), key
    assert seen == set(terms.STATE_BY_KEY)


# --------------------------------------------------------------------------- slicing

def test_slicing_uses_the_declared_layouts():
    assert slicing.ROW_STATE is terms.ROW_STATE and slicing.COLUMN_STATE is terms.COLUMN_STATE
    assert slicing.SHARED_STATE is terms.SHARED_STATE
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(2, 5)
    first, second = model[0].weight, model[2].weight
    opt = regkern.SGD([{"params": [first], "regularizer": [regkern.RowL2(track_norms=True), regkern.L1(),
                                                            regkern.ProxL1()]},
                       {"params": [second], "regularizer": [regkern.RowL2(columns=True), regkern.ADMM()]},
                       {"params": [model[0].bias, model[2].bias]}], lr=0.1)
    opt.state[first]["mask"] = torch.ones(6, dtype=torch.bool)
    layouts = {first: {"lam": "row", "row_norms": "row3", "l1": "row", "prox_lam": "row", "mask": "row"},
               second: {"lam": "row", "lam_cols": "column", "admm_z": "element", "admm_u": "element",
                        "admm_target": "element"}}
    group = next(g for g in find_groups(model, x) if g.name == "0")
    slicing.slice_model(model, {group: [1, 4]}, opt)
    assert first.shape == (4, 5) and second.shape == (3, 4)
    for p, expected in layouts.items():
        for key, layout in expected.items():
            assert opt.state[p][key].shape == terms.layout_shape(layout, p.shape), key


# --------------------------------------------------------------------------- routing and checks

def test_plan_keywords_are_the_declared_ones():
    assert backend.TERM_KEYWORDS is terms.TERM_KEYWORDS and backend.COEFFICIENT_KEYS is terms.COEFFICIENT_KEYS
    keywords = set(terms.STEP_STATE.values()) | {kw for kw, _ in terms.STEP_OPTIONS.values()}
    plan_keywords = set(terms.TERM_ABSENT) | set(terms.CORE_ABSENT) | set(terms.POSITIONAL_KEYWORDS)
    assert keywords == plan_keywords
    assert keywords <= set(inspect.signature(reference_sgd_step).parameters)
    assert {kw for kws in terms.TERM_KEYWORDS.values() for kw in kws} == set(terms.TERM_ABSENT)
    for name in CPU_BACKENDS:
        chosen = choose_backend(torch.device("cpu"), name)
        for family in ("sgd", "adam"):
            assert chosen.terms(family) <= set(terms.TERM_KEYWORDS)
    assert set(backend.SGD_FIELDS) >= {e.column for e in terms.SGD_STATE if e.column is not None}


def test_the_optimizer_hands_its_plan_every_declared_input():
    param = nn.Parameter(torch.randn(5, 4))
    opt = regkern.SGD([{"params": [param], "regularizer": [regkern.RowL2(track_norms=True, columns=True),
                                                            regkern.L1(), regkern.ProxL1(), regkern.ADMM(),
                                                            regkern.Clamp(-1, 1)]}], lr=0.1, backend="reference")
    opt.state[param]["mask"] = torch.ones(5, dtype=torch.bool)
    param.grad = torch.randn_like(param)
    opt.step()
    (cached,) = opt._plans.values()
    plan = cached.plan
    assert set(plan.terms) == set(terms.TERM_ABSENT) | set(terms.CORE_ABSENT)
    state = opt.state[param]
    for key, keyword in terms.STEP_STATE.items():
        if keyword in plan.terms:
            value = plan.terms[keyword][0]
            assert value is state.get(key), key
    lam, mask, norms = plan.columns[0][2:]
    assert lam is state["lam"] and mask is state["mask"] and norms is state["row_norms"]
    assert [key for _, key, _ in plan.coefficients] == list(terms.FINITE_STATE)


@pytest.mark.parametrize("name", CPU_BACKENDS)
@pytest.mark.parametrize("key", terms.FINITE_STATE)
def test_declared_coefficients_are_checked_finite(name, key):
    param = nn.Parameter(torch.randn(5, 4))
    opt = regkern.SGD([{"params": [param], "regularizer": [regkern.RowL2(columns=True), regkern.L1(),
                                                            regkern.ProxL1()]}], lr=0.1, backend=name)
    param.grad = torch.randn_like(param)
    opt.step()
    before = param.detach().clone()
    opt.state[param][key][0] = math.nan
    param.grad = torch.randn_like(param)
    with pytest.raises(ValueError, match=rf"state\['{key}'\]"):
        opt.step()
    assert torch.equal(param.detach(), before)


def test_torch_path_terms_are_the_declared_ones():
    assert set(torch_path._Terms.__slots__) == set(terms.STEP_STATE) | set(terms.STEP_OPTIONS)
    t = torch_path._Terms({key: torch.zeros(1) for key in terms.STATE_BY_KEY}, {"admm_rho": 1.0})
    assert t.gradient_terms() == list(terms.GRADIENT_STATE)
    assert torch_path._Terms({"admm_target": torch.zeros(1)}, {}).gradient_terms() == []  # no rho: no pull
    assert not torch_path._Terms({}, {}).after_update()
    for key in terms.UPDATE_STATE:
        assert torch_path._Terms({key: torch.zeros(1)}, {}).after_update()
    for option in terms.UPDATE_OPTIONS:
        assert torch_path._Terms({}, {option: (0.0, 1.0) if option == "clamp" else 1}).after_update()


@pytest.mark.parametrize("family,build", [
    ("sgd", lambda ps: regkern.SGD(ps, lr=0.1, momentum=0.9, backend="reference")),
    ("adam", lambda ps: regkern.AdamW(ps, amsgrad=True, backend="reference")),
    ("rda", lambda ps: regkern.RDA(ps, lr=0.1, lam=1e-3, backend="reference")),
    ("sas_admm", lambda ps: regkern.SASADMM(ps, M=2)),
])
def test_family_state_declares_what_each_optimizer_keeps(family, build):
    """Every per-parameter entry an optimizer's step creates is declared in
    FAMILY_STATE with its layout and dtype (the checkpoint rules derive from it)."""
    from regkern.terms import FAMILY_STATE, layout_shape

    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = build(params)
    for _ in range(2):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    declared = {e.key: e for e in FAMILY_STATE[family]}
    for p in params:
        for key, value in opt.state[p].items():
            if key in terms.STATE_BY_KEY:
                continue  # a regularizer term's entry (SGD_STATE)
            assert key in declared, f"{family} keeps state[{key!r}] without declaring it in regkern.terms"
            entry = declared[key]
            if not isinstance(value, torch.Tensor):
                assert entry.layouts == ("scalar",) and isinstance(value, int), key  # a counter
                continue
            assert value.shape in {layout_shape(layout, tuple(p.shape), entry) for layout in entry.layouts}
            assert value.dtype == (entry.dtype or p.dtype), key
