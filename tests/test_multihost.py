"""A real multi-host run on loopback: 2 processes x 4 CPU devices, the gloo collectives, `launch.py`
end to end, against the same run in one process on one device.

Each process is what one TPU VM worker would run: the same command line but its `--process_id`.
Process 1 gets its *own* `--output_dir` (a worker's local disk), so the run proves three things at
once: process 1 writes nothing (its folder never appears); `--resume` works without a shared file
system (process 1 learns the finished case ids and the pre-edit cache from process 0's broadcast --
reading its own empty folder it would redo every edit while process 0 redoes one, and the two would
hang in a collective or disagree); and results computed on a mesh spanning two processes, whose
sharded arrays must be gathered before the host reads them, equal the one-device results.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tiny import qaedit_records, save_tiny

ROOT = Path(__file__).resolve().parents[1]
RUN = "FT-M_ckpt_qaedit_single_both_question-only"
# FT-M strong enough that edits succeed and locality moves (the post-edit rows differ from the pre-edit ones).
COMMON = ["--method=FT-M", "--dataset=qaedit", "--evaluation=both", "--context_type=question-only",
          "--judge=exact_match", "--max_new_tokens=4", "--hparams_for=smollm2-135m", "--hp", "layers=1",
          "--hp", "num_steps=10", "--hp", "lr=5e-2"]
TIMEOUT_S = 240  # one launch; a disagreement between the processes shows as a hang in a collective


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(outs: list[Path], devices: int, args: list[str]) -> list[subprocess.CompletedProcess]:
    """`launch.py args` in len(outs) processes of `devices` CPU devices each, process i writing to outs[i]."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "OPENAI_API_KEY")}
    env.update(XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
               TOKENIZERS_PARALLELISM="false")
    n, port = len(outs), _free_port()
    procs = []
    for i, out in enumerate(outs):
        dist = [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={n}", f"--process_id={i}"] if n > 1 else []
        procs.append(subprocess.Popen([sys.executable, "launch.py", *args, f"--output_dir={out}", *dist], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    deadline, done = time.monotonic() + TIMEOUT_S, []
    try:
        for p in procs:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.communicate()
        pytest.fail(f"{n} processes did not finish within {TIMEOUT_S} s (a hang in a collective?)")
    for i, p in enumerate(done):
        assert p.returncode == 0, f"process {i}: {p.stderr[-3000:]}"
    return done


def _same(a, b, where: str = "") -> list[str]:
    """Where two results rows differ: floats beyond 1e-5 (sharded reductions round differently),
    anything else at all; the edit's wall time is not compared."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where}: keys {sorted(a)} vs {sorted(b)}"]
        keys = [k for k in a if not (where.endswith("edit") and k == "seconds")]
        return [d for k in keys for d in _same(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _same(x, y, f"{where}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= 1e-5 * max(1.0, abs(b)) else [f"{where}: {a} vs {b}"]
    return [] if type(a) is type(b) and a == b else [f"{where}: {a!r} vs {b!r}"]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_two_processes_on_loopback_equal_one_process_and_only_process_0_writes(tmp_path):
    ckpt = save_tiny("llama", tmp_path / "ckpt", seed=5)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(qaedit_records(3)))
    args = [*COMMON, f"--model={ckpt}", f"--data_path={data}"]
    out, own_disk = tmp_path / "out", tmp_path / "process1_disk" / "out"

    # Two processes: the first two records on a data x tensor mesh (batch rows on two processes, heads
    # within each), then --resume with all three on fsdp:8 (every weight split over both processes).
    first = _launch([out, own_disk], 4, [*args, "--ds_size=2", "--mesh=data:2,tensor:4"])
    after_first = _rows(out / f"{RUN}.jsonl")
    resumed = _launch([out, own_disk], 4, [*args, "--resume", "--mesh=fsdp:8"])
    reference = tmp_path / "reference"
    _launch([reference], 1, args)

    rows, ref = _rows(out / f"{RUN}.jsonl"), _rows(reference / f"{RUN}.jsonl")
    assert [r["case_id"] for r in after_first] == [0, 1]
    assert rows[:2] == after_first  # resumed: the finished rows were kept, not redone (same edit seconds)
    assert [r["case_id"] for r in rows] == [r["case_id"] for r in ref] == [0, 1, 2]
    assert _same(rows, ref) == []
    # Not a vacuous comparison: the edits took and moved locality, and the one-device run agrees.
    assert all(r["post"]["synthetic"]["rewrite_acc"] == 1.0 for r in ref)
    assert any(r["post"]["synthetic"]["locality"]["neighborhood_acc"] < 1.0 for r in ref)
    summary = json.loads((out / f"{RUN}_summary.json").read_text())
    assert _same(summary, json.loads((reference / f"{RUN}_summary.json").read_text())) == []

    # One writer: process 0's folder holds exactly one run's files, process 1's folder never appeared.
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert written[1:] == [f"{RUN}.jsonl", f"{RUN}_summary.json", f"{RUN}_table.md"]
    assert written[0].startswith(".pre_cache/") and written[0].endswith(".jsonl")
    assert not own_disk.parent.exists()
    for run in (first, resumed):  # only process 0 reports the files it wrote
        assert f"{out / RUN}.jsonl" in run[0].stdout and "| ckpt | FT-M |" in run[0].stdout
        assert "| ckpt |" not in run[1].stdout and str(out) not in run[1].stdout  # (gloo's own lines aside)


def test_distributed_flags_are_all_or_none_and_one_process_is_untouched():
    """Half-given coordinator flags are a one-line error before anything starts; no flags leave JAX
    alone (no distributed client: every write happens, broadcasts are the identity)."""
    from absl import flags

    from mirage_jax import cli, distributed

    fv = flags.FlagValues()
    cli.define_distributed_flags(fv)
    fv(["prog"])
    assert distributed.initialize_from_flags(fv) is False
    assert not jax_distributed_initialized() and distributed.is_writer()
    assert distributed.broadcast_json({"a": [1]}) == {"a": [1]}
    fv(["prog", "--coordinator_address=127.0.0.1:1", "--process_id=0"])
    with pytest.raises(distributed.DistributedError, match="go together") as err:
        distributed.initialize_from_flags(fv)
    assert "\n" not in str(err.value)
    with pytest.raises(distributed.DistributedError, match=r"--process_id=2 is outside 0..1"):
        distributed.initialize("127.0.0.1:1", 2, 2)
    assert not jax_distributed_initialized()


def jax_distributed_initialized() -> bool:
    import jax

    return jax.distributed.is_initialized()


CHECK_SAME = """
import sys
from mirage_jax import distributed
distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
try:
    distributed.check_same("found" if sys.argv[1] == "0" else "missing", "cached MLP key statistics")
except distributed.DistributedError as err:
    print(str(err).replace(chr(10), " <NEWLINE> "))  # a newline would show in the test
    sys.exit(3)
"""


def _spawn(code: str, args: list[list[str]], devices: int = 1) -> list[tuple[int, str, str]]:
    """`python -c code <args[i]...>` in len(args) processes of `devices` CPU devices each, `{port}` in
    `code` a free loopback port; (returncode, stdout, stderr) per process."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT), XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    code = code.replace("{port}", str(_free_port()))
    procs = [subprocess.Popen([sys.executable, "-c", code, *a], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for a in args]
    try:
        outs = [p.communicate(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{len(args)} processes did not finish within {TIMEOUT_S} s (a hang in a collective?)")
    return [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]


def test_a_cache_on_one_worker_only_is_a_one_line_error_on_every_worker_not_a_hang():
    """Process 0 finds a cache that process 1 lacks (a worker's local disk): instead of one process
    computing (collectives) while the other reads a file -- a hang -- both stop with one line saying
    what differs. Planted bug caught: the check skipped (exit 0 on both)."""
    for i, (rc, stdout, stderr) in enumerate(_spawn(CHECK_SAME, [["0"], ["1"]])):
        assert rc == 3, f"process {i}: rc {rc}: {stderr[-2000:]}"
        line = stdout.strip().splitlines()[-1]  # gloo prints its own lines first
        assert "<NEWLINE>" not in line and "cached MLP key statistics differs between the processes" in line
        assert f"process {i}: {'found' if i == 0 else 'missing'}" in line


SAVE = """
import sys
from mirage_jax import distributed
distributed.initialize("127.0.0.1:{port}", 2, int(sys.argv[1]))
from mirage_jax.model import load_model
from mirage_jax.model.sharding import make_mesh
model = load_model(sys.argv[2], mesh=make_mesh("fsdp:8"))
model.save(sys.argv[3])
"""


def test_export_of_a_model_split_across_processes_is_gathered_and_written_once(tmp_path):
    """Model.save on a mesh spanning two processes (fsdp:8: every kernel split across both): each
    process gathers the tensors (a plain device_get fails on arrays other processes hold), process 0
    alone writes, and the checkpoint equals the one it was loaded from."""
    import jax
    import numpy as np

    from mirage_jax.model.checkpoint import load_hf_checkpoint

    ckpt = save_tiny("llama", tmp_path / "ckpt", seed=3)
    outs = [tmp_path / "out0", tmp_path / "out1"]
    for i, (rc, _, stderr) in enumerate(_spawn(SAVE, [[str(i), str(ckpt), str(o)] for i, o in enumerate(outs)], 4)):
        assert rc == 0, f"process {i}: {stderr[-3000:]}"
    assert not outs[1].exists()
    _, saved, _ = load_hf_checkpoint(outs[0])
    _, original, _ = load_hf_checkpoint(ckpt)
    jax.tree.map(np.testing.assert_array_equal, saved, original)


def test_sequence_checkpoint_written_by_process_0_and_resumed_on_both(tmp_path):
    """A sequential run over two processes (every weight split across them) checkpoints its edited
    params from process 0 only; killed during the final evaluation (the last row lost), the resumed
    run reads the checkpoint on process 0 and broadcasts it, edits nothing again -- the re-written row
    keeps the first run's edit seconds, which a replay would have measured anew -- and equals it."""
    ckpt = save_tiny("llama", tmp_path / "ckpt", seed=5)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(qaedit_records(3)))
    args = [*COMMON, f"--model={ckpt}", f"--data_path={data}", "--edit_mode=sequential", "--checkpoint_every=2",
            "--mesh=fsdp:8"]
    out, own_disk = tmp_path / "out", tmp_path / "process1_disk" / "out"
    run = RUN.replace("_single_", "_sequential_")
    _launch([out, own_disk], 4, args)
    results = out / f"{run}.jsonl"
    whole = _rows(results)
    assert (out / f"{run}_sequence.npz").exists() and not own_disk.parent.exists()
    results.write_text("".join(json.dumps(r) + "\n" for r in whole[:2]))
    _launch([out, own_disk], 4, [*args, "--resume"])
    assert _rows(results) == whole
    assert any(r["post"]["synthetic"]["rewrite_acc"] == 1.0 for r in whole)  # the edits took
