"""``infobatch-stream report``: what the pruning did over a run, read back from what it saved.

A run leaves its per-epoch figures in three kinds of file: ``ib.save(path)`` (our own format,
magic ``IBSTATE1``), a ``torch.save`` checkpoint holding ``ib.state_dict()`` (at the top level or
under a key, next to the model), or a JSON dump of ``ib.stats()``. The kind is told from the
file's first bytes, not its name, because checkpoints are named anything (``last.ckpt``,
``model.bin``). Nothing is ever unpickled: torch checkpoints are read with
``torch.load(weights_only=True)`` and only in torch's zip format.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from .checkpoint import MAGIC, load_state
from .errors import ReportError
from .infobatch import EpochStats

log = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
_EXPECTED = ("expected a file written by ib.save(), a torch.save() checkpoint holding ib.state_dict(), "
             "or a JSON list of ib.stats() (or an object with a \"stats\" list)")
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


@dataclass
class Run:
    """The figures of one run as read from a file: per-epoch stats, and the state's extras."""

    path: str
    source: str  # "ib.save", "torch.save" or "json"
    stats: list[dict[str, Any]]  # one dict per epoch with every EpochStats field (None where unknown)
    config: dict[str, Any] | None = None
    epoch: int | None = None
    scores: np.ndarray | None = None  # float32 per sample, NaN = never seen


def load_run(path: str) -> Run:
    """Read ``path`` as whichever of the three kinds its first bytes say it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    if head.startswith(MAGIC):
        try:
            state, source = load_state(path), "ib.save"
        except (KeyError, TypeError, AttributeError) as e:
            raise ReportError(f"{path} starts like an ib.save() file but its header is damaged ({e!r})") from None
    elif head.startswith(_ZIP_MAGIC):
        state, source = _find_state(_torch_load(path), path), "torch.save"
    elif head.lstrip()[:1] in (b"{", b"["):
        return _json_run(path)
    else:
        raise ReportError(f"{path} is not a file the report can read: {_EXPECTED}")
    if not isinstance(state.get("stats"), list) or state.get("format") != 1:
        raise ReportError(f"{path} holds no InfoBatch state with per-epoch stats: {_EXPECTED}")
    scores = state.get("scores")
    if scores is not None:
        scores = np.asarray(scores.numpy() if hasattr(scores, "numpy") else scores, dtype=np.float32)
    config = state.get("config") if isinstance(state.get("config"), dict) else None
    epoch = state.get("epoch")
    return Run(path, source, _normalise(state["stats"], path), config,
               int(epoch) if isinstance(epoch, int) else None, scores)


def _torch_load(path: str) -> Any:
    """``torch.load`` restricted to tensors and plain values; memory-mapped so that a large model
    in the same checkpoint costs no reading."""
    import pickle

    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError) as e:
        text = str(e)
        if "Weights only load failed" in text:  # torch's advice (weights_only=False) is not ours to give
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            reason = ("it holds objects other than tensors and plain values"
                      + (f" ({unsafe.group(1)})" if unsafe else "") + ", which the report never unpickles")
        else:
            reason = text.strip().split(". ")[0] if text.strip() else type(e).__name__
        raise ReportError(f"{path} could not be read with torch.load(weights_only=True): {reason}") from None


def _find_state(obj: Any, path: str) -> dict[str, Any]:
    """The first ``ib.state_dict()`` (a dict with ``format == 1`` and ``stats``) inside ``obj``,
    breadth first: checkpoints nest it under a key of the user's choosing."""
    queue, found = [obj], []
    while queue and len(found) < 2:
        item = queue.pop(0)
        if isinstance(item, dict):
            if item.get("format") == 1 and "stats" in item:
                found.append(item)
                continue
            queue.extend(item.values())
        elif isinstance(item, (list, tuple)):
            queue.extend(item)
    if not found:
        raise ReportError(f"{path} is a torch checkpoint but holds no ib.state_dict() "
                          "(a dict with \"format\": 1 and \"stats\")")
    if len(found) > 1:
        log.warning("%s holds several InfoBatch states (one per rank?); reporting the first", path)
    return found[0]


def _json_run(path: str) -> Run:
    """A JSON list of ``ib.stats()``, or an object whose ``stats`` is one (the examples add
    other keys next to it)."""
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"{path} is not valid JSON ({e}): {_EXPECTED}") from None
    stats = doc.get("stats") if isinstance(doc, dict) else doc
    if not isinstance(stats, list):
        raise ReportError(f"{path} holds no per-epoch stats: {_EXPECTED}")
    config = doc.get("config") if isinstance(doc, dict) and isinstance(doc.get("config"), dict) else None
    return Run(path, "json", _normalise(stats, path), config)


