"""Run examples/ddp_train.py end to end: two real Gloo ranks under torchrun, and one plain process.

Both runs share one output folder: the first writes the digits shards and the index, the second
reuses them (the example's "index already exists" path).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "ddp_train.py"
TIMEOUT = 120
TORCHRUN_VARS = (
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "GROUP_RANK",
    "ROLE_RANK",
    "TORCHELASTIC_RUN_ID",
)


def run_example(cmd: list[str]) -> dict:
    """Run ``cmd`` (killing its whole process group after TIMEOUT s); the example's JSON summary."""
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARS}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's ranks and loader workers too
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} still running after {TIMEOUT} s\n{err[-4000:]}")
    assert proc.returncode == 0, f"rc {proc.returncode}\nstdout:\n{out[-2000:]}\nstderr:\n{err[-4000:]}"
    lines = [line for line in out.splitlines() if line.startswith("{")]
    assert len(lines) == 1, f"expected one JSON summary line on stdout, got:\n{out}"
    return json.loads(lines[0])


def torchrun(*args: str) -> list[str]:
    """The example under torchrun: two local ranks, ``--quick``, then ``args``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(EXAMPLE),
        "--quick",
        *args,
    ]


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("ddp_out"))


def test_torchrun_two_ranks(out_dir):
    summary = run_example(torchrun("--out", out_dir))
    assert summary["world_size"] == 2 and summary["epochs"] == 6
    steps = summary["steps_per_rank"]
    assert len(steps) == 2 and steps[0] == steps[1] > 0, f"unequal steps per rank: {steps}"
    assert summary["saved"] > 0
    assert summary["accuracy"] > 0.8  # 6 epochs of an MLP on digits: about 0.93


def test_single_process_without_process_group(out_dir):
    summary = run_example([sys.executable, str(EXAMPLE), "--quick", "--epochs", "3", "--out", out_dir])
    assert summary["world_size"] == 1 and summary["epochs"] == 3
    assert len(summary["steps_per_rank"]) == 1
    assert summary["saved"] > 0  # epoch 1 of 3 prunes (delta 0.875)
    assert summary["accuracy"] > 0.8


def test_torchrun_two_ranks_from_s3(s3_server, tmp_path):
    """The same example with its shards in an S3 bucket (moto on 127.0.0.1), listed by a glob."""
    from infobatch_stream.demo import write_digits_shards

    urls, _, _ = write_digits_shards(str(tmp_path / "local"), num_shards=8, seed=0)
    out = tmp_path / "s3run"
    out.mkdir()
    s3_server.upload("ddp-bucket", urls, "train")
    summary = run_example(torchrun("--shards", "s3://ddp-bucket/train/*.tar", "--out", str(out)))
    assert summary["world_size"] == 2
    steps = summary["steps_per_rank"]
    assert steps[0] == steps[1] > 0 and summary["saved"] > 0  # user shards: the example does not evaluate
    assert summary["samples"] > 0
