"""Sparse training (RDA, proximal L1, group lasso) frozen into masks, and ADMM
pruning (classic and SAS-ADMM, ``docs/admm.md``): timetable, projection, masked
retraining, resuming, bad input."""
import pytest
import torch

import regkern
from regkern.admm import admm_update, kept_count
from regkern.prune import ADMMPruner, SparseTraining
from prune_models import (BACKEND, TinyVGG, make, roundtrip, same_tensors, sgd,  # noqa: F401
                               snapshot, train_step)

pytestmark = pytest.mark.usefixtures("one_thread")


def convs(model):
    return [model.features[0].weight, model.features[3].weight]


def split_groups(model, regularizer, **extra):
    ws = convs(model)
    rest = [p for p in model.parameters() if all(p is not w for w in ws)]
    return [{"params": ws, "regularizer": regularizer, **extra}, {"params": rest}]


def test_sparse_training_with_prox_l1_freezes_element_masks():
    model = make(TinyVGG)
    opt = regkern.SGD(split_groups(model, regkern.ProxL1(lam=0.4)), lr=0.05, momentum=0.9, backend=BACKEND)
    s = SparseTraining(model, opt, steps=3)
    assert [n for n, _, _ in s.sparse] == ["features.0.weight", "features.3.weight"]
    for i in range(1, 4):
        train_step(model, opt, s, i)
        assert s.done == (i >= 3)
    zeros = {w: w.detach() == 0 for w in convs(model)}
    assert all(z.any() and not z.all() for z in zeros.values())
    summary = s.prune()
    assert summary.layers["features.0.weight"] == (int((~zeros[convs(model)[0]]).sum()), 216)
    for w in convs(model):
        assert torch.equal(opt.state[w]["mask"], ~zeros[w]) and "prox_lam" not in opt.state[w]
    assert opt.param_groups[0]["regularizer"] is None
    for i in range(4, 7):
        train_step(model, opt, s, i)
    for w in convs(model):
        assert torch.equal(w.detach() == 0, zeros[w])  # pruned stay exact zeros, the others train on


def test_sparse_training_group_lasso_row_masks_and_rda():
    model = make(TinyVGG)
    opt = regkern.SGD(split_groups(model, regkern.GroupLasso(lam=3.0)), lr=0.05, backend=BACKEND)
    s = SparseTraining(model, opt, steps=2)
    for i in range(1, 3):
        train_step(model, opt, s, i)
    rows = {w: w.detach().reshape(w.shape[0], -1).ne(0).any(1) for w in convs(model)}
    assert any(not r.all() for r in rows.values())
    s.prune()
    for w in convs(model):
        assert torch.equal(opt.state[w]["mask"], rows[w])

    model = make(TinyVGG)
    opt = regkern.RDA(split_groups(model, None, lam=2.0), lr=0.05, lam=0.0, backend=BACKEND)
    s = SparseTraining(model, opt, steps=2)
    for i in range(1, 3):
        train_step(model, opt, s, i)
    zeros = {w: w.detach() == 0 for w in convs(model)}
    finetune = sgd(model)
    summary = s.prune(finetune_optimizer=finetune)
    assert "RDA keeps its L1 term" in summary.notes[0]
    for w in convs(model):
        assert torch.equal(opt.state[w]["mask"], ~zeros[w]) and torch.equal(finetune.state[w]["mask"], ~zeros[w])
    for i in range(3, 5):
        train_step(model, finetune, None, i)
    assert all(bool((w.detach()[zeros[w]] == 0).all()) for w in convs(model))


