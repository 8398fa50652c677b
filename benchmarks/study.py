"""The study at convergence: does InfoBatch save samples and time without hurting the model?

For each example (classification, MAE-style, diffusion-style; see ``examples/``) it first picks
the epoch budget with a **pilot**: full-data runs over a ladder of budgets (3 seeds each), taking
the smallest budget at which the test metric improves by less than one seed-std (of the final
metric) over the last 20% of its epochs, i.e. where the full-data curve has flattened. Then, at
that budget and for each seed, it trains these arms through the same pipeline, model
initialisation and OneCycle schedule, interleaved (seed by seed) so that load on the machine hits
every arm alike:

- ``full``: all samples every epoch;
- ``infobatch``: the library's pruning at the paper's setting (``r=0.5``, ``delta=0.875``;
  score = last loss);
- ``random``: uniform random pruning at exactly the ``infobatch`` run's per-epoch sample counts;
- ``infobatch+ema`` / ``random@ema`` (``--ema-examples``, default classification, where it
  helped): the score is a moving average of the losses (``--ema-decay``), and random pruning at
  that arm's counts;
- ``infobatch+norm`` / ``random@norm`` (``--norm``, diffusion only): the loss divided by the
  moving average of the loss at the sample's timestep.

It writes ``pilot.md``, ``results.md`` (metric mean +- std over the seeds, Welch t against full
data, samples saved, training and end-to-end wall time saved), ``results.json`` (every run's
summary) and one PNG per example into ``--out``.

    python benchmarks/study.py --out benchmarks/study       # pilot, then 5 seeds of every arm
    python benchmarks/study.py --examples classify --epochs 10 --seeds 0 1   # no pilot: a fixed budget

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

ARMS = ("full", "infobatch", "random", "infobatch+ema", "random@ema", "infobatch+norm", "random@norm")
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
# The pilot's budget ladders (epochs), smallest first; the digits are 1,347 training images.
LADDERS = {"classify": [30, 60, 120], "mae": [60, 120, 240], "diffusion": [60, 120, 240]}
PILOT_SEEDS = (0, 1, 2)
TAIL = 0.2  # the last fifth of the epochs


def arms_of(example: str, ema_examples: tuple[str, ...] = ("classify",), norm: bool = False) -> list[str]:
    """The arms compared for ``example``: full, infobatch and random, plus the score variants."""
    arms = ["full", "infobatch", "random"]
    if example in ema_examples:
        arms += ["infobatch+ema", "random@ema"]
    if norm and example in NORMALIZES:
        arms += ["infobatch+norm", "random@norm"]
    return arms


def run_args(
    arm: str, seed: int, epochs: int, data: str, runs: str, example: str, args: argparse.Namespace
) -> list[str]:
    """The example's command-line arguments for one run."""
    json_path = os.path.join(runs, f"{example}-{epochs}ep-{arm}-{seed}.json")
    argv = ["--out", data, "--seed", str(seed), "--workers", str(args.workers), "--json", json_path]
    argv += ["--epochs", str(epochs), "--prune-ratio", str(args.prune_ratio), "--delta", str(args.delta)]
    if arm == "infobatch+ema":
        argv += ["--arm", "infobatch", "--ema-decay", str(args.ema_decay)]
    elif arm == "infobatch+norm":
        argv += ["--arm", "infobatch", "--normalized-score"]
    elif arm in MATCHED:
        matched = os.path.join(runs, f"{example}-{epochs}ep-{MATCHED[arm]}-{seed}.json")
        argv += ["--arm", "random", "--match", matched]
    else:
        argv += ["--arm", arm]
    return argv


def run_one(example: str, arm: str, seed: int, epochs: int, args: argparse.Namespace) -> dict:
    """One run's summary, training it unless a run with the same arguments is on disk."""
    runs, data = os.path.join(args.out, "runs"), os.path.join(args.out, "data")
    os.makedirs(runs, exist_ok=True)
    module, common = importlib.import_module(example), importlib.import_module("common")
    run = common.parse(module.EXAMPLE, module.__doc__, run_args(arm, seed, epochs, data, runs, example, args))
    if args.force or _stale(run.json, run):
        common.train(module.EXAMPLE, run)
    with open(run.json) as f:
        return json.load(f)


def run_all(args: argparse.Namespace, budgets: dict[str, int]) -> dict[str, dict[str, list[dict]]]:
    """Every (example, arm, seed) summary at its budget, arms interleaved seed by seed."""
    from tqdm import tqdm

    arms = {e: arms_of(e, tuple(args.ema_examples), args.norm) for e in args.examples}
    todo = [(e, a, s) for e in args.examples for s in args.seeds for a in arms[e]]  # random after infobatch
    results: dict[str, dict[str, list[dict]]] = {e: {a: [] for a in arms[e]} for e in args.examples}
    for example, arm, seed in tqdm(todo, desc="study", unit="run"):
        results[example][arm].append(run_one(example, arm, seed, budgets[example], args))
    return results


