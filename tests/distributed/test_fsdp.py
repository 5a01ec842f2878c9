"""Pruning under FSDP2 (``fully_shard``, 2 gloo ranks, rows split unevenly):
every schedule's run equals the single-process run on the same global
batch. A structured cut of the sharded model is made by masks (the shapes
stay); the full weights loaded into a plain copy and cut with the
schedule's plan equal the single-process model that was sliced."""
import copy

import pytest
import torch
from torch import nn

from ranks import (BNNet, OddNet, X, beside_reference, close_params, fully_sharded, sgd, skip_without_fsdp2,
                   train_step)

skip_without_fsdp2()


SCHEDULES = {"greg1": OddNet, "polarization": BNNet, "rda": OddNet, "proxl1": OddNet, "admm": OddNet,
             "greg1_adam": OddNet, "greg2_adamw": OddNet, "greg1_weight": OddNet, "slimming": BNNet,
             "admm_rows": OddNet, "oneshot": OddNet, "greg1_group": OddNet, "greg2_weight": OddNet,
             "admm_sas": OddNet}
CUT = ("greg1", "polarization", "greg1_adam", "greg2_adamw", "slimming", "oneshot", "greg1_group")  # masked cuts


def full_copy(model, like):
    """A plain copy of ``like`` holding the sharded ``model``'s whole weights
    (torch's full state dict: a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    plain = copy.deepcopy(like)
    plain.load_state_dict(weights)
    return plain


def _run(name, rank, world):
    from torch.distributed.tensor import DTensor

    from regkern.export import apply_plan

    torch.manual_seed(0)
    model = SCHEDULES[name]().eval()
    initial = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    fully_sharded(model, world)
    schedule, summary, _, ref_summary = beside_reference(name, model, model, ref, rank, world)
    plain = full_copy(model, initial)
    masked = summary.slice is not None and summary.slice.masked
    if masked:
        assert schedule.plan is summary.slice.plan
        assert summary.slice.params_after == ref_summary.slice.params_after
        apply_plan(plain, schedule.plan)
    sharded = isinstance(model.features[0].weight, DTensor)
    return {"close": close_params(plain, ref), "masked": masked, "sharded": sharded,
            "layers": summary.layers == ref_summary.layers,
            "params": [p.detach().clone() for p in plain.parameters()]}


def _every_schedule(rank, world):
    return {name: _run(name, rank, world) for name in SCHEDULES}


def test_every_schedule_under_fsdp2_equals_the_single_process_run(ranks):
    by_rank = ranks.run(_every_schedule, timeout=300)
    for name in SCHEDULES:
        a, b = by_rank[0][name], by_rank[1][name]
        assert a["sharded"] and a["close"] and b["close"] and a["layers"], (name, a)
        assert a["masked"] == (name in CUT), name
        assert all(torch.equal(p, q) for p, q in zip(a["params"], b["params"])), name


def _raw_dcp(rank, world, root):
    """torch's own flow, no regkern helper: get_state_dict of fresh objects as
    the template, dcp.load, set_state_dict; under DDP and FSDP2."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.nn.parallel import DistributedDataParallel as DDP

    import regkern

    def fresh(wrap, family):
        torch.manual_seed(0)
        model = OddNet()
        target = DDP(model) if wrap == "ddp" else fully_sharded(model, world)
        reg = regkern.RowL2(track_norms=True)
        opt = (regkern.SGD(model.parameters(), lr=0.05, momentum=0.9, regularizer=reg, backend="reference")
               if family == "sgd" else
               regkern.AdamW(model.parameters(), lr=1e-2, regularizer=reg, backend="reference"))
        for p in model.parameters():
            opt.state[p]["lam"].fill_(0.05)
        return model, target, opt

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    out = {}
    for wrap in ("ddp", "fsdp2"):
        for family in ("sgd", "adamw"):
            model, target, opt = fresh(wrap, family)
            for i in range(3):
                train_step(target, opt, None, i, rank, world)
            msd, osd = get_state_dict(model, opt)
            where = f"{root}/{wrap}-{family}"
            dcp.save({"model": msd, "optim": osd}, checkpoint_id=where)
            for i in range(3, 6):
                train_step(target, opt, None, i, rank, world)
            model2, target2, opt2 = fresh(wrap, family)
            template_model, template_optim = get_state_dict(model2, opt2)
            state = {"model": template_model, "optim": template_optim}
            dcp.load(state, checkpoint_id=where)
            set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
            for i in range(3, 6):
                train_step(target2, opt2, None, i, rank, world)
            same = all(torch.equal(local(p), local(q)) for p, q in zip(model.parameters(), model2.parameters()))
            for p, q in zip(model.parameters(), model2.parameters()):
                a, b = opt.state[p], opt2.state[q]
                same = same and a.keys() == b.keys() and all(
                    torch.equal(local(a[k]), local(b[k])) for k in a if isinstance(a[k], torch.Tensor))
            out[f"{wrap}-{family}"] = same
    return out


