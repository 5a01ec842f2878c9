"""GReg-1 / GReg-2 against the official timetable (MingSun-Tse/Regularization-Pruning,
``pruner/reg_pruner.py``; docs/schedules.md, section "GReg"): which layers finish
when, the magnitude-ratio EMA, weight mode finishing at tau only, the row counts,
the default increments and the residual ratio-0 layers.

The timetables here call ``schedule.step()`` without training: the weights only
change where a test writes them, so every magnitude ratio is known."""
import math

import pytest
import torch
from torch import nn

import regkern
from regkern.prune import GReg1, GReg2, pruned_count
from regkern.prune.greg import smallest
from prune_models import TinyResNet, TinyVGG, example_inputs, make, sgd  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

A, B = "layer1.0.conv1", "layer2.0.conv1"  # the two pruned layers of TinyResNet, in update order


def fp32_sum(step: float, times: int) -> float:
    v = torch.zeros((), dtype=torch.float32)
    for _ in range(times):
        v += step
    return float(v)


def first_above(step: float, limit: float, strict: bool) -> int:
    """How many fp32 additions of ``step`` to 0 first pass ``limit`` (``>`` or ``>=``)."""
    v, n = torch.zeros((), dtype=torch.float32), 0
    while not (v > limit if strict else v >= limit):
        v += step
        n += 1
    return n


def rows_mean_abs(w: torch.Tensor) -> torch.Tensor:
    return w.detach().abs().reshape(w.shape[0], -1).mean(1)


def shrink_smallest(model, layer: str, n: int, factor: float) -> torch.Tensor:
    """Scale the ``n`` rows of smallest mean |W| of ``layer`` by ``factor``; returns their mask."""
    w = model.get_submodule(layer).weight
    mask = smallest(rows_mean_abs(w), n)
    with torch.no_grad():
        w[mask] *= factor
    return mask


def unit(s, name):
    return next(u for u in s.units if u.name == name)


def ratio_of(s, u) -> torch.Tensor:
    """mean|kept| / mean|pruned| of the schedule's own row scores, a 0-d fp32 tensor."""
    scores = s._scores([u], "mean_abs")[0]
    return scores[~u.pruned].mean() / scores[u.pruned].mean()


# -- GReg-1: a layer finishes at tau, or when EVERY layer's ratio has reached the limit -------------

def test_greg1_a_layer_whose_ratio_reaches_the_limit_waits_for_the_others():
    model = make()
    opt = sgd(model)
    s = GReg1(model, opt, example_inputs(), ratios=0.5, Ku=1, Ks=0, delta=0.01, tau=1.0, mag_ratio_limit=100.0)
    a, b = unit(s, A), unit(s, B)
    assert a.ema < 100 and b.ema < 100
    s.step()
    assert torch.equal(shrink_smallest(model, A, 4, 1e-4), a.pruned)  # A's ratio jumps to about 1e4
    for i in range(2, 5):  # A's EMA is past 100 from the update of 2 on, B's is not: nobody finishes
        s.step()
        assert a.ema >= 100 and b.ema < 100, i
        assert a.finished is None and b.finished is None and s.phase == "update", i
    assert torch.equal(shrink_smallest(model, B, 4, 1e-5), b.pruned)  # B's EMA passes 100 at the update of 5
    s.step()
    # A is updated first and still sees B below the limit; B then reaches it, every layer has, B finishes
    assert b.ema >= 100 and (a.finished, b.finished) == (None, 5) and s.phase == "update"
    s.step()
    assert (a.finished, b.finished) == (6, 5) and s.phase == "stabilize" and s.stabilize_start == 6
    w_a = model.get_submodule(A).weight
    assert torch.equal(opt.state[w_a]["lam"], torch.where(a.pruned, fp32_sum(0.01, 7), 0.0))
    s.step()
    assert s.done


