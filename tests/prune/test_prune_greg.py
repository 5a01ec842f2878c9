"""GReg-1, GReg-2 and one-shot L1 (regkern.prune): the timetable of
docs/schedules.md, section "GReg" (when lambda changes, by how much, when phases switch, which rows are picked),
the cut, resuming through state_dict, and bad input."""
import math

import pytest
import torch

from regkern.prune import GReg1, GReg2, OneShotL1
from regkern.prune.greg import smallest
from prune_models import (TinyResNet, TinyVGG, example_inputs, make, same_tensors, sgd,  # noqa: F401
                               snapshot, train_step)

pytestmark = pytest.mark.usefixtures("one_thread")

PRUNED_LAYERS = ["layer1.0.conv1", "layer2.0.conv1"]  # the residual rule leaves only the first conv of each block


def fp32_sum(step: float, times: int) -> float:
    """``times`` fp32 additions of ``step`` to 0 (how the official reg tensor grows)."""
    v = torch.zeros((), dtype=torch.float32)
    for _ in range(times):
        v += step
    return float(v)


def mean_abs_rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).mean(1)


def conv(model, layer):
    return model.get_submodule(layer)


def test_greg1_timetable_rows_and_cut():
    model, x = make(), example_inputs()
    opt = sgd(model)
    expected_pruned = {n: smallest(mean_abs_rows(conv(model, n).weight), 4) for n in PRUNED_LAYERS}
    s = GReg1(model, opt, x, ratios=0.5, Ku=3, Ks=4, delta=0.1, tau=0.25)
    assert [u.name for u in s.units] == PRUNED_LAYERS and [u.n_prune for u in s.units] == [4, 4]
    for u in s.units:
        assert torch.equal(u.pruned, expected_pruned[u.name])
    assert s.phase == "update" and not s.done

    def check_lam(updates):
        for u in s.units:
            lam = opt.state[conv(model, u.name).weight]["lam"]
            want = torch.where(u.pruned, fp32_sum(0.1, updates), 0.0)
            assert torch.equal(lam, want), (s.iteration, lam, want)

    check_lam(1)  # the update of iteration 0 is written by the constructor
    for i in range(1, 12):
        train_step(model, opt, s, i)
        assert s.iteration == i
        check_lam(min(i // 3 + 1, 3))  # updates at 0, 3, 6; lam = 0.3 > tau at 6: finished
        assert s.phase == ("update" if i < 6 else "stabilize")
        assert s.done == (i >= 11)  # step 6 + Ks = 10 is the last with the penalty
    assert s.stabilize_start == 6 and all(u.finished == 6 for u in s.units)
    assert all(1.0 < u.ema < 1000 for u in s.units)

    kept = {n: conv(model, n).weight.detach()[~expected_pruned[n]].clone() for n in PRUNED_LAYERS}
    summary = s.prune()
    assert s.pruned and s.phase == "finetune"
    assert summary.layers == {n: (4, 8) for n in PRUNED_LAYERS} and summary.slice.params_after < summary.slice.params_before
    for n in PRUNED_LAYERS:
        assert torch.equal(conv(model, n).weight.detach(), kept[n])
        assert conv(model, n).out_channels == 4
        assert not opt.state[conv(model, n).weight]["lam"].any()  # fine-tuning without the penalty
    for i in range(12, 14):
        train_step(model, opt, s, i)
    assert s.phase == "finetune" and s.iteration == 13
    with pytest.raises(ValueError, match="already pruned"):
        s.prune()


def test_greg1_magnitude_ratio_finishes_a_layer():
    model = make()
    opt = sgd(model)
    s = GReg1(model, opt, example_inputs(), ratios=0.5, Ku=5, Ks=2, mag_ratio_limit=1.0)
    # the pruned rows are the smallest, so mean|kept| / mean|pruned| >= 1 at once
    assert s.phase == "stabilize" and s.stabilize_start == 0 and all(u.finished == 0 for u in s.units)
    for i in range(1, 4):
        train_step(model, opt, s, i)
        assert s.done == (i >= 3)

    u = s.units[0]  # the EMA: first value as is, then 0.9 old + 0.1 new
    u.ema = None
    w_abs, mask = torch.tensor([1.0, 2.0, 4.0, 8.0]), torch.tensor([True, False, False, True])
    s._track_ratio(u, w_abs, mask)
    assert u.ema == pytest.approx(3.0 / 4.5)
    s._track_ratio(u, torch.tensor([1.0, 3.0, 3.0, 1.0]), mask)
    assert u.ema == pytest.approx(0.9 * 3.0 / 4.5 + 0.1 * 3.0)
    s._track_ratio(u, w_abs, torch.zeros(4, dtype=torch.bool))
    assert u.ema == math.inf


def test_greg2_picking_then_push_and_recover():
    model, x = make(), example_inputs()
    opt = sgd(model, lr=0.002)
    s = GReg2(model, opt, x, ratios=0.5, Ku=2, Ks=1, delta=0.125, delta_pick=0.25, pick_ceiling=0.5,
              recover=-0.0625, tau=0.7)
    weights = {n: conv(model, n).weight for n in PRUNED_LAYERS}

    def lam(n):
        return opt.state[weights[n]]["lam"]

    assert s.phase == "picking" and s.picked == {}
    assert all(torch.equal(lam(n), torch.full((8,), 0.25)) for n in PRUNED_LAYERS)
    expected = {}
    for i in range(1, 9):
        train_step(model, opt, None, i)
        if i == 2:  # the update after step 2 picks by the magnitudes it sees now
            expected = {n: smallest(mean_abs_rows(w), 4) for n, w in weights.items()}
        s.step()
        for n in PRUNED_LAYERS:
            if i < 2:
                assert torch.equal(lam(n), torch.full((8,), 0.25))
            elif i < 4:
                assert torch.equal(lam(n), torch.full((8,), 0.5))
            else:
                pushed = 0.625 if i < 6 else 0.75
                assert torch.equal(lam(n), torch.where(expected[n], pushed, -0.0625)), (i, lam(n))
        assert s.phase == ("picking" if i < 2 else "update" if i < 6 else "stabilize")
        assert s.done == (i >= 8)  # finished at 6 (0.75 > tau), Ks = 1
    assert {n: m.tolist() for n, m in s.picked.items()} == {n: m.tolist() for n, m in expected.items()}
    assert all(u.picked == 2 and u.finished == 6 for u in s.units)
    s.prune()
    assert [conv(model, n).out_channels for n in PRUNED_LAYERS] == [4, 4]


def test_greg_scope_writes_bn_rows_and_consumer_columns():
    model = make()
    opt = sgd(model)
    s = GReg1(model, opt, example_inputs(), ratios={"layer1.0.conv1": 0.5}, Ku=10, scope="group")
    pruned = s.units[0].pruned
    block = model.layer1[0]
    assert torch.equal(opt.state[block.bn1.weight]["lam"], torch.where(pruned, fp32_sum(1e-4, 1), 0.0))
    assert torch.equal(opt.state[block.conv2.weight]["lam_cols"], torch.where(pruned, fp32_sum(1e-4, 1), 0.0))
    assert "lam" not in opt.state[model.layer2[0].conv1.weight]  # ratio 0: untouched


def test_greg_weight_mode_masks_exact_zeros():
    model = make(TinyVGG)
    opt = sgd(model)
    s = GReg1(model, opt, None, ratios="[0-1:0.5]", mode="weight", Ku=1, Ks=1, delta=0.05, tau=0.12)
    w = model.features[0].weight
    assert opt.state[w]["lam"].shape == w.shape and "lam" not in opt.state[model.classifier.weight]
    u = s.units[0]
    assert int(u.pruned.sum()) == math.ceil(0.5 * w.numel())
    for i in range(1, 10):
        train_step(model, opt, s, i)
        if s.done:
            break
    assert s.iteration == 4  # updates 0.05, 0.1, 0.15 > tau at iteration 2, one more step, done
    summary = s.prune()
    assert not summary.structured and summary.layers["features.0"] == (w.numel() - int(u.pruned.sum()), w.numel())
    assert torch.equal(opt.state[w]["mask"], ~u.pruned) and not opt.state[w]["lam"].any()
    for i in range(10, 13):
        train_step(model, opt, s, i)
    assert bool((w.detach()[u.pruned] == 0).all()) and bool((w.detach()[~u.pruned] != 0).all())


def test_one_shot_l1_prunes_the_greg1_row_count_by_l1():
    model = make()
    opt = sgd(model)
    ratios = "[1:0.3, 3:0.6]"
    l1 = OneShotL1(model, opt, example_inputs(), ratios=ratios)
    other = make()
    greg = GReg1(other, sgd(other), example_inputs(), ratios=ratios)
    assert [(u.name, u.n_prune) for u in l1.units] == [(u.name, u.n_prune) for u in greg.units] \
        == [("layer1.0.conv1", 3), ("layer2.0.conv1", 5)]
    assert l1.done and l1.phase == "ready"
    for u in l1.units:
        l1_norms = conv(model, u.name).weight.detach().abs().reshape(8, -1).sum(1)
        assert torch.equal(u.pruned, smallest(l1_norms, u.n_prune))
    summary = l1.prune()
    assert summary.layers == {"layer1.0.conv1": (5, 8), "layer2.0.conv1": (3, 8)}
    train_step(model, opt, l1, 0)


def run(model_fn, opt_fn, sched_fn, steps, stop=None, state=None):
    """Train ``steps`` steps with pruning when done; with ``stop``, return a
    snapshot after that many; with ``state``, resume from it first."""
    model = model_fn()
    opt = opt_fn(model)
    sched = sched_fn(model, opt)
    start = 1
    if state is not None:
        sched.load_state_dict(state["schedule"])
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        start = sched.iteration + 1
    for i in range(start, steps + 1):
        train_step(model, opt, sched, i)
        if sched.done and not sched.pruned:
            sched.prune()
        if stop is not None and i == stop:
            return snapshot(model, opt, sched)
    return model, opt, sched


@pytest.mark.parametrize("cls, kwargs, stops", [
    (GReg1, dict(ratios=0.5, Ku=2, Ks=3, delta=0.1, tau=0.35), (3, 11)),   # mid-update; after the cut
    (GReg2, dict(ratios=0.5, mode="weight", Ku=2, Ks=2, delta=0.1, delta_pick=0.25, pick_ceiling=0.5, tau=0.55),
     (3,)),                                                                # mid-picking
])
def test_resume_mid_schedule_reproduces_the_run(cls, kwargs, stops):
    model_fn = lambda: make(TinyResNet)  # noqa: E731
    opt_fn = lambda m: sgd(m, lr=0.01)  # noqa: E731
    sched_fn = lambda m, o: cls(m, o, example_inputs(), **kwargs)  # noqa: E731
    steps = 14
    model, opt, sched = run(model_fn, opt_fn, sched_fn, steps)
    assert sched.pruned
    ref = snapshot(model, opt, sched)
    for stop in stops:
        state = run(model_fn, opt_fn, sched_fn, steps, stop=stop)
        model2, opt2, sched2 = run(model_fn, opt_fn, sched_fn, steps, state=state)
        got = snapshot(model2, opt2, sched2)
        assert same_tensors(got["model"], ref["model"]), stop
        for k, v in ref["optimizer"]["state"].items():
            assert same_tensors(got["optimizer"]["state"][k], v), (stop, k)
        assert got["schedule"]["iteration"] == ref["schedule"]["iteration"] == steps
        for a, b in zip(got["schedule"]["units"], ref["schedule"]["units"]):
            assert (a["ema"], a["finished"], a["picked"]) == (b["ema"], b["finished"], b["picked"])
            assert torch.equal(a["pruned"], b["pruned"])


def test_prune_before_done_needs_force():
    model = make()
    opt = sgd(model)
    s = GReg2(model, opt, example_inputs(), ratios=0.5)
    with pytest.raises(ValueError, match="not done yet"):
        s.prune()
    summary = s.prune(force=True)
    assert any("forced" in n for n in summary.notes) and summary.layers["layer1.0.conv1"] == (4, 8)


@pytest.mark.parametrize("kwargs, match", [
    (dict(Ku=0), "Ku"),
    (dict(Ks=-1), "Ks"),
    (dict(delta=0.0), "delta"),
    (dict(tau=float("nan")), "tau"),
    (dict(mode="channel"), "mode must be one of"),
    (dict(scope="all"), "scope must be one of"),
    (dict(ratios=1.2), "out of range"),
    (dict(ratios={"layer1.0.conv2": 0.5}), "cannot lose output rows"),  # residual add
    (dict(ratios={"fc": 0.5}), "'fc' is ignored"),                       # the classifier
    (dict(ratios={"layer5.conv": 0.5}), "not a conv/linear layer"),
    (dict(ratios="[0:0.5, 2-:0.3]"), "not a layer index"),
    (dict(skip=["nope"]), "no conv/linear layer"),
])
def test_bad_input_is_refused_and_nothing_is_written(kwargs, match):
    model = make()
    opt = sgd(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        GReg1(model, opt, example_inputs(), **{"ratios": 0.5, **kwargs})
    assert len(opt.state) == 0 or all(len(st) == 0 for st in opt.state.values())
    assert same_tensors(model.state_dict(), before)


def test_other_bad_input():
    model = make()
    opt = sgd(model)
    with pytest.raises(ValueError, match="needs example_inputs"):
        GReg1(model, opt, None, ratios=0.5)
    opt.state[model.conv1.weight]["lam"] = torch.ones(8)  # a per-row penalty already in use
    with pytest.raises(ValueError, match="non-zero values"):
        GReg1(model, opt, None, ratios={"conv1": 0.5}, mode="weight", ignore=())
    other = make()
    with pytest.raises(ValueError, match="does not hold parameter"):
        GReg1(other, opt, example_inputs(), ratios=0.5)
    s = GReg1(model, sgd(model), example_inputs(), ratios=0.5)
    with pytest.raises(ValueError, match="not from GReg1"):
        s.load_state_dict({"method": "GReg2"})
    m2, m3 = make(), make()
    g2 = GReg2(m2, sgd(m2), example_inputs(), ratios=0.3)
    with pytest.raises(ValueError, match="other layers or ratios"):
        GReg2(m3, sgd(m3), example_inputs(), ratios=0.5).load_state_dict(g2.state_dict())


@pytest.mark.parametrize("cls, kwargs", [
    (GReg1, dict(ratios=0.5, Ku=2, Ks=3, delta=0.1, tau=0.35, scope="group")),  # per-row lam and lam_cols
    (GReg2, dict(ratios=0.5, mode="weight", Ku=2, Ks=2, delta=0.1, delta_pick=0.25, pick_ceiling=0.5, tau=0.55)),
])
def test_the_default_fused_backend_follows_the_reference_trajectory(cls, kwargs, monkeypatch):
    import prune_models

    def run(backend):
        monkeypatch.setattr(prune_models, "BACKEND", backend)
        model = make()
        opt = sgd(model)
        s = cls(model, opt, example_inputs(), **kwargs)
        for i in range(1, 15):
            train_step(model, opt, s, i)
            if s.done and not s.pruned:
                s.prune()
        return model.state_dict(), s

    ref, s_ref = run("reference")
    got, s_got = run(None)  # the device's default: the C++ kernel on CPU
    assert s_got.pruned and [u.pruned.tolist() for u in s_got.units] == [u.pruned.tolist() for u in s_ref.units]
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-5, atol=1e-6)
