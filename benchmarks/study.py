"""The study: does InfoBatch save samples without hurting the model, against full data and random pruning?

For each example (classification, MAE-style, diffusion-style; see ``examples/``) and seed it
trains these arms through the same pipeline, model initialisation and OneCycle schedule:

- ``full``: all samples every epoch;
- ``infobatch``: the library's pruning (the published rules: score = last loss);
- ``infobatch+ema``: the same with ``--ema-decay`` (score = moving average of the losses);
- ``random``: uniform random pruning at exactly the ``infobatch`` run's per-epoch sample counts;
- ``infobatch+norm`` (diffusion only): the score is the loss divided by the moving average of
  the loss at the sample's timestep (``--normalized-score``), so the timestep does not rank it;
- ``random@ema``, ``random@norm``: random pruning at the counts of those two arms.

It writes ``results.md`` (metric mean +- std over the seeds, samples trained, steps, training
wall time), ``results.json`` (every run's summary) and one PNG per example (kept fraction and
threshold per epoch, score histograms, training loss and test metric per epoch and per sample
trained) into ``--out``.

    python benchmarks/study.py                            # 3 examples x 5-7 arms x 5 seeds, ~40 min
    python benchmarks/study.py --quick --seeds 0 1 2      # short runs, a few minutes
    python benchmarks/study.py --examples classify --seeds 0

A run whose JSON in ``--out/runs`` was made with the same arguments (and, for a random arm, the
same matched counts) is reused; others are run again (``--force`` reruns everything).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import statistics
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

ARMS = ("full", "infobatch", "infobatch+ema", "random", "random@ema", "infobatch+norm", "random@norm")
COLORS = {
    "full": "black",
    "infobatch": "tab:blue",
    "infobatch+ema": "tab:green",
    "random": "tab:red",
    "random@ema": "tab:orange",
    "infobatch+norm": "tab:purple",
    "random@norm": "tab:pink",
}
MATCHED = {"random": "infobatch", "random@ema": "infobatch+ema", "random@norm": "infobatch+norm"}
NORMALIZES = {"diffusion"}  # examples with a noise level to divide out of the score


def arms_of(example: str) -> list[str]:
    return [a for a in ARMS if not a.endswith("norm") or example in NORMALIZES]


def run_args(arm: str, seed: int, data: str, runs: str, example: str, args: argparse.Namespace) -> list[str]:
    """The example's command-line arguments for one run."""
    argv = [
        "--out",
        data,
        "--seed",
        str(seed),
        "--workers",
        str(args.workers),
        "--json",
        os.path.join(runs, f"{example}-{arm}-{seed}.json"),
    ]
    if args.quick:
        argv.append("--quick")
    if args.epochs:
        argv += ["--epochs", str(args.epochs)]
    if arm == "infobatch+ema":
        argv += ["--arm", "infobatch", "--ema-decay", str(args.ema_decay)]
    elif arm == "infobatch+norm":
        argv += ["--arm", "infobatch", "--normalized-score"]
    elif arm in MATCHED:
        argv += ["--arm", "random", "--match", os.path.join(runs, f"{example}-{MATCHED[arm]}-{seed}.json")]
    else:
        argv += ["--arm", arm]
    return argv


