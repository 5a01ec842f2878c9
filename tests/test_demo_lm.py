"""``python -m regkern demo --task lm``: the text selection, the claims of
the run with fixed seeds and small settings (GReg's perplexity right after
the cut far below one-shot magnitude's at the same structure; the saved and
reloaded pruned model reproduces its perplexity; the table, CSV, Markdown and
figures are written), ``--help`` and clear errors for bad flags."""
import csv

import pytest
import torch

from regkern.__main__ import main
from regkern.demo import lm, lm_data, lm_methods

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

# a small model and short phases: the baseline must learn enough text for a blind cut to hurt
SMALL = dict(hidden=96, intermediate=256, layers=2, heads=4, kv_heads=2, seq_len=64, batch_size=8, steps=250,
             prune_steps=80, finetune_steps=10, eval_every=50, eval_windows=16, speed_reps=3, quiet=True)


@pytest.fixture(scope="module")
def text():
    return lm_data.load()


def test_text_is_split_by_file_and_fixed(text):
    again = lm_data.load()
    assert torch.equal(text.train, again.train) and torch.equal(text.held_out, again.held_out)
    assert not set(text.train_files) & set(text.held_out_files)
    assert len(text.held_out_files) == (len(text.train_files) + len(text.held_out_files)) // lm_data.HELD_OUT_EVERY
    windows = lm_data.held_out_windows(text, 4, 32)
    assert windows.shape == (4, 32) and windows.dtype == torch.int64 and int(windows.max()) < lm_data.VOCAB


def test_greg_beats_one_shot_magnitude_and_the_pruned_model_reloads(text, tmp_path, capsys):
    s = lm_methods.LMSettings(**SMALL)
    out = lm.run(str(tmp_path), s, text, ["greg1", "magnitude"])
    greg, magnitude = out["results"]["greg1"], out["results"]["magnitude"]
    # the same structure: half the kv groups and half the neurons of every block
    assert lm_methods.count_structure(greg.model) == lm_methods.count_structure(magnitude.model) == (2, 256)
    # right after the cut, GReg has moved the pruned units' work to the kept ones; a blind cut has not
    # (this machine, seed 0: baseline 10.8, GReg-1 10.9, magnitude 15.8)
    assert greg.ppl_cut < 0.8 * magnitude.ppl_cut, (greg.ppl_cut, magnitude.ppl_cut, out["baseline_ppl"])
    assert greg.ppl_cut < 1.1 * out["baseline_ppl"] < 1.1 * 0.8 * magnitude.ppl_cut
    # save_pruned + load_pruned: the reloaded model computes the same perplexity exactly
    assert out["saved"] == "greg1" and out["reloaded_ppl"] == greg.ppl_final
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["Baseline", "GReg-1", "Magnitude one-shot"]
    assert float(rows[1]["macs_per_token"]) < float(rows[0]["macs_per_token"])
    for name in ("results.md", "lm_perplexity.png", "greg_unit_norms.png", "pruned-model/config.json"):
        assert (tmp_path / name).is_file()
    printed = capsys.readouterr().out
    assert "equal to" in printed and "PPL pruned" in printed


def test_help_lists_the_lm_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--task", "--steps", "--prune-steps", "--finetune-steps", "--seq-len", "--eval-every"):
        assert flag in help_text
    for method in lm_methods.METHODS:
        assert method in help_text


@pytest.mark.parametrize("argv, words", [
    (["--methods", "greg1,l1"], "unknown method(s) l1"),
    (["--methods", "greg1,greg1"], "twice"),
    (["--ratio", "1.5"], "--ratio"),
    (["--epochs", "3"], "image task"),
    (["--data", "cifar10"], "image task"),
    (["--steps", "-1"], "--steps"),
    (["--seq-len", "4"], "--seq-len"),
    (["--device", "cuda"], "CPU"),
])
def test_bad_flags_give_one_sentence(argv, words, tmp_path, capsys):
    assert main(["demo", "--task", "lm", "--out", str(tmp_path / "o")] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("regkern demo: error:") and words in err and "\n" not in err
    assert not (tmp_path / "o").exists()


def test_explicit_image_defaults_are_read_as_given():
    # --ratio 0.75 given on the command line is the user's, not the image task's default
    assert lm.given_flags(["demo", "--task", "lm", "--ratio", "0.75"]) == {"ratio"}
    assert lm.given_flags(["demo", "--task", "lm"]) == set()

