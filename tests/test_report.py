"""``infobatch-stream report`` on what a real run saves: ib.save(), torch.save() and JSON stats."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from infobatch_stream import InfoBatch, report
from infobatch_stream.cli import build_parser, main
from infobatch_stream.planner import BLOCK
from infobatch_stream.policy import seen_sum_count
from tests.helpers.data import train_epochs
from tests.helpers.loaders import meta_loader

EPOCHS = 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shared_shards):
    """One real run (4 epochs, 2 of them pruning) saved every way the report reads."""
    folder = tmp_path_factory.mktemp("report")
    _, index = shared_shards(4, 10)
    ib = InfoBatch(index, num_epochs=EPOCHS, delta=0.75)
    train_epochs(ib, meta_loader(ib, 5), EPOCHS)
    paths = {
        kind: str(folder / name)
        for kind, name in (
            ("ib.save", "state.ibs"),
            ("torch.save", "last.ckpt"),
            ("json", "run.json"),
            ("list", "stats.txt"),
        )
    }
    ib.save(paths["ib.save"])
    torch.save({"model": {"w": torch.ones(3)}, "ib": ib.state_dict(), "epoch": EPOCHS}, paths["torch.save"])
    with open(paths["json"], "w") as f:
        json.dump({"stats": ib.stats(), "accuracy": 0.9}, f)
    with open(paths["list"], "w") as f:  # names say nothing: the kind is read from the content
        json.dump(ib.stats(), f)
    return ib.stats(), np.array(ib.store.scores), ib.state_dict()["config"], paths, folder


def run_cli_all(*argvs: list[str]) -> list[subprocess.CompletedProcess]:
    """The commands as a user runs them, started together (each is mostly interpreter start-up)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "infobatch_stream.cli", *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    done = []
    for argv, proc in zip(argvs, procs):
        out, err = proc.communicate(timeout=120)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done


def table(stdout: str) -> list[list[str]]:
    return [
        [c.strip() for c in line.strip("|").split("|")]
        for line in stdout.splitlines()
        if line.startswith("| ") and line[2].isdigit()
    ]


def test_report_prints_plots_and_summarises_every_kind_of_file(saved, capsys):
    stats, scores, config, paths, folder = saved
    assert [s["pruned"] > 0 for s in stats] == [False, True, True, False]  # the run exercises both phases
    kinds = list(paths)
    argvs = [
        ["report", paths[k], "--plot", str(folder / f"{k}.png"), "--json", str(folder / f"{k}.json")] for k in kinds
    ]
    outputs = run_cli_all(*argvs[:3])  # as a user runs it; the fourth in this process, to save a start-up
    assert main(argvs[3]) == 0
    outputs.append(subprocess.CompletedProcess(argvs[3], 0, *capsys.readouterr()))
    full = EPOCHS * stats[0]["total"]
    trained = sum(s["trained"] for s in stats)
    pruning = [s for s in stats if s["pruned"]]
    for kind, done in zip(kinds, outputs):
        assert done.returncode == 0, (kind, done.stderr)
        rows = table(done.stdout)
        assert len(rows) == EPOCHS
        for row, s in zip(rows, stats):
            assert int(row[0]) == s["epoch"]
            assert (
                (row[1] == "-") if s["threshold"] is None else float(row[1]) == pytest.approx(s["threshold"], rel=1e-5)
            )
            assert [int(c.replace(",", "")) for c in row[2:6]] == [s["seen"], s["well_learned"], s["pruned"], s["kept"]]
            assert row[6] == f"{100 * s['kept'] / s['total']:.1f}%" and int(row[7]) == s["trained"]
            assert row[8] == f"{s['bytes_read'] / 1e3:.1f} kB" and row[9] == f"{s['bytes_skipped'] / 1e3:.1f} kB"
        assert f"full data: {full:,} samples" in done.stdout
        assert f"trained: {trained:,} samples ({100 * (1 - trained / full):.1f}% saved)" in done.stdout
        assert f"pruning epochs: 2 of {EPOCHS}" in done.stdout
        with open(folder / f"{kind}.png", "rb") as f:
            png = f.read()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        summary = json.loads((folder / f"{kind}.json").read_text())
        assert summary["epochs"] == EPOCHS and summary["full_data"] == full and summary["trained"] == trained
        assert summary["kept"] == sum(s["kept"] for s in stats)
        assert summary["saved_trained"] == pytest.approx(1 - trained / full)
        assert summary["pruning_epochs"] == 2
        assert summary["mean_pruned_fraction"] == pytest.approx(np.mean([s["pruned"] / s["total"] for s in pruning]))
        assert summary["bytes_read"] == sum(s["bytes_read"] for s in stats) > 0
        assert summary["bytes_skipped"] == sum(s["bytes_skipped"] for s in stats) > 0
        assert summary["final_threshold"] == pytest.approx(stats[-1]["threshold"])
        if kind in ("ib.save", "torch.save"):  # a state also has the scores and the configuration
            assert summary["source"] == kind and summary["config"] == config
            seen = scores[np.isfinite(scores)].astype(np.float64)
            assert summary["scores"]["seen"] == seen.size == stats[0]["total"]
            assert summary["scores"]["quantiles"]["q50"] == pytest.approx(np.median(seen))
            assert summary["scores"]["below_mean"] == stats[-1]["well_learned"]  # the scores did not change
            assert summary["scores"]["mean"] == stats[-1]["threshold"]  # to the bit: summed as the planner does
            assert summary["scores"]["quantiles"] == dict(
                zip(
                    ("q0", "q10", "q25", "q50", "q75", "q90", "q100"),
                    np.quantile(seen, [0, 0.1, 0.25, 0.5, 0.75, 0.9, 1]).tolist(),
                )
            )  # exact
            hist = summary["scores"]["histogram"]
            assert hist["counts"] == np.histogram(seen, bins=hist["edges"])[0].tolist() and sum(hist["counts"]) == 40
            assert f"scores: {seen.size} of {seen.size} samples seen" in done.stdout
        else:
            assert summary["source"] == "json" and "scores" not in summary
    assert table(outputs[0].stdout) == table(outputs[2].stdout) == table(outputs[3].stdout)


