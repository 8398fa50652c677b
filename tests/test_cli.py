"""The command line as a user runs it: subprocesses, real shards, real output files."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import numpy as np
import torch
import webdataset as wds

from infobatch_stream import META_KEY, DatasetIndex, InfoBatch
from tests.helpers.data import write_shards


def run_cli(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "infobatch_stream.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def test_index_command_writes_a_wids_shard_list(tmp_path):
    write_shards(str(tmp_path / "shards"), num_shards=3, per_shard=7, prefix="data")
    done = run_cli("index", "shards/data-{000..002}.tar", "-o", "shards/index.json", "-q", cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "indexed 3 shards, 21 samples" in done.stdout
    doc = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert [s["url"] for s in doc["shardlist"]] == [f"data-{i:03d}.tar" for i in range(3)]
    assert [s["nsamples"] for s in doc["shardlist"]] == [7, 7, 7]
    assert all(s["filesize"] == os.path.getsize(tmp_path / "shards" / s["url"]) for s in doc["shardlist"])
    assert DatasetIndex.load(str(tmp_path / "shards" / "index.json")).num_samples == 21


def test_index_command_reports_a_truncated_shard(tmp_path):
    urls = write_shards(str(tmp_path), num_shards=2, per_shard=5)
    with open(urls[1], "r+b") as f:
        f.truncate(os.path.getsize(urls[1]) // 2 + 100)
    done = run_cli("index", *urls, "-o", str(tmp_path / "index.json"), "-q")
    assert done.returncode != 0
    assert "part-001.tar" in done.stderr and "truncated" in done.stderr


def test_every_command_shows_an_example():
    for args in (["--help"], ["index", "--help"], ["demo", "--help"]):
        done = run_cli(*args)
        assert done.returncode == 0 and "example: infobatch-stream" in done.stdout


def test_demo_runs_end_to_end(tmp_path):
    done = run_cli("demo", "--epochs", "4", "--delta", "1.0", "--out", str(tmp_path / "demo"), "-q")
    assert done.returncode == 0, done.stderr
    rows = [
        line for line in done.stdout.splitlines() if line.startswith("| full data") or line.startswith("| InfoBatch")
    ]
    assert len(rows) == 2
    full, pruned = (int(r.split("|")[3].strip().replace(",", "")) for r in rows)
    assert full == 4 * 1347 and 1347 * 2 < pruned < full  # epoch 0 is full, later epochs prune
    assert "median of 2" in done.stdout and "measured with Python" in done.stdout and "torch " in done.stdout
    assert "repeats differ" not in done.stderr  # the same counts on every repeat: they are exact


def test_library_touches_no_global_rng(tmp_path):
    urls = write_shards(str(tmp_path), num_shards=2, per_shard=10)
    ib = InfoBatch(DatasetIndex.load(_index(urls, tmp_path)), num_epochs=3)
    states = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    for epoch in range(3):
        ib.set_epoch(epoch)
        for sample in wds.DataPipeline(ib.shards(), wds.tarfile_to_samples(), ib.filter()):
            ib.update(sample[META_KEY], torch.rand(1, generator=torch.Generator().manual_seed(epoch)))
    assert random.getstate() == states[0]
    assert np.array_equal(np.random.get_state()[1], states[1])
    assert torch.equal(torch.get_rng_state(), states[2])


def _index(urls: list[str], folder) -> str:
    from infobatch_stream import build_index

    path = str(folder / "index.json")
    build_index(urls, path)
    return path


def test_index_command_expands_every_pattern_and_reports_missing_shards(tmp_path):
    write_shards(str(tmp_path / "shards"), num_shards=4, per_shard=3, prefix="data")
    done = run_cli(
        "index", "shards/data-{000..001}.tar", "shards/data-{002..003}.tar", "-o", "two.json", "-q", cwd=str(tmp_path)
    )
    assert done.returncode == 0, done.stderr
    assert "indexed 4 shards, 12 samples" in done.stdout
    missing = run_cli("index", "shards/nope.tar", "-o", "x.json", "-q", cwd=str(tmp_path))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "infobatch-stream index: error: [Errno 2] No such file or directory: 'shards/nope.tar'"
    ]
