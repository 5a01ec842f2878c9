"""``python -m regkern demo``: the end-to-end run (table, CSV/Markdown,
figures, every method), the CIFAR pickle loader on tiny generated files,
clear errors, ``--help``, and the papers' qualitative claims on the digits
with fixed seeds."""
import csv
import os
import pickle

import numpy as np
import pytest
import torch

from regkern.__main__ import main
from regkern.demo import cli, data, methods

TINY = ["--epochs", "1", "--prune-epochs", "0.5", "--finetune-epochs", "0.5", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


def write_cifar(directory, name, n_train, n_test, seed=0):
    """A tiny random dataset in the standard CIFAR python-pickle layout."""
    folder_name, train_files, test_file, label_key, classes = data.CIFAR_LAYOUTS[name]
    folder = os.path.join(directory, folder_name)
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    sizes = np.array_split(np.arange(n_train), len(train_files))
    for fname, n in [(f, len(s)) for f, s in zip(train_files, sizes)] + [(test_file, n_test)]:
        batch = {b"batch_label": b"generated", b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 label_key.encode(): rng.integers(0, classes, size=n).tolist()}
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(batch, f)
    return folder


# -- command line -----------------------------------------------------------------------

def test_help_lists_the_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--methods", "--ratio", "--epochs", "--prune-epochs", "--finetune-epochs", "--seed", "--out",
                 "--backend", "--data", "--data-dir", "--model"):
        assert flag in out
    for method in methods.METHODS:
        assert method in out
    assert "./regkern-demo" in out