def test_torch_dcp_flow_resumes_bit_for_bit_under_ddp_and_fsdp2(ranks, tmp_path):
    for out in ranks.run(_raw_dcp, str(tmp_path), timeout=120):
        assert out == {"ddp-sgd": True, "ddp-adamw": True, "fsdp2-sgd": True, "fsdp2-adamw": True}


def _polarization_and_refusals(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import regkern
    from regkern.masks import mask_cut
    from regkern.groups import find_groups
    from regkern.prune import GReg1, OneShotL1, PolarizationPruner
    from regkern.slicing import slice_model

    out = {}
    # m and s of the polarization set are over all of its scales, not this rank's shard
    torch.manual_seed(0)
    plain = BNNet()
    with torch.no_grad():
        plain.features[1].weight.uniform_(0, 1)
        plain.features[4].weight.uniform_(0, 1)
    model = fully_sharded(copy.deepcopy(plain), world)
    polar = []
    for m in (plain, model):
        scales = [m.features[1].weight, m.features[4].weight]
        rest = [p for p in m.parameters() if all(p is not s for s in scales)]
        opt = regkern.SGD([{"params": scales, "regularizer": regkern.Polarization(lam=1e-4)}, {"params": rest}],
                          lr=0.0, backend="reference")
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
        polar.append(opt.state[scales[0]]["polar"].clone())
    out["polar"] = torch.allclose(polar[0], polar[1], rtol=1e-6, atol=1e-7) and bool(polar[0][2] != 0)

    # refusals, one sentence each, nothing changed
    model = fully_sharded(OddNet(), world)
    opt = regkern.SGD(model.parameters(), lr=0.05, backend="reference")
    group = next(g for g in find_groups(model, X) if g.units == 7)
    with pytest.raises(ValueError, match=r"slice_model slices plain tensors only: cut a sharded model with "
                                         r"regkern\.masks\.mask_cut"):
        slice_model(model, {group: [0]}, optimizer=opt)
    with pytest.raises(ValueError, match=r"^a cut of a sharded model is made by masks held by the optimizer"):
        mask_cut(model, {group: [0]}, None)
    out["untouched"] = not any("mask" in opt.state[p] for p in model.parameters() if p in opt.state)
    summary = mask_cut(model, {group: [0, 3]}, opt)
    w = model.features[0].weight
    out["masked"] = (summary.masked and summary.params_after == summary.params_before - 2 * (3 * 9 + 1 + 11 * 9)
                     and torch.equal(opt.state[w]["mask"].full_tensor(), torch.tensor([0, 1, 1, 0, 1, 1, 1]).bool())
                     and float(w.detach().full_tensor()[[0, 3]].abs().sum()) == 0.0)
    gn = fully_sharded(GNNet(), world)
    gn_opt = regkern.SGD(gn.parameters(), lr=0.05, backend="reference")
    group = next(g for g in find_groups(gn, X) if g.name == "features.0")  # 4 units of 2 channels
    with pytest.raises(ValueError, match=r"of a GroupNorm, whose statistics mix channels, so masks cannot stand for it"):
        mask_cut(gn, {group: [0]}, gn_opt)
    out["gn untouched"] = not any("mask" in s for s in gn_opt.state.values())
    # refused when the schedule is built, not when prune() comes after training; nothing written
    gn_opt = sgd(gn)
    with pytest.raises(ValueError, match=r"^GReg1's cut of a sharded model goes through features\.1\.weight of a "
                                         r"GroupNorm, whose statistics mix channels"):
        GReg1(gn, gn_opt, X, ratios=0.5)
    out["gn built untouched"] = not gn_opt.state
    plain_sgd = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ValueError, match=r"^OneShotL1's cut of a sharded model works through the masks "
                                         r"state\['mask'\], which the step of torch\.optim\.sgd\.SGD does not read"):
        OneShotL1(model, plain_sgd, X, ratios=0.5)
    # an RMSNorm in the group, and a norm without parameters anywhere: its place in the groups is unknown
    x = torch.randn(2, 3, 6, 6)
    for norm, what in ((nn.RMSNorm(8), r"goes through 2\.weight of a RMSNorm, whose statistics mix channels"),
                       (nn.LayerNorm(8, elementwise_affine=False), r"cannot be made by masks in a model with 2 "
                                                                    r"\(LayerNorm without parameters\)")):
        torch.manual_seed(0)
        mlp = nn.Sequential(nn.Flatten(), nn.Linear(108, 8), norm, nn.ReLU(), nn.Linear(8, 4))
        fully_shard(mlp[1], mesh=init_device_mesh("cpu", (world,)))
        fully_shard(mlp, mesh=init_device_mesh("cpu", (world,)))
        mlp_opt = sgd(mlp)
        with pytest.raises(ValueError, match=what):
            OneShotL1(mlp, mlp_opt, x, ratios=0.5)
        out[f"{type(norm).__name__} untouched"] = not mlp_opt.state
    sharded_bn = fully_sharded(BNNet(), world)
    with pytest.raises(ValueError, match=r"^target_flops and remaining_flops measure cuts on copies of the model"):
        PolarizationPruner(sharded_bn, sgd(sharded_bn), X, steps=3, target_flops=0.5)
    return out