def test_bad_files_are_refused_with_the_file_named(saved, tmp_path, capsys):
    stats, _, _, paths, _ = saved
    marker = tmp_path / "unpickled"

    class Trap:  # unpickling this creates the marker file
        def __reduce__(self):
            return open, (str(marker), "w")

    bad = {
        "random.bin": np.random.default_rng(0).bytes(4096),
        "model.pkl": pickle.dumps({"stats": stats, "trap": Trap()}),
        "other.json": json.dumps({"accuracy": 0.9}).encode(),
        "numbers.json": json.dumps([1, 2, 3]).encode(),
        "broken.json": b'{"stats": [',
        "cut.ibs": open(paths["ib.save"], "rb").read()[:100],
    }
    expected = {
        "random.bin": "is not a file the report can read",
        "model.pkl": "is not a file the report can read",
        "other.json": "holds no per-epoch stats",
        "numbers.json": "stats entry 0 is not an ib.stats() epoch",
        "broken.json": "is not valid JSON",
        "cut.ibs": "damaged",
        "weights.pt": "holds no ib.state_dict()",
        "trap.pt": "which the report never unpickles",
    }
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    torch.save({"model": {"w": torch.ones(3)}}, str(tmp_path / "weights.pt"))
    torch.save({"ib": {"format": 1, "stats": stats}, "trap": Trap()}, str(tmp_path / "trap.pt"))
    assert not marker.exists()
    for name, message in expected.items():
        path = str(tmp_path / name)
        assert main(["report", path]) == 1, name
        err = capsys.readouterr().err
        assert err.startswith("infobatch-stream report: error: ") and path in err and message in err, (name, err)
    assert not marker.exists()  # neither file was unpickled
    (done,) = run_cli_all(["report", str(tmp_path / "random.bin")])  # the exit code through the real entry point
    assert (
        done.returncode == 1 and "random.bin" in done.stderr and "expected a file written by ib.save()" in done.stderr
    )
    assert main(["report", str(tmp_path / "missing.ibs")]) == 1
    assert "missing.ibs" in capsys.readouterr().err


