"""The README's distributed recipes run as pasted, as torchrun would start
them: two processes with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT set.
DDP: a first run that prunes and saves a distributed checkpoint, a second
that resumes from it and finishes. FSDP2: a run that prunes the sharded
model, then cuts a plain copy with the schedule's plan."""
import re
import os
import pathlib
import subprocess
import sys

import regkern
from ranks import free_port
from test_readme import block_with

# the processes import the regkern this test imported
SOURCE = str(pathlib.Path(regkern.__file__).resolve().parents[1])


def _launch(script: pathlib.Path, checkpoint: pathlib.Path, cwd: pathlib.Path):
    port = free_port()
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([SOURCE, os.environ.get("PYTHONPATH", "")])}
        procs.append(subprocess.Popen([sys.executable, str(script), str(checkpoint)], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            outputs.append((p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outputs


def _check(outputs, what: str) -> str:
    for rank, (code, out, err) in enumerate(outputs):
        # torch's gloo teardown sometimes aborts a process at interpreter exit
        # (SIGABRT after all work is done, plain torch DDP scripts too); any other failure counts
        aborted_at_exit = code in (-6, 134) and "Traceback" not in err
        assert code == 0 or aborted_at_exit, f"rank {rank} of the {what} run exited with {code}:\n{err[-3000:]}"
    return outputs[0][1]


def test_ddp_recipe_prunes_saves_and_resumes(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(block_with("torchrun --nproc-per-node 2 train.py"))
    checkpoint = tmp_path / "ckpt"
    first = _check(_launch(script, checkpoint, tmp_path), "first")
    assert "params" in first.lower()  # rank 0 printed the cut's summary
    assert (checkpoint / ".metadata").exists()
    _check(_launch(script, checkpoint, tmp_path), "resumed")


def test_fsdp2_recipe_prunes_and_cuts_a_plain_copy(tmp_path):
    script = tmp_path / "train_fsdp.py"
    script.write_text(block_with("torchrun --nproc-per-node 2 train_fsdp.py"))
    out = _check(_launch(script, tmp_path / "unused", tmp_path), "FSDP2")
    assert "masked in the sharded model" in out  # rank 0 printed the masked cut's summary
    shapes, gap = re.search(r"cut model (\[.*\]) max output difference (\S+)", out).groups()
    assert shapes == "[(8, 3, 3, 3), (8,)]"
    assert float(gap) < 1e-5