def test_classic_admm_timetable_projection_and_retraining():
    model = make(TinyVGG)
    opt = sgd(model)
    s = ADMMPruner(model, opt, ratios=0.5, steps=6, K=2, rho=1e-2)
    group = opt.param_groups[-1]
    assert group["regularizer"] == regkern.ADMM(rho=1e-2) and group["params"] == convs(model)
    for w in convs(model):  # Z = Proj(W), U = 0 at the start
        st = opt.state[w]
        assert int(st["admm_z"].ne(0).sum()) == kept_count(w.numel(), ratio=0.5)
        assert torch.equal(st["admm_z"], torch.where(st["admm_z"] != 0, w.detach(), 0.0))
        assert not st["admm_u"].any() and torch.equal(st["admm_target"], st["admm_z"])
    for i in range(1, 7):
        train_step(model, opt, None, i)
        before = {w: {k: opt.state[w][k].clone() for k in ("admm_z", "admm_u", "admm_target")} for w in convs(model)}
        if i % 2 == 0:
            for w in convs(model):
                b = before[w]
                admm_update(w.detach(), b["admm_z"], b["admm_u"], b["admm_target"], ratio=0.5)
        s.step()
        for w in convs(model):
            assert all(torch.equal(opt.state[w][k], before[w][k]) for k in before[w]), i
        assert s.done == (i >= 6)
    summary = s.prune()
    for name, w in zip(("features.0", "features.3"), convs(model)):
        kept = kept_count(w.numel(), ratio=0.5)
        assert summary.layers[name] == (kept, w.numel()) and int(w.ne(0).sum()) == kept
        assert torch.equal(opt.state[w]["mask"], w.detach() != 0)
        assert not any(k in opt.state[w] for k in ("admm_z", "admm_u", "admm_target"))
    assert s.group["regularizer"] is None
    zeros = {w: w.detach() == 0 for w in convs(model)}
    for i in range(7, 9):
        train_step(model, opt, s, i)
    assert all(torch.equal(w.detach() == 0, zeros[w]) for w in convs(model))


def test_an_existing_admm_group_keeps_its_rho_and_a_different_one_is_refused():
    model = make(TinyVGG)
    opt = regkern.SGD(split_groups(model, regkern.ADMM(rho=1e-2)), lr=0.05, momentum=0.9, backend=BACKEND)
    train_step(model, opt, None, 0)
    before = roundtrip({"model": model.state_dict(), "optimizer": opt.state_dict()})
    with pytest.raises(ValueError, match=r"ADMM group has rho=0\.01, but rho=0\.001 was given"):
        ADMMPruner(model, opt, ratios=0.5, steps=4, rho=1e-3)
    after = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    assert same_tensors(after["model"], before["model"])
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    for k, v in before["optimizer"]["state"].items():
        assert same_tensors(after["optimizer"]["state"][k], v)
    s = ADMMPruner(model, opt, ratios=0.5, steps=4)  # rho left out: the group's
    assert s.group["regularizer"] == regkern.ADMM(rho=1e-2)
    model = make(TinyVGG)
    s = ADMMPruner(model, sgd(model), ratios=0.5, steps=4)
    assert s.group["regularizer"] == regkern.ADMM(rho=1e-3) and s.K == 100


def test_structured_admm_masks_rows():
    model = make(TinyVGG)
    opt = sgd(model)
    s = ADMMPruner(model, opt, ratios={"features.3": 0.5}, steps=2, K=1, structured=True)
    for i in range(1, 3):
        train_step(model, opt, s, i)
    summary = s.prune()
    w = model.features[3].weight
    assert summary.layers == {"features.3": (kept_count(12, ratio=0.5), 12)}
    assert opt.state[w]["mask"].shape == (12,) and int(opt.state[w]["mask"].sum()) == kept_count(12, ratio=0.5)
    assert "not sliced" in summary.notes[0]


def test_sas_admm_outer_iterations_then_masks_in_the_retraining_optimizer():
    model = make(TinyVGG)
    opt = regkern.SASADMM(model.parameters(), beta=0.04, lam=1e-3, M=2, k0=2)
    s = ADMMPruner(model, opt, ratios=0.85, outer_iterations=2)
    assert [n for n, _, _ in s.layers] == ["features.0", "features.3"]
    for i in range(1, 5):  # M_1 = M_2 = 2 inner iterations
        train_step(model, opt, s, i)
        assert s.done == (i >= 4)
    retrain = sgd(model)
    summary = s.prune(finetune_optimizer=retrain)
    for name, w in zip(("features.0", "features.3"), convs(model)):
        kept = kept_count(w.numel(), ratio=0.85)
        assert summary.layers[name] == (kept, w.numel()) and int(w.ne(0).sum()) == kept
        assert torch.equal(retrain.state[w]["mask"], w.detach() != 0)
        assert torch.equal(s.masks[name + ".weight"], w.detach() != 0)
    zeros = {w: w.detach() == 0 for w in convs(model)}
    for i in range(5, 7):
        train_step(model, retrain, None, i)
    assert all(torch.equal(w.detach() == 0, zeros[w]) for w in convs(model))
    other = sgd(model)
    s.install_masks(other)
    assert torch.equal(other.state[convs(model)[0]]["mask"], ~zeros[convs(model)[0]])