def test_greg1_without_every_layer_at_the_limit_layers_finish_at_tau():
    model = make()
    opt = sgd(model)
    s = GReg1(model, opt, example_inputs(), ratios=0.5, Ku=2, Ks=1, delta=0.25, tau=1.0, mag_ratio_limit=100.0)
    a, b = unit(s, A), unit(s, B)
    shrink_smallest(model, A, 4, 1e-4)
    for _ in range(8):
        s.step()
    # lam = 0.25 k > 1 at the 5th update (iteration 8), for both layers, although A's ratio was at the limit from 2
    assert a.ema >= 100 and b.ema < 100 and (a.finished, b.finished) == (8, 8) and s.stabilize_start == 8
    assert not s.done
    for _ in range(2):
        s.step()
    assert s.done and s.iteration == 10  # step 8 + Ks = 9 has run


def test_greg1_first_update_sees_only_the_layers_tracked_so_far():
    # official: the ratios checked are those recorded so far, so in the very first update the first layer
    # compares only with itself (and a layer finished at tau below the limit blocks the rule for good)
    model = make()
    opt = sgd(model)
    shrink_smallest(model, A, 4, 1e-4)
    s = GReg1(model, opt, example_inputs(), ratios=0.5, Ku=1, Ks=0, delta=0.25, tau=1.0, mag_ratio_limit=100.0)
    a, b = unit(s, A), unit(s, B)
    assert (a.finished, b.finished) == (0, None)
    for _ in range(4):
        s.step()
    assert b.ema < 100 and b.finished == 4 and s.phase == "stabilize"  # B at tau: 0.25 * 5 > 1


def test_greg1_magnitude_ratio_ema_runs_in_fp32():
    model = make()
    opt = sgd(model)
    s = GReg1(model, opt, example_inputs(), ratios=0.5, Ku=1, Ks=0, tau=1.0)
    a = unit(s, A)
    w = model.get_submodule(A).weight
    ema = ratio_of(s, a)
    assert a.ema == float(ema)  # the first value as is
    for k in range(3):
        with torch.no_grad():
            w[a.pruned] *= 0.5  # the ratio doubles at each update
        s.step()
        ema = ema * 0.9 + ratio_of(s, a) * 0.1  # fp32 tensors, as the official code computes it
        assert a.ema == float(ema), k


# -- weight mode: no magnitude ratio, layers finish at tau only -------------------------------------

def test_greg1_weight_mode_finishes_at_tau_only():
    model = make(TinyVGG)
    opt = sgd(model)
    s = GReg1(model, opt, None, ratios="[0-1:0.5]", mode="weight", Ku=1, Ks=0, delta=0.3, tau=1.0,
              mag_ratio_limit=1.0)  # a ratio would be >= 1 at once: the pruned weights are the smallest
    assert all(u.ema is None and u.finished is None for u in s.units)
    for i in range(1, 4):
        s.step()
        assert all(u.finished == (3 if i == 3 else None) for u in s.units)  # 0.3 k > 1 at the 4th update
    assert all(u.ema is None for u in s.units) and s.phase == "stabilize"


def test_greg2_weight_mode_finishes_at_tau_only():
    model = make(TinyVGG)
    opt = sgd(model)
    s = GReg2(model, opt, None, ratios="[0-1:0.5]", mode="weight", Ku=1, Ks=0, delta=0.3, delta_pick=0.25,
              pick_ceiling=0.5, tau=1.0, mag_ratio_limit=1.0)
    for i in range(1, 5):
        s.step()
        assert all(u.picked == 1 for u in s.units)  # 0.25, 0.5 >= ceiling: picked at the update of 1
        # pruned: 0.5, 0.8, 1.1 > tau at the update of 3 (not at the pick, whatever the ratio)
        assert all(u.finished == (3 if i >= 3 else None) for u in s.units), i
    assert all(u.ema is None for u in s.units)