def tail_gain(summary: dict) -> float:
    """How much the test metric improved over the run's last 20% of epochs (positive: better)."""
    curve = [e[summary["metric"]] for e in summary["epochs"]]
    start = curve[max(0, math.ceil(len(curve) * (1 - TAIL)) - 1)]
    gain = curve[-1] - start
    return gain if summary["higher_is_better"] else -gain


def pilot(args: argparse.Namespace) -> tuple[dict[str, int], list[dict]]:
    """Each example's budget: the smallest on its ladder whose full-data runs gain less than one
    seed-std over their last 20% of epochs (the ladder's last budget if none does)."""
    budgets, rows = {}, []
    for example in args.examples:
        for epochs in LADDERS[example]:
            runs = [run_one(example, "full", s, epochs, args) for s in args.pilot_seeds]
            finals = [r["final"] for r in runs]
            gain, std = statistics.fmean(tail_gain(r) for r in runs), statistics.stdev(finals)
            flat = gain < std
            rows.append(
                {
                    "example": example,
                    "epochs": epochs,
                    "final": statistics.fmean(finals),
                    "std": std,
                    "tail_gain": gain,
                    "flat": flat,
                    "metric": runs[0]["metric"],
                }
            )
            budgets[example] = epochs
            if flat:
                break
    return budgets, rows


def pilot_table(rows: list[dict]) -> str:
    lines = [
        f"| example | epochs | full-data metric (mean +- std, {len(PILOT_SEEDS)} seeds) "
        "| gain over the last 20% of epochs | flat (gain < std) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['example']} | {r['epochs']} | {r['metric']} {r['final']:.4g} +- {r['std']:.2g} | "
            f"{r['tail_gain']:+.2g} | {'yes' if r['flat'] else 'no'} |"
        )
    return "\n".join(lines)


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
        "| samples saved | train time (s, median) | end to end (s, median) | wall-clock saved |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for example, arms in results.items():
        full = [r["final"] for r in arms["full"]]
        full_mean, full_std = _mean_std(full)
        full_wall = statistics.median(_wall(r) for r in arms["full"])
        for arm, rs in arms.items():
            if not rs:
                continue
            mean, std = _mean_std([r["final"] for r in rs])
            metric, scale = rs[0]["metric"], 100.0 if rs[0]["metric"] == "accuracy" else 1.0
            unit = "%" if scale == 100.0 else ""
            verdict, difference, wall_saved = "", "", ""
            wall = statistics.median(_wall(r) for r in rs)  # median: the process's first run pays its warm-up
            if arm != "full":
                verdict = "n/a" if len(full) < 2 else ("yes" if abs(mean - full_mean) <= full_std else "no")
                t = _welch([r["final"] for r in rs], full)
                difference = f"{(mean - full_mean) * scale:+.3g}{unit}" + (f" ({t:+.1f})" if t is not None else "")
                wall_saved = f"{100 * (1 - wall / full_wall):.1f}%"
            label = f"{example} ({len(rs[0]['epochs'])} ep.)" if arm == "full" else example
            lines.append(
                f"| {label} | {arm} | {metric} {mean * scale:.4g}{unit} +- {std * scale:.2g}{unit} | {verdict} | "
                f"{difference} | "
                f"{statistics.fmean(r['samples'] for r in rs):,.0f} | "
                f"{100 * statistics.fmean(r['saved'] for r in rs):.1f}% | "
                f"{statistics.median(r['seconds'] for r in rs):.1f} | {wall:.1f} | {wall_saved} |"
            )
    return "\n".join(lines)


def _wall(summary: dict) -> float:
    """End-to-end seconds of a run (older summaries only have the training loop's)."""
    return summary.get("wall_seconds", summary["seconds"])


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
        epilog="example: python benchmarks/study.py --examples classify --epochs 10 --seeds 0 1 --out study_out",
    )
    parser.add_argument("--examples", nargs="+", default=["classify", "mae", "diffusion"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--pilot-seeds", type=int, nargs="+", default=list(PILOT_SEEDS))
    parser.add_argument("--epochs", type=int, help="one budget for every example instead of the pilot's")
    parser.add_argument("--prune-ratio", type=float, default=0.5, help="the infobatch arms' r (the paper's 0.5)")
    parser.add_argument("--delta", type=float, default=0.875, help="the fraction of epochs that prune")
    parser.add_argument("--ema-decay", type=float, default=0.5, help="for the infobatch+ema arm")
    parser.add_argument("--ema-examples", nargs="*", default=["classify"], help="examples with the +ema arms")
    parser.add_argument("--norm", action="store_true", help="add the diffusion +norm arms")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per run")
    parser.add_argument("--out", default="study_out")
    parser.add_argument("--force", action="store_true", help="rerun runs whose JSON exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    os.makedirs(args.out, exist_ok=True)
    if args.epochs:
        budgets = dict.fromkeys(args.examples, args.epochs)
    else:
        budgets, rows = pilot(args)
        with open(os.path.join(args.out, "pilot.md"), "w") as f:
            f.write(pilot_table(rows) + "\n")
        with open(os.path.join(args.out, "pilot.json"), "w") as f:
            json.dump({"budgets": budgets, "ladder": rows}, f, indent=1)
        print(pilot_table(rows))
    results = run_all(args, budgets)
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