def run_all(args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """Every (example, arm, seed) summary, running what is not there yet."""
    from tqdm import tqdm

    runs, data = os.path.join(args.out, "runs"), os.path.join(args.out, "data")
    os.makedirs(runs, exist_ok=True)
    todo = [(e, a, s) for e in args.examples for s in args.seeds for a in arms_of(e)]  # random after infobatch
    results: dict[str, dict[str, list[dict]]] = {e: {a: [] for a in arms_of(e)} for e in args.examples}
    for example, arm, seed in tqdm(todo, desc="study", unit="run"):
        path = os.path.join(runs, f"{example}-{arm}-{seed}.json")
        module, common = importlib.import_module(example), importlib.import_module("common")
        run = common.parse(module.EXAMPLE, module.__doc__, run_args(arm, seed, data, runs, example, args))
        if args.force or _stale(path, run):
            common.train(module.EXAMPLE, run)
        with open(path) as f:
            results[example][arm].append(json.load(f))
    return results


def _stale(path: str, run: argparse.Namespace) -> bool:
    """Whether the run at ``path`` is missing or was made with other arguments."""
    if not os.path.exists(path):
        return True
    with open(path) as f:
        done = json.load(f)["config"]
    wanted = {k: v for k, v in vars(run).items() if k != "json"}
    return {k: done.get(k) for k in wanted} != wanted


def _welch(a: list[float], b: list[float]) -> float | None:
    """Welch's t of mean(a) - mean(b); None with fewer than two values on a side."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
    diff = statistics.fmean(a) - statistics.fmean(b)
    return diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def table(results: dict[str, dict[str, list[dict]]]) -> str:
    lines = [
        "| example | arm | metric (mean +- std) | within 1 std of full | difference (Welch t) | samples trained "
        "| saved | steps | train time (s) |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for example, arms in results.items():
        full = [r["final"] for r in arms["full"]]
        full_mean, full_std = _mean_std(full)
        for arm, rs in arms.items():
            if not rs:
                continue
            mean, std = _mean_std([r["final"] for r in rs])
            metric, scale = rs[0]["metric"], 100.0 if rs[0]["metric"] == "accuracy" else 1.0
            unit = "%" if scale == 100.0 else ""
            verdict, difference = "", ""
            if arm != "full":
                verdict = "n/a" if len(full) < 2 else ("yes" if abs(mean - full_mean) <= full_std else "no")
                t = _welch([r["final"] for r in rs], full)
                difference = f"{(mean - full_mean) * scale:+.3g}{unit}" + (f" ({t:+.1f})" if t is not None else "")
            lines.append(
                f"| {example} | {arm} | {metric} {mean * scale:.4g}{unit} +- {std * scale:.2g}{unit} | {verdict} | "
                f"{difference} | "
                f"{statistics.fmean(r['samples'] for r in rs):,.0f} | "
                f"{100 * statistics.fmean(r['saved'] for r in rs):.1f}% | "
                f"{statistics.fmean(r['steps'] for r in rs):,.0f} | {statistics.fmean(r['seconds'] for r in rs):.1f} |"
            )
    return "\n".join(lines)


def _per_epoch(rs: list[dict], key: str) -> np.ndarray:
    return np.mean([[np.nan if e[key] is None else e[key] for e in r["epochs"]] for r in rs], axis=0)


def plot(example: str, arms: dict[str, list[dict]], path: str) -> None:
    """Six panels: what was pruned, the threshold, the scores, and how training went."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 8))
    total = arms["full"][0]["full_samples"] / len(arms["full"][0]["epochs"])
    metric = arms["full"][0]["metric"]
    for arm, rs in arms.items():
        if not rs:
            continue
        kw = {"color": COLORS[arm], "label": arm}
        epochs = np.arange(len(rs[0]["epochs"]))
        samples = _per_epoch(rs, "samples")
        ax[0, 0].plot(epochs, samples / total, **kw)
        if arm.startswith("infobatch"):
            ax[0, 1].plot(epochs, _per_epoch(rs, "threshold"), **kw)
            scores = np.concatenate([r["scores"]["sample"] for r in rs])
            ax[0, 2].hist(np.log10(scores[scores > 0]), bins=60, alpha=0.5, color=COLORS[arm], label=arm, density=True)
        raw = "train_loss_unweighted" if "train_loss_unweighted" in rs[0]["epochs"][0] else "train_loss"
        ax[1, 0].plot(epochs, _per_epoch(rs, raw), **kw)
        ax[1, 1].plot(epochs, _per_epoch(rs, metric), **kw)
        ax[1, 2].plot(np.cumsum(samples), _per_epoch(rs, metric), **kw)
    titles = [
        ["kept fraction per epoch", "threshold (mean seen score)", "final scores (all seeds)"],
        ["training loss (unweighted mean)", f"test {metric} per epoch", f"test {metric} per sample trained"],
    ]
    xlabels = [["epoch", "epoch", "log10 score"], ["epoch", "epoch", "samples trained"]]
    for i in range(2):
        for j in range(3):
            ax[i, j].set_title(titles[i][j])
            ax[i, j].set_xlabel(xlabels[i][j])
            ax[i, j].legend(fontsize=8)
    if metric != "accuracy":
        for a in (ax[1, 0], ax[1, 1], ax[1, 2]):
            a.set_yscale("log")
    else:
        for a in (ax[1, 1], ax[1, 2]):
            a.set_ylim(0.85, 1.0)
    fig.suptitle(f"{example}: mean over {len(arms['full'])} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="example: python benchmarks/study.py --quick --seeds 0 1 2 --out study_out",
    )
    parser.add_argument("--examples", nargs="+", default=["classify", "mae", "diffusion"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="the examples' short runs")
    parser.add_argument("--epochs", type=int, help="override the examples' epoch counts")
    parser.add_argument("--ema-decay", type=float, default=0.5, help="for the infobatch+ema arm")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per run")
    parser.add_argument("--out", default="study_out")
    parser.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = run_all(args)
    md = table(results)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(md + "\n")
    slim = {
        e: {a: [{k: v for k, v in r.items() if k not in ("scores", "stats")} for r in rs] for a, rs in arms.items()}
        for e, arms in results.items()
    }
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(slim, f)
    for example, arms in results.items():
        plot(example, arms, os.path.join(args.out, f"{example}.png"))
    print(md)


if __name__ == "__main__":
    main()