def test_sas_admm_prunes_the_ergodic_average_of_w_by_default():
    """As the official code: the final weights are the average of W over the
    outer iterations from average_from on, then the per-layer percentile cut."""
    def run(**prune_options):
        model = make(TinyVGG)
        opt = regkern.SASADMM(model.parameters(), beta=0.04, lam=1e-3, M=2, k0=10, average_from=2)
        s = ADMMPruner(model, opt, ratios=0.5, outer_iterations=4)
        for i in range(1, 9):
            train_step(model, opt, s, i)
        assert s.done and opt.state[convs(model)[0]]["w_avg_count"] == 3
        before = {w: {k: opt.state[w][k].clone() for k in ("w", "w_avg")} for w in model.parameters()}
        return model, s.prune(**prune_options), before

    for use, key in ((None, "w_avg"), ("average", "w_avg"), ("w", "w")):
        model, summary, before = run(**({} if use is None else {"use": use}))
        for w in model.parameters():
            final = before[w][key]
            if any(w is c for c in convs(model)):
                kept = kept_count(w.numel(), ratio=0.5)
                assert int(w.ne(0).sum()) == kept
                assert torch.equal(w.detach(), torch.where(w.detach() != 0, final, 0.0))
                assert float(final.abs()[w.detach() == 0].max()) <= float(final.abs()[w.detach() != 0].min())
            else:  # not pruned: written as they are
                assert torch.equal(w.detach(), final)
        assert any(("ergodic average of W over the last 3 outer" in n) == (key == "w_avg") for n in summary.notes)
        assert not torch.equal(before[convs(model)[0]]["w"], before[convs(model)[0]]["w_avg"])

    model = make(TinyVGG)
    opt = regkern.SASADMM(model.parameters(), M=2)  # average_from=170, as the official code
    s = ADMMPruner(model, opt, ratios=0.5, outer_iterations=1)
    for i in range(1, 3):
        train_step(model, opt, s, i)
    assert "the last W of SAS-ADMM (no outer iteration reached average_from=170)" in s.prune().notes[0]


@pytest.mark.parametrize("retrain,message", [
    (lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), r"install_masks works through the masks.*"
                                                                      r"torch\.optim\.sgd\.SGD"),
    (lambda m: sgd(m).__class__(list(m.parameters())[:1], lr=0.1), "does not hold the masked parameter"),
])
def test_sas_admm_prune_refuses_a_retraining_optimizer_that_cannot_keep_masks(retrain, message):
    """Checked before SAS-ADMM writes its weights into the parameters."""
    model = make(TinyVGG)
    opt = regkern.SASADMM(model.parameters(), lam=1e-3, M=2, k0=2, average_from=1)
    s = ADMMPruner(model, opt, ratios=0.5, outer_iterations=1)
    for i in range(1, 3):
        train_step(model, opt, s, i)
    before = snapshot(model, opt, s)
    optimizer = retrain(model)
    with pytest.raises(ValueError, match=message):
        s.prune(finetune_optimizer=optimizer)
    after = snapshot(model, opt, s)
    assert same_tensors(after["model"], before["model"]) and after["schedule"] == before["schedule"]
    for k, v in before["optimizer"]["state"].items():
        assert same_tensors(after["optimizer"]["state"][k], v)
    assert not optimizer.state
    s.prune(finetune_optimizer=sgd(model))
    with pytest.raises(ValueError, match="install_masks works through the masks"):
        s.install_masks(torch.optim.Adam(model.parameters()))