class GNNet(BNNet):
    def __init__(self) -> None:
        super().__init__()
        self.features[1] = nn.GroupNorm(2, 8)


def test_polarization_means_span_ranks_and_sharded_cuts_refuse_clearly(ranks):
    for out in ranks.run(_polarization_and_refusals):
        assert out == {"polar": True, "untouched": True, "masked": True, "gn untouched": True,
                       "gn built untouched": True, "RMSNorm untouched": True, "LayerNorm untouched": True}


def _cut_copy_sharded_again(rank, world):
    """The documented way to fine-tune the small model under FSDP2: the full
    weights into a plain copy, apply_plan, fully_shard it, a new optimizer."""
    from regkern.export import apply_plan

    torch.manual_seed(0)
    model = OddNet()
    initial, ref = copy.deepcopy(model), copy.deepcopy(model)
    fully_sharded(model, world)
    schedule, _, _, _ = beside_reference("greg1", model, model, ref, rank, world)
    small = full_copy(model, initial)
    apply_plan(small, schedule.plan)
    fully_sharded(small, world)
    opt, ref_opt = sgd(small), sgd(ref)
    for i in range(100, 103):
        train_step(small, opt, None, i, rank, world)
        train_step(ref, ref_opt, None, i)
    return close_params(full_copy(small, ref), ref) and small.features[0].weight.shape[0] == 3


def test_the_cut_copy_sharded_again_fine_tunes_like_the_single_process_run(ranks):
    assert ranks.run(_cut_copy_sharded_again) == [True, True]