def _normalise(stats: list[Any], path: str) -> list[dict[str, Any]]:
    """Every EpochStats field in every epoch. Files from older versions lack some counters: those
    are None (shown as "-"), not 0, so that a file without ``trained`` does not read as "nothing
    trained". ``epoch``, ``total`` and one of ``kept``/``pruned`` are required: without them there
    is nothing to report."""
    out = []
    for i, entry in enumerate(stats):
        if not isinstance(entry, dict) or "epoch" not in entry or "total" not in entry or \
                ("kept" not in entry and "pruned" not in entry):
            raise ReportError(f"{path}: stats entry {i} is not an ib.stats() epoch (needs epoch, total, kept or "
                              f"pruned; got {str(entry)[:80]})")
        row = {f.name: entry.get(f.name) for f in fields(EpochStats)}
        for name, value in row.items():
            kinds = (int, float) if name == "threshold" else int
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise ReportError(f"{path}: stats entry {i} field {name!r} is {value!r}, expected a number")
        if row["kept"] is None:
            row["kept"] = row["total"] - row["pruned"]
        if row["pruned"] is None:
            row["pruned"] = row["total"] - row["kept"]
        out.append(row)
    return out


def summarize(run: Run) -> dict[str, Any]:
    """The run in a few numbers: what was trained against the full data, and how hard it pruned.

    ``trained`` counts the losses ``update()`` received on the process that saved the file, so
    with several ranks it is that rank's share; ``kept`` is the plan over all ranks. Both are
    given because they differ then, and in a checkpoint taken mid-epoch."""
    stats = run.stats
    full = sum(s["total"] for s in stats)
    recorded = all(s["trained"] is not None for s in stats)
    trained = sum(s["trained"] for s in stats) if recorded else None
    kept = sum(s["kept"] for s in stats)
    pruning = [s for s in stats if s["pruned"] > 0]
    out: dict[str, Any] = {
        "file": run.path, "source": run.source, "epochs": len(stats),
        "total": stats[-1]["total"] if stats else 0,
        "full_data": full, "trained": trained, "kept": kept,
        "saved_trained": (1 - trained / full if full else 0.0) if recorded else None,
        "saved_kept": 1 - kept / full if full else 0.0,
        "pruning_epochs": len(pruning),
        "mean_pruned_fraction": float(np.mean([s["pruned"] / s["total"] for s in pruning])) if pruning else 0.0,
        "bytes_read": sum(s["bytes_read"] or 0 for s in stats),
        "bytes_skipped": sum(s["bytes_skipped"] or 0 for s in stats),
        "final_threshold": next((s["threshold"] for s in reversed(stats) if s["threshold"] is not None), None),
    }
    if run.config is not None:
        out["config"] = run.config
    if run.scores is not None:
        out["scores"] = score_summary(run.scores)
    return out


def score_summary(scores: np.ndarray) -> dict[str, Any]:
    """How the scores are spread: InfoBatch's threshold is their mean, so a long tail of hard
    samples puts most of the data below it (well-learned, prunable)."""
    seen = scores[np.isfinite(scores)].astype(np.float64)  # float64: as the planner compares
    out: dict[str, Any] = {"samples": int(scores.size), "seen": int(seen.size)}
    if seen.size:
        values = np.quantile(seen, QUANTILES)
        mean = float(seen.mean())
        out.update(mean=mean, below_mean=int(np.count_nonzero(seen < mean)),
                   quantiles={f"q{round(q * 100)}": float(v) for q, v in zip(QUANTILES, values)})
    return out


def _num(value: Any, spec: str = ",") -> str:
    return "-" if value is None else format(value, spec)


