"""The classification, MAE and diffusion examples and the study script, run for a few epochs.

In-process (the examples are importable), on the bundled digits written once per module."""

from __future__ import annotations

import glob
import importlib
import json
import math
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def examples_importable() -> Iterator[None]:
    """The examples and the study script import their neighbours (``from common import ...``) as
    scripts do: while this module runs, their folders lead ``sys.path`` (benchmarks/, examples/)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(ROOT / "examples"))
        patch.syspath_prepend(str(ROOT / "benchmarks"))
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("examples_data"))


def run(name: str, *argv: str) -> dict:
    import common

    module = importlib.import_module(name)
    return common.train(module.EXAMPLE, common.parse(module.EXAMPLE, module.__doc__, list(argv)))


def test_classify_arms_match_and_random_trains_the_same_counts(data, tmp_path):
    summary = str(tmp_path / "ib.json")
    ib = run("classify", "--out", data, "--epochs", "4", "--workers", "2", "--json", summary)
    per_epoch = [e["samples"] for e in ib["epochs"]]
    assert per_epoch == [s["trained"] for s in ib["stats"]] == [s["kept"] for s in ib["stats"]]
    assert 0 < ib["saved"] < 0.5 and ib["final"] > 0.8
    rand = run("classify", "--out", data, "--epochs", "4", "--workers", "2", "--arm", "random", "--match", summary)
    assert [e["samples"] for e in rand["epochs"]] == per_epoch  # exactly the same counts, other samples
    full = run("classify", "--out", data, "--epochs", "4", "--workers", "0", "--arm", "full")
    assert full["samples"] == full["full_samples"] and full["saved"] == 0


@pytest.mark.parametrize("name", ["mae", "diffusion"])
def test_noisy_loss_examples_train_and_prune(data, name):
    summary = run(name, "--out", data, "--epochs", "3", "--workers", "0", "--ema-decay", "0.5")
    metrics = [e[summary["metric"]] for e in summary["epochs"]]
    assert all(math.isfinite(m) for m in metrics) and metrics[-1] < metrics[0]  # lower is better, and it learns
    assert summary["saved"] > 0 and summary["config"]["ema_decay"] == 0.5


def test_any_shards_with_the_same_fields(data, tmp_path):
    shards = os.path.join(data, "digits-{000..007}.tar")
    test = glob.glob(os.path.join(data, "test", "*.tar"))[0]
    summary = run(
        "classify", "--shards", shards, "--test-shards", test, "--out", str(tmp_path), "--epochs", "2", "--workers", "0"
    )
    assert summary["samples"] == summary["full_samples"]  # epoch 1 of 2 prunes nothing (delta 0.875)
    with pytest.raises(SystemExit):
        run("classify", "--shards", shards)  # a metric needs held-out shards


def test_study_writes_table_json_and_plots(data, tmp_path):
    import study

    out = str(tmp_path / "study")
    os.makedirs(out)
    os.symlink(data, os.path.join(out, "data"))  # the digits already written
    study.main(["--examples", "classify", "--seeds", "0", "1", "--epochs", "3", "--out", out, "--workers", "0"])
    table = open(os.path.join(out, "results.md")).read()
    for arm in study.arms_of("classify"):
        assert re.search(rf"\| classify( \(3 ep\.\))? \| {re.escape(arm)} \|", table), arm
    results = json.load(open(os.path.join(out, "results.json")))
    assert len(results["classify"]["random"]) == 2
    assert os.path.getsize(os.path.join(out, "classify.png")) > 10_000


def test_bad_arguments_are_refused_up_front(data, tmp_path):
    import classify
    import common

    summary = str(tmp_path / "short.json")
    with open(summary, "w") as f:
        json.dump({"example": "classify", "epochs": [{"samples": 1}] * 2, "config": {"out": data, "shards": None}}, f)
    parse = lambda *argv: common.parse(classify.EXAMPLE, classify.__doc__, list(argv))  # noqa: E731
    assert parse("--out", data, "--epochs", "2", "--arm", "random", "--match", summary).counts == [1, 1]
    for argv in (
        ["--epochs", "3", "--arm", "random", "--match", summary],  # matched run has 2 epochs
        ["--epochs", "2", "--arm", "random", "--match", summary, "--out", str(tmp_path)],  # other data
        ["--normalized-score"],
    ):  # no noise level in classification
        with pytest.raises(SystemExit):
            parse(*(["--out", data] if "--out" not in argv else []), *argv)