def _residual_expand(rank, world):
    """Polarization's default residual="expand" on a sharded ResNet: the plan
    carries the re-expansion of each cut branch end, so the plain copy it cuts
    computes what the masked sharded model computes."""
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import regkern
    from models import image_batch, resnet_basic
    from regkern.export import apply_plan
    from regkern.prune import PolarizationPruner

    torch.manual_seed(0)
    model = resnet_basic().eval()
    with torch.no_grad():
        model.layer1[0].bn2.weight[[1, 5]] = 1e-4
        model.layer1[0].bn1.weight[[2]] = 1e-4
    initial = copy.deepcopy(model)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    opt = regkern.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="reference")
    schedule = PolarizationPruner(model, opt, image_batch(2, 8), steps=2, lam=1e-2, no_valley="fixed")
    for i in range(2):
        g = torch.Generator().manual_seed(100 + i)
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
        loss = F.cross_entropy(model(x.chunk(world)[rank]), y.chunk(world)[rank])
        opt.zero_grad()
        loss.backward()
        del loss
        opt.step()
        schedule.step()
    schedule.prune()
    x = image_batch(2, 8)
    with torch.no_grad():
        expected = model(x)
    plain = full_copy(model, initial)
    apply_plan(plain, schedule.plan)
    with torch.no_grad():
        got = plain(x)
    return {"expansions": sorted(schedule.plan.get("expansions", {})), "same": torch.allclose(got, expected, atol=1e-5),
            "narrower": plain.layer1[0].bn2.weight.shape[0] < initial.layer1[0].bn2.weight.shape[0]}


def test_residual_expand_cut_of_a_sharded_resnet_carries_its_expansions(ranks):
    for out in ranks.run(_residual_expand):
        assert out["expansions"] and out["same"] and out["narrower"], out


def _llama(rank, world):
    """A Hugging Face Llama (grouped-query attention, RMSNorm) sharded per
    decoder layer: GReg-1 with AdamW prunes MLP neurons and attention heads,
    whose heads the trace finds on the sharded model, as in one process."""
    import transformers
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    import regkern
    from regkern.export import apply_plan
    from regkern.prune import GReg1

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = transformers.LlamaForCausalLM(config).eval()
    x = {"input_ids": torch.randint(0, 64, (2, 6), generator=torch.Generator().manual_seed(1))}
    initial, ref = copy.deepcopy(model), copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    ratios = {"model.layers.0.mlp.gate_proj": 0.5, "model.layers.1.self_attn.q_proj": 0.5}
    for m, share in ((model, True), (ref, False)):
        opt = regkern.AdamW(m.parameters(), lr=1e-3, backend="reference")
        schedule = GReg1(m, opt, x, ratios=ratios, Ku=1, Ks=1, delta=0.5, tau=1.0)
        for i in range(6):
            ids = torch.randint(0, 64, (4, 6), generator=torch.Generator().manual_seed(10 + i))
            loss = m(input_ids=ids.chunk(world)[rank] if share else ids).logits.float().pow(2).mean()
            opt.zero_grad()
            loss.backward()
            del loss
            opt.step()
            schedule.step()
            if schedule.done and not schedule.pruned:
                schedule.prune()
        if share:
            plan = schedule.plan
    plain = full_copy(model, initial)
    apply_plan(plain, plan)
    with torch.no_grad():
        same = torch.allclose(plain(**x).logits, ref(**x).logits, atol=1e-4)
    return {"close": close_params(plain, ref), "same": same, "heads": plain.model.layers[1].self_attn.k_proj.weight.shape[0],
            "neurons": plain.model.layers[0].mlp.gate_proj.weight.shape[0]}


def test_a_sharded_llama_prunes_heads_and_neurons_like_one_process(ranks):
    pytest.importorskip("transformers")
    for out in ranks.run(_llama, timeout=150):
        assert out == {"close": True, "same": True, "heads": 8, "neurons": 24}, out