def _size(nbytes: int) -> str:
    """Bytes in the unit that keeps three significant digits readable (kB to TB, powers of 1000)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def format_report(run: Run, summary: dict[str, Any]) -> str:
    """The per-epoch table and the summary, as printed by the command."""
    io = any((s["bytes_read"] or 0) or (s["bytes_skipped"] or 0) for s in run.stats)
    head = ["epoch", "threshold", "seen", "well-learned", "pruned", "kept", "kept %", "trained"]
    head += ["read", "skipped"] if io else []
    lines = [f"{run.path} ({run.source}" + (f", current epoch {run.epoch}" if run.epoch is not None else "") + ")"]
    if run.config:
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in run.config.items()))
    lines += ["| " + " | ".join(head) + " |", "| " + " | ".join(["---:"] * len(head)) + " |"]
    for s in run.stats:
        cells = [str(s["epoch"]), _num(s["threshold"], ".6g"), _num(s["seen"]), _num(s["well_learned"]),
                 _num(s["pruned"]), _num(s["kept"]), f"{100 * s['kept'] / s['total']:.1f}%" if s["total"] else "-",
                 _num(s["trained"])]
        if io:
            cells += [_size(s["bytes_read"] or 0), _size(s["bytes_skipped"] or 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if not run.stats:
        lines.append("(no epochs recorded in this file)")
    n = summary["epochs"]
    lines += [
        "",
        f"epochs: {n}; full data: {summary['full_data']:,} samples ({summary['total']:,} x {n})",
        (f"trained: {summary['trained']:,} samples ({100 * summary['saved_trained']:.1f}% saved)"
         if summary["trained"] is not None else "trained: not recorded in this file (written by an older version)"),
        f"kept by the plan: {summary['kept']:,} samples ({100 * summary['saved_kept']:.1f}% saved)",
        f"pruning epochs: {summary['pruning_epochs']} of {n}, "
        f"{100 * summary['mean_pruned_fraction']:.1f}% of the data pruned per pruning epoch on average",
    ]
    if summary["trained"] not in (None, summary["kept"]):
        lines.append("note: trained differs from kept: a partial epoch, several ranks (trained counts the saving "
                     "rank only), padding, or training that skipped update()")
    if io:
        lines.append(f"bytes read: {_size(summary['bytes_read'])}, skipped: {_size(summary['bytes_skipped'])} "
                     "(by ib.tarfile_to_samples() / ib.dataset())")
    scores = summary.get("scores")
    if scores is not None:
        line = f"scores: {scores['seen']:,} of {scores['samples']:,} samples seen"
        if scores["seen"]:
            q = scores["quantiles"]
            line += (f"; mean {scores['mean']:.6g} ({scores['below_mean']:,} below it); quantiles "
                     + ", ".join(f"{k} {v:.6g}" for k, v in q.items()))
        lines.append(line)
    return "\n".join(lines)


def plot_run(run: Run, summary: dict[str, Any], path: str) -> None:
    """Kept fraction and threshold per epoch, and the score histogram with the last threshold.

    Built on a bare ``Figure`` (Agg canvas): no pyplot, so no display and no global backend."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        raise ReportError("--plot needs matplotlib: pip install matplotlib") from None
    panels = 3 if summary.get("scores", {}).get("seen") else 2
    fig = Figure(figsize=(4.2 * panels, 3.4), layout="constrained")
    axes = fig.subplots(1, panels)
    epochs = [s["epoch"] for s in run.stats]
    axes[0].bar(epochs, [s["kept"] / s["total"] if s["total"] else 0.0 for s in run.stats], color="tab:blue")
    axes[0].set(title="kept fraction per epoch", xlabel="epoch", ylabel="kept / total", ylim=(0, 1.05))
    with_t = [(s["epoch"], s["threshold"]) for s in run.stats if s["threshold"] is not None]
    axes[1].plot([e for e, _ in with_t], [t for _, t in with_t], marker="o", color="tab:orange")
    axes[1].set(title="threshold per epoch (mean score)", xlabel="epoch", ylabel="threshold")
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if panels == 3:
        assert run.scores is not None
        seen = run.scores[np.isfinite(run.scores)]
        nbins = min(100, max(10, int(math.sqrt(seen.size))))
        if seen.size and seen.min() > 0 and seen.max() > seen.min():  # losses span decades: log bins
            axes[2].hist(seen, bins=np.geomspace(seen.min(), seen.max(), nbins + 1), color="tab:gray")
            axes[2].set_xscale("log")
        else:
            axes[2].hist(seen, bins=nbins, color="tab:gray")
        axes[2].set_yscale("log")  # a few well-learned bins would otherwise flatten the rest
        if summary["final_threshold"] is not None:
            axes[2].axvline(summary["final_threshold"], color="tab:red", label="last epoch's threshold")
        axes[2].axvline(summary["scores"]["mean"], color="tab:red", linestyle="--", label="mean now (next threshold)")
        axes[2].set(title=f"scores ({seen.size:,} seen)", xlabel="score", ylabel="samples")
        axes[2].legend(fontsize="small")
    done, saved = ((summary["trained"], summary["saved_trained"]) if summary["trained"] is not None
                   else (summary["kept"], summary["saved_kept"]))
    fig.suptitle(f"{os.path.basename(run.path)}: {done:,} of {summary['full_data']:,} samples "
                 f"{'trained' if summary['trained'] is not None else 'kept'} ({100 * saved:.1f}% saved)")
    try:
        fig.savefig(path, dpi=100)
    except OSError as e:
        raise ReportError(f"cannot write the plot {path}: {e.strerror or e}") from None


def main_report(path: str, plot: str | None = None, json_path: str | None = None) -> int:
    """The command: print the table and summary, optionally write the plot and the JSON summary."""
    run = load_run(path)
    summary = summarize(run)
    print(format_report(run, summary))
    if plot:
        plot_run(run, summary, plot)
        log.info("wrote %s", plot)
    if json_path:
        try:
            with open(json_path, "w") as f:
                json.dump(summary, f, indent=1)
        except OSError as e:
            raise ReportError(f"cannot write {json_path}: {e.strerror or e}") from None
    return 0