def test_sparse_training_refuses_a_fine_tuning_optimizer_that_ignores_masks():
    model = make(TinyVGG)
    opt = regkern.RDA(split_groups(model, None, lam=2.0), lr=0.05, lam=0.0, backend=BACKEND)
    s = SparseTraining(model, opt, steps=1)
    train_step(model, opt, s, 1)
    before = snapshot(model, opt, s)
    with pytest.raises(ValueError, match="install_masks works through the masks"):
        s.prune(finetune_optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    after = snapshot(model, opt, s)
    assert same_tensors(after["model"], before["model"]) and after["schedule"] == before["schedule"]
    for k, v in before["optimizer"]["state"].items():
        assert same_tensors(after["optimizer"]["state"][k], v)


def test_classic_admm_refuses_the_average_and_writes_nothing():
    model = make(TinyVGG)
    opt = sgd(model)
    s = ADMMPruner(model, opt, ratios=0.5, steps=2, K=1)
    for i in range(1, 3):
        train_step(model, opt, s, i)
    before = snapshot(model, opt, s)
    with pytest.raises(ValueError, match="ergodic average is kept by regkern.SASADMM only"):
        s.prune(use="average")
    after = snapshot(model, opt, s)
    assert same_tensors(after["model"], before["model"]) and after["schedule"] == before["schedule"]
    assert after["optimizer"]["param_groups"] == before["optimizer"]["param_groups"]
    for k, v in before["optimizer"]["state"].items():
        assert same_tensors(after["optimizer"]["state"][k], v)


@pytest.mark.parametrize("kind", ["admm", "prox", "sas"])
def test_resume_reproduces_the_run(kind):
    def run(stop=None, state=None):
        model = make(TinyVGG)
        if kind == "admm":
            opt = sgd(model)
            s = ADMMPruner(model, opt, ratios=0.5, steps=4, K=2, rho=1e-2)
        elif kind == "sas":  # the ADMM phase only (retraining needs another optimizer)
            opt = regkern.SASADMM(model.parameters(), lam=1e-3, M=2, k0=2, average_from=2)
            s = ADMMPruner(model, opt, ratios=0.5, outer_iterations=5)
        else:
            opt = regkern.SGD(split_groups(model, regkern.ProxL1(lam=0.5)), lr=0.05, momentum=0.9, backend=BACKEND)
            s = SparseTraining(model, opt, steps=4)
        if state is not None:
            s.load_state_dict(state["schedule"])
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
        for i in range(s.iteration + 1, 8):
            train_step(model, opt, s, i)
            if s.done and not s.pruned:
                s.prune()
            if i == stop:
                return snapshot(model, opt, s)
        return snapshot(model, opt, s)

    ref = run()
    assert ref["schedule"]["pruned"] == (kind != "sas")
    for stop in (3, 5):
        got = run(state=run(stop=stop))
        assert same_tensors(got["model"], ref["model"]), stop
        assert got["optimizer"]["param_groups"] == ref["optimizer"]["param_groups"]
        for k, v in ref["optimizer"]["state"].items():
            assert same_tensors(got["optimizer"]["state"][k], v), (stop, k)


def test_bad_input():
    model = make(TinyVGG)
    with pytest.raises(ValueError, match="no sparsifying param group"):
        SparseTraining(model, sgd(model), steps=3)
    with pytest.raises(ValueError, match="steps"):
        SparseTraining(model, regkern.RDA(model.parameters(), lam=1e-3), steps=-2)
    opt = sgd(model)
    with pytest.raises(ValueError, match="steps"):
        ADMMPruner(model, opt, ratios=0.5)
    with pytest.raises(ValueError, match="nothing to prune"):
        ADMMPruner(model, opt, ratios=0.0, steps=3)
    with pytest.raises(ValueError, match="outer_iterations is for regkern.SASADMM"):
        ADMMPruner(model, opt, ratios=0.5, steps=3, outer_iterations=2)
    with pytest.raises(ValueError, match="counted in outer_iterations"):
        ADMMPruner(model, regkern.SASADMM(model.parameters()), ratios=0.5, steps=3, outer_iterations=2)
    with pytest.raises(ValueError, match="out of range"):
        ADMMPruner(model, opt, ratios=1.5, steps=3)
    with pytest.raises(ValueError, match="K and rho are for classic ADMM"):
        ADMMPruner(model, regkern.SASADMM(model.parameters()), ratios=0.5, outer_iterations=2, K=10)
    with pytest.raises(ValueError, match="K and rho are for classic ADMM"):
        ADMMPruner(model, regkern.SASADMM(model.parameters()), ratios=0.5, outer_iterations=2, rho=1e-2)
    assert len(opt.param_groups) == 1  # nothing was moved by the refused schedules
    s = ADMMPruner(model, opt, ratios=0.5, steps=0)
    with pytest.raises(ValueError, match="use must be"):
        s.prune(use="x")
    with pytest.raises(ValueError, match="no masks yet"):
        s.install_masks(opt)