def _hybrid(rank, world, name):
    """HSDP: ``fully_shard`` over a 2 x 2 mesh (replicated across its first
    dimension, sharded along its second)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from regkern.export import apply_plan

    torch.manual_seed(0)
    model = (BNNet if name == "polarization" else OddNet)().eval()
    initial, ref = copy.deepcopy(model), copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    for layer in model.features:
        if any(True for _ in layer.parameters()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    schedule, _, _, _ = beside_reference(name, model, model, ref, rank, world)
    plain = full_copy(model, initial)
    apply_plan(plain, schedule.plan)
    return close_params(plain, ref)


def test_hybrid_sharding_on_a_2x2_mesh_equals_the_single_process_run():
    from ranks import Ranks

    four = Ranks(world=4)
    try:
        for name in ("greg1", "polarization"):
            assert four.run(_hybrid, name, timeout=120) == [True] * 4, name
    finally:
        four.close()


def _unsharded_leaves_fsdp_as_it_was(rank, world):
    from torch.distributed.tensor import DTensor

    from regkern.groups import find_groups
    from regkern.sharding import unsharded

    out = {}
    x = X
    # a model that never ran a forward: its root keeps the root's rule (parameters kept gathered
    # after forward, for the backward), as a model that never entered unsharded does
    for entered in (False, True):
        torch.manual_seed(0)
        model = fully_sharded(OddNet(), world)
        if entered:
            with unsharded(model):
                model(x)
        loss = model(x).sum()
        out[f"root gathered after forward, entered={entered}"] = not isinstance(model.classifier.weight, DTensor)
        loss.backward()
        out[f"sharded after backward, entered={entered}"] = isinstance(model.classifier.weight, DTensor)
    # a forward that raises inside: the model holds the optimizer's sharded parameters again
    torch.manual_seed(0)
    model = fully_sharded(OddNet(), world)
    opt = sgd(model)
    train_step(model, opt, None, 0, rank, world)
    with pytest.raises(ValueError, match="torch-pruning could not trace the model"):
        find_groups(model, torch.randn(2, 5, 6, 6))
    held = {id(p) for p in opt.param_groups[0]["params"]}
    out["after a failed trace"] = all(isinstance(p, DTensor) and id(p) in held for p in model.parameters())
    train_step(model, opt, None, 1, rank, world)
    out["trains after"] = all(isinstance(p, DTensor) for p in model.parameters())
    return out


def test_unsharded_leaves_fsdp_as_it_was(ranks):
    for out in ranks.run(_unsharded_leaves_fsdp_as_it_was):
        assert all(out.values()), out


def _scores_from_row_norms(rank, world):
    """After a step, a sharded parameter's row norms count as current (its
    local tensor is a new object each time one asks for it), so scores
    gather rows x 3 norms instead of the whole weight, and equal the
    scores of the same step in one process."""
    import regkern
    from regkern.groups import find_groups, group_scores

    out = {}
    models = []
    for sharded in (True, False):
        torch.manual_seed(0)
        model = OddNet()
        if sharded:
            fully_sharded(model, world)
        opt = regkern.SGD(model.parameters(), lr=0.05, momentum=0.9, backend="reference",
                          regularizer=regkern.RowL2(track_norms=True))
        train_step(model, opt, None, 0, rank if sharded else 0, world if sharded else 1)
        groups = [g for g in find_groups(model, X) if g.name == "features.0"]
        models.append((model, opt, groups))
    (model, opt, groups), (ref, ref_opt, ref_groups) = models
    out["current"] = opt.current_row_norms(model.features[0].weight) is not None
    out["same scores"] = torch.allclose(group_scores(model, groups, optimizer=opt)[0],
                                        group_scores(ref, ref_groups, optimizer=ref_opt)[0], rtol=1e-5)
    return out


def test_sharded_scores_come_from_the_row_norms_of_the_last_step(ranks):
    for out in ranks.run(_scores_from_row_norms):
        assert out == {"current": True, "same scores": True}