def test_end_to_end_writes_table_csv_markdown_and_figures(tmp_path, capsys):
    out_dir = tmp_path / "out"
    assert main(["demo", "--out", str(out_dir)] + TINY) == 0
    printed = capsys.readouterr().out
    with open(out_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["Baseline"] + [methods.LABELS[m] for m in methods.METHODS]
    markdown = (out_dir / "results.md").read_text()
    for r in rows:
        assert r["method"] in printed and r["method"] in markdown
        assert 0.0 <= float(r["acc_finetuned"]) <= 100.0
        assert 0.0 <= float(r["sparsity"]) <= 1.0
    base = rows[0]
    for r in rows[1:]:
        assert r["structure"] in ("filters", "weights")
        assert 0.0 <= float(r["acc_pruned"]) <= 100.0
        assert int(r["params"]) <= int(base["params"]) and int(r["macs"]) <= int(base["macs"])
        assert float(r["speedup"]) == pytest.approx(int(base["macs"]) / int(r["macs"]))
    filters = [r for r in rows[1:] if r["structure"] == "filters" and r["method"] != "Polarization"]
    assert all(int(r["params"]) < int(base["params"]) for r in filters)  # rows were really cut out
    for png in ("greg_filter_norms.png", "bn_scales_l1_vs_polarization.png", "sparsity_rda_vs_sgd_l1.png"):
        path = out_dir / png
        assert path.stat().st_size > 1000 and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for column in ("Params", "FLOPs", "Speed-up", "Acc. pruned", "Acc. fine-tuned", "Sparsity"):
        assert column in printed


def test_same_seed_same_result():
    """Fixed seeds: a method from the same baseline gives the same numbers twice."""
    s = methods.Settings(quiet=True, epochs=1, finetune_epochs=0.5)
    dataset = data.load_digits()
    baseline, acc = cli.train_baseline(dataset, "small", s)
    again, acc_again = cli.train_baseline(dataset, "small", s)
    assert acc == acc_again
    assert all(torch.equal(a, b) for a, b in zip(baseline.state_dict().values(), again.state_dict().values()))
    ctx = methods.Context(dataset, baseline, s, acc)
    first, second = methods.run_l1(ctx, 3).row, methods.run_l1(ctx, 3).row
    assert (first.acc_pruned, first.acc_finetuned, first.params) == (second.acc_pruned, second.acc_finetuned,
                                                                     second.params)


@pytest.mark.parametrize("argv, message", [
    (["--methods", "greg1,nope"], "unknown method"),
    (["--ratio", "1.5"], "--ratio"),
    (["--epochs", "-1"], "--epochs"),
    (["--data", "cifar10"], "--data-dir"),
    (["--model", "resnet56"], "digits use --model small"),
    (["--threads", "0"], "--threads"),
    (["--steps", "5", "--seq-len", "32"], "--steps, --seq-len belong to --task lm"),
])
def test_bad_arguments_are_refused_before_training(argv, message, tmp_path, capsys):
    out_dir = tmp_path / "never"
    assert main(["demo", "--out", str(out_dir)] + argv) == 2
    assert message in capsys.readouterr().err
    assert not out_dir.exists()


def test_flops_and_parameters_match_the_papers_networks():
    """The MAC counter agrees with regkern.flops on every model, and the CIFAR
    networks have the sizes of the papers' tables (GReg Table 1: ResNet-56
    0.1255G FLOPs, 0.8530M parameters with zero-padding shortcuts, here 1x1
    conv shortcuts; VGG-19/CIFAR-100 0.3982G and 20.0812M)."""
    from regkern.flops import count_flops
    from regkern.demo import models, report

    for model, x in [(models.SmallNet(), torch.randn(1, 1, 8, 8)), (models.CifarResNet(56), torch.randn(1, 3, 32, 32)),
                     (models.CifarVGG(100), torch.randn(1, 3, 32, 32))]:
        assert report.count_macs(model, x) == count_flops(model, x)
    resnet, vgg = models.CifarResNet(56, 10), models.CifarVGG(100)
    x = torch.randn(1, 3, 32, 32)
    assert report.count_macs(resnet, x) == pytest.approx(0.1255e9, rel=3e-3)
    assert report.param_count(resnet) == pytest.approx(0.8530e6, rel=5e-3)
    assert report.count_macs(vgg, x) == pytest.approx(0.3982e9, rel=1e-3)
    assert report.param_count(vgg) == pytest.approx(20.0812e6, rel=1e-4)
    small, x = models.SmallNet(), torch.randn(1, 1, 8, 8)
    with torch.no_grad():  # zeros are left out of the nonzero counts, each weight once per output position
        small.classifier.weight[:, ::2] = 0
        small.features[1][0].weight[:, :4] = 0
    assert report.count_macs(small, x) - report.count_macs(small, x, nonzero=True) == 10 * 32 + 32 * 4 * 9 * 64
    assert report.param_count(small) - report.param_count(small, nonzero=True) == 10 * 32 + 32 * 4 * 9


# -- CIFAR pickles ------------------------------------------------------------------------

@pytest.mark.parametrize("name, classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_pickle_layouts_load(tmp_path, name, classes):
    folder = write_cifar(str(tmp_path), name, n_train=30, n_test=12)
    for where in (str(tmp_path), folder):  # the parent folder or the batches folder itself
        ds = data.load(name, where)
        assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (12, 3, 32, 32)
        assert ds.num_classes == classes and ds.augment
        assert int(ds.y_train.max()) < classes and ds.y_train.dtype == torch.int64
        assert torch.allclose(ds.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("name, model, method_list", [("cifar10", "resnet56", "greg1,l1,rda"),
                                                      ("cifar100", "vgg19", "l1,slimming")])
def test_demo_runs_on_a_cifar_directory(tmp_path, capsys, name, model, method_list):
    write_cifar(str(tmp_path / "data"), name, n_train=24, n_test=8)
    out_dir = tmp_path / "out"
    argv = ["demo", "--data", name, "--data-dir", str(tmp_path / "data"), "--model", model, "--methods", method_list,
            "--batch-size", "12", "--epochs", "1", "--prune-epochs", "1", "--finetune-epochs", "1", "--quiet",
            "--out", str(out_dir)]
    assert main(argv) == 0
    with open(out_dir / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["Baseline"] + [methods.LABELS[m] for m in method_list.split(",")]
    assert f"{name} / {model}" in capsys.readouterr().out


def test_missing_or_wrong_cifar_directory_is_a_clear_error(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert main(["demo", "--data", "cifar10", "--data-dir", str(missing), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "is not a directory" in err and "nothing is downloaded" in err
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DataError, match="cifar-10-batches-py.*missing: data_batch_1"):
        data.load("cifar10", str(tmp_path / "empty"))
    folder = write_cifar(str(tmp_path / "c100"), "cifar100", 10, 4)
    with pytest.raises(data.DataError, match="not a cifar10 directory"):
        data.load("cifar10", str(tmp_path / "c100"))
    with open(os.path.join(folder, "test"), "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(data.DataError, match="cannot read CIFAR pickle"):
        data.load("cifar100", folder)
    with open(os.path.join(folder, "test"), "wb") as f:
        pickle.dump({b"data": np.zeros((3, 10), np.uint8), b"fine_labels": [0, 1, 2]}, f)
    with pytest.raises(data.DataError, match=r"expected \[N, 3072\]"):
        data.load("cifar100", folder)


# -- the papers' claims on the digits (fixed seeds) ----------------------------------------

@pytest.fixture(scope="module")
def digits_context():
    """A baseline trained as the demo trains it (fewer epochs), shared by the claims."""
    s = methods.Settings(quiet=True, epochs=15, finetune_epochs=0)
    dataset = data.load_digits()
    baseline, acc = cli.train_baseline(dataset, "small", s)
    assert acc > 95.0
    return methods.Context(dataset, baseline, s, acc)


def test_greg1_loses_far_less_right_after_pruning_than_one_shot_l1(digits_context):
    """GReg (Wang et al. 2021): the growing penalty moves the network's function
    into the kept rows first, so removing the rows costs little; one-shot L1
    removes the same number of rows at once."""
    greg = methods.run_greg1(digits_context, 1).row
    one_shot = methods.run_l1(digits_context, 3).row
    assert greg.params == one_shot.params and greg.macs == one_shot.macs  # the same widths
    assert greg.note == ""  # the penalty reached its ceiling within the budget
    drop_greg = digits_context.baseline_acc - greg.acc_pruned
    drop_l1 = digits_context.baseline_acc - one_shot.acc_pruned
    assert drop_greg < 10.0 and drop_l1 > 50.0, (drop_greg, drop_l1)


def test_polarization_separates_pruned_and_kept_scales_more_than_l1(digits_context):
    """Polarization (Zhuang et al. 2020, Fig. 1): pruned BatchNorm scales sit at
    0, the kept ones well above; under L1 they crowd around the cut."""
    slim = methods.run_slimming(digits_context, 4).bn_scales
    polar = methods.run_polarization(digits_context, 5).bn_scales
    assert polar["pruned"].any() and slim["pruned"].any()
    assert np.abs(polar["values"][polar["pruned"]]).max() < 0.05
    assert polar["margin"] > slim["margin"] + 0.15, (polar["margin"], slim["margin"])


def test_rda_gives_exact_zeros_where_the_sgd_l1_subgradient_does_not(digits_context):
    """RDA (He et al.): the soft threshold of the dual average yields exact zeros;
    SGD with the L1 subgradient of the same strength only oscillates around 0."""
    rda = methods.run_rda(digits_context, 6)
    sgd = methods.sgd_l1_sparsity(digits_context, 9)
    assert rda.sparsity_trace["sparsity"][-1] > 0.5
    assert rda.row.sparsity > 0.5
    assert sgd["sparsity"][-1] < 0.01
    assert rda.row.acc_pruned > 50.0