def test_greg2_filter_mode_finishes_on_its_own_ratio_once_picked():
    model = make()
    opt = sgd(model)
    shrink_smallest(model, A, 4, 1e-4)  # A at the limit, B far below: GReg-2 does not wait for B
    s = GReg2(model, opt, example_inputs(), ratios=0.5, Ku=1, Ks=0, delta=0.1, delta_pick=0.25, pick_ceiling=0.5,
              tau=1.0, mag_ratio_limit=100.0)
    a, b = unit(s, A), unit(s, B)
    assert a.ema >= 100 and a.finished is None  # not picked yet
    s.step()
    assert (a.picked, a.finished) == (1, 1) and (b.picked, b.finished) == (1, None)
    v, pushes = torch.full((), 0.5), 0  # B's pruned lam after picking, then + 0.1 per update until above tau
    while not v > 1.0:
        v += 0.1
        pushes += 1
    for _ in range(pushes):
        s.step()
    assert b.finished == 1 + pushes and b.ema < 100 and s.phase == "stabilize"


# -- the default increments ---------------------------------------------------------------------

def test_greg1_default_increments_reach_tau_as_the_official_fp32_reg():
    model = make(TinyVGG)
    opt = sgd(model)
    s = GReg1(model, opt, None, ratios="[0:0.5]", mode="weight", Ku=1, Ks=0)  # 1e-4 per update, tau 1.0
    n = first_above(1e-4, 1.0, strict=True)
    while s.phase == "update":
        s.step()
    u = s.units[0]
    assert u.finished == n - 1 and float(u.lam.max()) == fp32_sum(1e-4, n)
    assert not u.lam[~u.pruned].any()  # kept weights keep lam 0


def test_greg2_default_picking_and_push():
    model = make()
    opt = sgd(model)
    s = GReg2(model, opt, example_inputs(), ratios={A: 0.5}, Ku=1, Ks=0)
    n = first_above(1e-5, 1e-2, strict=False)  # updates of 1e-5 until max(lam) >= 1e-2
    a = unit(s, A)
    w = model.get_submodule(A).weight
    while a.picked is None:
        s.step()
    assert a.picked == n - 1 and torch.equal(opt.state[w]["lam"], torch.full((8,), fp32_sum(1e-5, n)))
    s.step()
    v = torch.full((), fp32_sum(1e-5, n), dtype=torch.float32) + 1e-4
    assert torch.equal(opt.state[w]["lam"], torch.where(a.pruned, float(v), -1e-4))  # kept: assigned
    s.step()
    assert torch.equal(opt.state[w]["lam"], torch.where(a.pruned, float(v + 1e-4), -1e-4))


# -- row counts ----------------------------------------------------------------------------------

@pytest.mark.parametrize("n, ratio, want", [(100, 0.07, 8), (100, 0.55, 56), (100, 0.14, 15), (10, 0.3, 3),
                                            (10, 0.7, 7), (64, 0.5, 32), (4, 0.99, 3)])
def test_greg_row_count_is_the_official_float_expression(n, ratio, want):
    assert min(math.ceil(ratio * n), n - 1) == want  # what Python's float gives (0.07 * 100 is 7.000000000000001)
    model = nn.Sequential(nn.Linear(4, n), nn.ReLU(), nn.Linear(n, 2))
    s = GReg1(model, regkern.SGD(model.parameters(), lr=0.1), torch.randn(2, 4), ratios={"0": ratio})
    assert [(u.name, u.n_prune) for u in s.units] == [("0", want)]
    assert int(s.units[0].pruned.sum()) == want


# -- residual networks: the last conv of a block and the downsample convs keep ratio 0 -------------

def test_greg_residual_layers_get_ratio_zero():
    from models import image_batch, resnet_basic, resnet_bottleneck

    stage_ratios = [0.0, 0.5, 0.5, 0.0]  # stem, layer1, layer2, fc
    model = resnet_basic()
    s = GReg1(model, regkern.SGD(model.parameters(), lr=0.1), image_batch(), ratios=stage_ratios)
    assert [u.name for u in s.units] == ["layer1.0.conv1", "layer1.1.conv1", "layer2.0.conv1"]
    model = resnet_bottleneck()
    s = GReg2(model, regkern.SGD(model.parameters(), lr=0.1), image_batch(), ratios=stage_ratios)
    assert [u.name for u in s.units] == ["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1", "layer1.1.conv2",
                                         "layer2.0.conv1", "layer2.0.conv2"]