def test_bad_inputs_never_print_a_traceback(saved, tmp_path, capsys):
    """Stats that do not add up (a zero total with pruned samples would divide by zero), JSON too
    deep or too large for a stats file, a torch checkpoint holding a list that holds itself."""
    stats, _, _, _, _ = saved
    cases = {
        "zero.json": ([dict(stats[1], total=0)], "do not add up"),
        "negative.json": ([dict(stats[0], kept=-1)], "expected an integer >= 0"),
        "bool.json": ([dict(stats[0], seen=True)], "expected an integer >= 0"),
        "huge.json": ([dict(stats[0], bytes_read=10**30)], "expected an integer >= 0"),
        "deep.json": ("[" * 100_000 + "]" * 100_000, "is not valid JSON"),
        "digits.json": ('[{"epoch": ' + "1" * 5000 + "}]", "is not valid JSON"),
    }
    for name, (doc, _) in cases.items():
        (tmp_path / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with open(tmp_path / "large.json", "wb") as f:  # sparse: costs no disk
        f.write(b"[")
        f.truncate(report.MAX_JSON + 1)
    cases["large.json"] = (None, "too large for a JSON of ib.stats()")
    loop: list = [1]
    loop.append(loop)
    torch.save({"model": {"w": torch.ones(2)}, "history": loop}, str(tmp_path / "loop.pt"))
    cases["loop.pt"] = (None, "holds no ib.state_dict()")
    for name, (_, message) in cases.items():
        path = str(tmp_path / name)
        assert main(["report", path]) == 1, name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and path in err and message in err, (name, err)
    ok = tmp_path / "empty-epoch.json"  # a zero total is fine when nothing was pruned
    ok.write_text(json.dumps([dict(stats[0], total=0, kept=0, pruned=0, seen=0, well_learned=0, trained=0)]))
    assert main(["report", str(ok), "--plot", str(tmp_path / "empty.png")]) == 0
    assert "| 0 |" in capsys.readouterr().out


def test_pipes_devices_and_folders_are_refused_without_being_opened(tmp_path):
    """A FIFO nobody writes to would block open() forever: refused from its stat()."""
    fifo = str(tmp_path / "stats.json")
    os.mkfifo(fifo)
    outputs = run_cli_all(["report", fifo], ["report", os.devnull], ["report", str(tmp_path)])
    for done, kind in zip(outputs, ("a named pipe (FIFO)", "a character device", "a directory")):
        assert done.returncode == 1 and f"is {kind}, not a file the report can read" in done.stderr, done.stderr
        assert done.stderr.count("\n") == 1


def test_score_summary_is_exact_over_several_pieces():
    """Quantiles equal np.quantile's, the mean is the planner's threshold, the histogram counts
    every finite score, for values of every sign and kind spread over several pieces."""
    rng = np.random.default_rng(5)
    n = 2 * BLOCK + 12_345  # three pieces
    scores = (rng.standard_normal(n) * rng.choice([1e-30, 1.0, 1e20], n)).astype(np.float32)
    scores[rng.random(n) < 0.3] = np.nan
    scores[:5] = [0.0, -0.0, np.inf, -np.inf, 7.0]
    scores[10:1000] = 7.0  # duplicates straddle a quantile
    cases = [
        scores,
        np.full(10, np.nan, np.float32),
        np.array([3.5], np.float32),
        np.full(7, 2.0, np.float32),
        rng.lognormal(size=999).astype(np.float32),
    ]
    for values in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the summary itself warns of nothing
            got = report.score_summary(values)
        seen = values[~np.isnan(values)].astype(np.float64)
        assert (
            got["samples"] == len(values) and got["seen"] == seen.size and got["never_seen"] == len(values) - seen.size
        )
        if not seen.size:
            assert "quantiles" not in got
            continue
        with np.errstate(invalid="ignore"):
            expected = np.quantile(seen, report.QUANTILES)
        np.testing.assert_array_equal(list(got["quantiles"].values()), expected)
        with np.errstate(invalid="ignore"):  # inf + -inf
            blocks = [seen_sum_count(values[b : b + BLOCK])[0] for b in range(0, len(values), BLOCK)]
        mean = float(np.sum(np.array(blocks))) / seen.size  # planner.plan_epoch's threshold
        assert got["mean"] == mean or np.isnan(mean) and np.isnan(got["mean"])
        assert got["below_mean"] == int(np.count_nonzero(seen < got["mean"]))
        finite = seen[np.isfinite(seen)]
        assert got["histogram"]["counts"] == np.histogram(finite, bins=got["histogram"]["edges"])[0].tolist()
        assert sum(got["histogram"]["counts"]) == finite.size


def test_files_of_older_versions_report_what_they_have(saved, tmp_path, capsys):
    stats, _, _, _, _ = saved
    old = [{k: s[k] for k in ("epoch", "threshold", "total", "seen", "well_learned", "kept")} for s in stats]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    assert main(["report", str(path), "--json", str(tmp_path / "sum.json")]) == 0
    out = capsys.readouterr().out
    rows = table(out)
    assert [int(r[4]) for r in rows] == [s["pruned"] for s in stats]  # derived from total - kept
    assert all(r[7] == "-" for r in rows) and len(rows[0]) == 8  # no trained, no I/O columns
    assert "trained: not recorded" in out
    summary = json.loads((tmp_path / "sum.json").read_text())
    assert summary["trained"] is None and summary["saved_kept"] == pytest.approx(
        1 - sum(s["kept"] for s in stats) / (EPOCHS * stats[0]["total"])
    )
    partial = [dict(s) for s in stats]
    partial[-1]["trained"] = 5  # a checkpoint taken mid-epoch
    path.write_text(json.dumps({"stats": partial}))
    assert main(["report", str(path)]) == 0
    assert "note: trained differs from kept" in capsys.readouterr().out


def test_every_command_help_shows_an_example():
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"index", "demo", "bench", "report"} <= set(commands)
    for name, sub in commands.items():
        assert f"example: infobatch-stream {name}" in sub.format_help(), name
    assert "example: infobatch-stream" in parser.format_help()
