"""``infobatch-stream report``: what the pruning did over a run, read back from what it saved.

A run leaves its per-epoch figures in three kinds of file: ``ib.save(path)`` (our own format,
magic ``IBSTATE2``, or ``IBSTATE1`` from before checksums), a ``torch.save`` checkpoint holding
``ib.state_dict()`` (at the top level or under a key, next to the model), or a JSON dump of
``ib.stats()``. The kind is told from the file's first bytes, not its name, because checkpoints
are named anything (``last.ckpt``, ``model.bin``). Nothing is ever unpickled: torch checkpoints
are read with ``torch.load(weights_only=True)`` and only in torch's zip format. Whatever the file
holds, a bad one ends in a one-line :class:`ReportError` or :class:`CheckpointError` naming it;
the scores are summarised in bounded pieces, so a 100M-sample state costs tens of MB, not
gigabytes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections import deque
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from . import policy
from .checkpoint import MAGICS, check_config, check_int, file_kind, iter_chunks, load_state, state_array
from .errors import ReportError
from .stats import EpochStats

log = logging.getLogger(__name__)

_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format since torch 1.6
_EXPECTED = (
    "expected a file written by ib.save(), a torch.save() checkpoint holding ib.state_dict(), "
    'or a JSON list of ib.stats() (or an object with a "stats" list)'
)
QUANTILES = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)
CHUNK = policy.PLAN_BLOCK  # scores per piece (4 MB): a planning block, so the mean adds up as the planner's does
MAX_JSON = 64 << 20  # a stats file holds a few hundred bytes per epoch
_LIMIT = 1 << 63  # counts beyond int64 are not counts (and would overflow float formatting)


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
    size = _regular_size(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    if head.startswith(MAGICS):
        return _state_run(load_state(path), path, "ib.save")
    if head.startswith(_ZIP_MAGIC):
        return _state_run(_find_state(_torch_load(path), path), path, "torch.save")
    if head.lstrip()[:1] in (b"{", b"["):
        return _json_run(path, size)
    raise ReportError(f"{path} is not a file the report can read: {_EXPECTED}")


def _regular_size(path: str) -> int:
    """The size of ``path``, refused before opening unless it is a regular file: a FIFO would
    block the report forever, a device would be read without end."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    kind = file_kind(st.st_mode)
    if kind is not None:
        raise ReportError(f"{path} is {kind}, not a file the report can read: {_EXPECTED}")
    return st.st_size


def _state_run(state: dict[str, Any], path: str, source: str) -> Run:
    """The run in a saved state, each field it uses checked (type, dtype, length) first."""
    if not isinstance(state, dict) or not _is_one(state.get("format")) or not isinstance(state.get("stats"), list):
        raise ReportError(f"{path} holds no InfoBatch state with per-epoch stats: {_EXPECTED}")
    where = f"{path}: "
    n = state.get("num_samples")
    scores = state_array(state, "scores", np.float32, n if _is_count(n) else None, where) if "scores" in state else None
    config = check_config(state["config"], where) if "config" in state else None
    epoch = check_int(state, "epoch", where) if "epoch" in state else None
    return Run(path, source, _normalise(state["stats"], path), config, epoch, scores)


def _is_one(value: Any) -> bool:
    return type(value) is int and value == 1  # not True, not a tensor


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _LIMIT


def _torch_load(path: str) -> Any:
    """``torch.load`` restricted to tensors and plain values; memory-mapped so that a large model
    in the same checkpoint costs no reading."""
    import torch

    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # a malformed zip or pickle fails in torch's loader with any kind of error
        text = str(e)
        if "Weights only load failed" in text:  # torch's advice (weights_only=False) is not ours to give
            unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", text)
            reason = (
                "it holds objects other than tensors and plain values"
                + (f" ({unsafe.group(1)})" if unsafe else "")
                + ", which the report never unpickles"
            )
        else:
            lines = text.strip().splitlines()
            reason = lines[0].split(". ")[0][:200] if lines else type(e).__name__
        raise ReportError(f"{path} could not be read with torch.load(weights_only=True): {reason}") from None


def _find_state(obj: Any, path: str) -> dict[str, Any]:
    """The first ``ib.state_dict()`` (a dict with ``format == 1`` and ``stats``) inside ``obj``,
    breadth first: checkpoints nest it under a key of the user's choosing. Each container is
    visited once (a crafted pickle can make a list that holds itself)."""
    queue, visited = deque([obj]), set()
    found: list[dict[str, Any]] = []
    while queue and len(found) < 2:
        item = queue.popleft()
        if id(item) in visited:
            continue
        visited.add(id(item))
        if isinstance(item, dict):
            if _is_one(item.get("format")) and "stats" in item:
                found.append(item)
                continue
            queue.extend(item.values())
        elif isinstance(item, (list, tuple)):
            queue.extend(item)
    if not found:
        raise ReportError(
            f'{path} is a torch checkpoint but holds no ib.state_dict() (a dict with "format": 1 and "stats")'
        )
    if len(found) > 1:
        log.warning("%s holds several InfoBatch states (one per rank?); reporting the first", path)
    return found[0]


def _json_run(path: str, size: int) -> Run:
    """A JSON list of ``ib.stats()``, or an object whose ``stats`` is one (the examples add
    other keys next to it)."""
    if size > MAX_JSON:
        raise ReportError(
            f"{path} is {size:,} bytes, too large for a JSON of ib.stats() (at most {MAX_JSON:,}): {_EXPECTED}"
        )
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError, deep nesting, huge ints
        raise ReportError(f"{path} is not valid JSON ({str(e)[:120]}): {_EXPECTED}") from None
    except OSError as e:
        raise ReportError(f"cannot read {path}: {e.strerror or e}") from None
    stats = doc.get("stats") if isinstance(doc, dict) else doc
    if not isinstance(stats, list):
        raise ReportError(f"{path} holds no per-epoch stats: {_EXPECTED}")
    config = doc.get("config") if isinstance(doc, dict) and isinstance(doc.get("config"), dict) else None
    return Run(path, "json", _normalise(stats, path), config)


def _normalise(stats: list[Any], path: str) -> list[dict[str, Any]]:
    """Every EpochStats field in every epoch. Files from older versions lack some counters: those
    are None (shown as "-"), not 0, so that a file without ``trained`` does not read as "nothing
    trained". ``epoch``, ``total`` and one of ``kept``/``pruned`` are required: without them there
    is nothing to report. Counts are integers in [0, 2**63) and ``kept + pruned == total``."""
    out = []
    for i, entry in enumerate(stats):
        if (
            not isinstance(entry, dict)
            or "epoch" not in entry
            or "total" not in entry
            or ("kept" not in entry and "pruned" not in entry)
        ):
            raise ReportError(
                f"{path}: stats entry {i} is not an ib.stats() epoch (needs epoch, total, kept or "
                f"pruned; got {str(entry)[:80]})"
            )
        row: dict[str, Any] = {f.name: entry.get(f.name) for f in fields(EpochStats)}
        for name, value in row.items():
            ok = (
                isinstance(value, (int, float)) and not isinstance(value, bool)
                if name == "threshold"
                else _is_count(value)
            )
            if value is not None and not ok:
                raise ReportError(
                    f"{path}: stats entry {i} field {name!r} is {str(value)[:40]}, expected "
                    + ("a number" if name == "threshold" else "an integer >= 0")
                )
        if row["kept"] is None:
            row["kept"] = row["total"] - row["pruned"]
        if row["pruned"] is None:
            row["pruned"] = row["total"] - row["kept"]
        if not 0 <= row["kept"] <= row["total"] or row["kept"] + row["pruned"] != row["total"]:
            raise ReportError(
                f"{path}: stats entry {i} has kept {row['kept']} and pruned {row['pruned']} of "
                f"{row['total']} samples, which do not add up"
            )
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
        "file": run.path,
        "source": run.source,
        "epochs": len(stats),
        "total": stats[-1]["total"] if stats else 0,
        "full_data": full,
        "trained": trained,
        "kept": kept,
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
    samples puts most of the data below it (well-learned, prunable).

    Two passes over the scores in pieces of ``CHUNK`` values, so memory stays bounded for any
    store. NaN means never seen. The mean is the next epoch's threshold, to the bit (per-block
    float64 sums, as the planner adds them); the quantiles are exact, as ``np.quantile`` gives
    them (a radix select over the float32 bits finds the values it interpolates between); the
    histogram has up to 100 bins over the finite scores, log-spaced when they are all > 0."""
    first = _first_pass(scores)
    seen = int(first["coarse"].sum())
    out: dict[str, Any] = {"samples": int(len(scores)), "seen": seen, "never_seen": int(len(scores)) - seen}
    if not seen:
        return out
    with np.errstate(invalid="ignore"):
        mean = float(np.sum(first["sums"])) / seen
    ranks = _quantile_ranks(seen)
    targets = {_coarse_bin(first["coarse"], k)[0] for k in ranks}
    edges, log_bins = _hist_edges(first["finite"], first["lo"], first["hi"])
    below, fine, counts = _second_pass(scores, mean, targets, edges)
    value = {k: _ranked_value(first["coarse"], fine, k) for k in ranks}
    out.update(
        mean=mean,
        below_mean=below,
        quantiles={f"q{round(q * 100)}": _interpolate(value, seen, q) for q in QUANTILES},
        histogram={"edges": edges.tolist(), "counts": counts.tolist(), "log": log_bins},
    )
    return out


_HALF = 1 << 16  # the radix select splits the 32 bits of a float32 into two halves


def _order_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys that sort as the float32 ``values`` do: positives get the sign bit set,
    negatives have all bits flipped."""
    bits = values.view(np.uint32)
    keys = (values.view(np.int32) >> 31).view(np.uint32)  # all ones for negatives (arithmetic shift)
    keys |= np.uint32(1 << 31)
    keys ^= bits
    return keys


def _key_value(key: int) -> float:
    bits = key & 0x7FFFFFFF if key >> 31 else ~key & 0xFFFFFFFF
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])


def _seen(chunk: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(chunk[~np.isnan(chunk)])


def _first_pass(scores: np.ndarray) -> dict[str, Any]:
    """Per-block sums as the planner takes them, a histogram of the keys' high halves, and the
    range of the finite scores."""
    sums, coarse = [], np.zeros(_HALF, dtype=np.int64)
    lo, hi, finite = math.inf, -math.inf, 0
    for chunk in iter_chunks(scores, CHUNK):
        with np.errstate(invalid="ignore"):  # inf + -inf: the mean is NaN, as the threshold would be
            sums.append(policy.seen_sum_count(chunk)[0])
        values = _seen(chunk)
        coarse += np.bincount(_order_keys(values) >> 16, minlength=_HALF)
        values = values[np.isfinite(values)]
        if values.size:
            lo, hi, finite = min(lo, float(values.min())), max(hi, float(values.max())), finite + values.size
    return {"sums": np.array(sums, dtype=np.float64), "coarse": coarse, "lo": lo, "hi": hi, "finite": finite}


def _quantile_ranks(n: int) -> list[int]:
    """The order statistics (0-based) that ``np.quantile``'s linear method interpolates between."""
    ranks: set[int] = set()
    for q in QUANTILES:
        k = int(math.floor((n - 1) * q))
        ranks.update((k, min(k + 1, n - 1)))
    return sorted(ranks)


def _coarse_bin(coarse: np.ndarray, k: int) -> tuple[int, int]:
    """The high half holding the ``k``-th smallest key, and ``k``'s rank inside that bin."""
    cum = np.cumsum(coarse)
    b = int(np.searchsorted(cum, k, side="right"))
    return b, k - (int(cum[b - 1]) if b else 0)


def _hist_edges(finite: int, lo: float, hi: float) -> tuple[np.ndarray, bool]:
    """Bin edges over the finite scores: losses span decades, so log-spaced when all are > 0."""
    if not finite:
        return np.zeros(0), False
    bins = min(100, max(10, math.isqrt(finite)))
    if lo > 0 and hi > lo:
        return np.geomspace(lo, hi, bins + 1), True
    return (np.linspace(lo, hi, bins + 1) if hi > lo else np.linspace(lo - 0.5, hi + 0.5, bins + 1)), False


def _second_pass(
    scores: np.ndarray, mean: float, targets: set[int], edges: np.ndarray
) -> tuple[int, dict[int, np.ndarray], np.ndarray]:
    """Scores below the mean (compared in float64, as the planner does), histograms of the low
    halves inside the high-half bins that hold a wanted rank, and the score histogram."""
    below, counts = 0, np.zeros(max(len(edges) - 1, 0), dtype=np.int64)
    fine = {b: np.zeros(_HALF, dtype=np.int64) for b in targets}
    for chunk in iter_chunks(scores, CHUNK):
        values = _seen(chunk)
        below += int(np.count_nonzero(values < np.float64(mean)))
        keys = _order_keys(values)
        high = keys >> 16
        for b, hist in fine.items():
            hist += np.bincount(keys[high == b] & 0xFFFF, minlength=_HALF)
        if len(edges):
            counts += np.histogram(values[np.isfinite(values)], bins=edges)[0]
    return below, fine, counts


def _ranked_value(coarse: np.ndarray, fine: dict[int, np.ndarray], k: int) -> float:
    """The ``k``-th smallest seen score, from the two halves' histograms."""
    b, r = _coarse_bin(coarse, k)
    low = int(np.searchsorted(np.cumsum(fine[b]), r, side="right"))
    return _key_value((b << 16) | low)


def _interpolate(value: dict[int, float], n: int, q: float) -> float:
    """``np.quantile``'s linear method, in its arithmetic (float64, from the upper neighbour
    when the weight is >= 0.5), on the order statistics in ``value``."""
    h = (n - 1) * q
    k = int(math.floor(h))
    a, b, t = np.float64(value[k]), np.float64(value[min(k + 1, n - 1)]), np.float64(h - k)
    with np.errstate(invalid="ignore"):  # inf - inf: np.quantile gives NaN as well
        return float(b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t)


def _finite(value: Any) -> bool:
    return value is not None and math.isfinite(value)


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
        cells = [
            str(s["epoch"]),
            _num(s["threshold"], ".6g"),
            _num(s["seen"]),
            _num(s["well_learned"]),
            _num(s["pruned"]),
            _num(s["kept"]),
            f"{100 * s['kept'] / s['total']:.1f}%" if s["total"] else "-",
            _num(s["trained"]),
        ]
        if io:
            cells += [_size(s["bytes_read"] or 0), _size(s["bytes_skipped"] or 0)]
        lines.append("| " + " | ".join(cells) + " |")
    if not run.stats:
        lines.append("(no epochs recorded in this file)")
    n = summary["epochs"]
    lines += [
        "",
        f"epochs: {n}; full data: {summary['full_data']:,} samples ({summary['total']:,} x {n})",
        (
            f"trained: {summary['trained']:,} samples ({100 * summary['saved_trained']:.1f}% saved)"
            if summary["trained"] is not None
            else "trained: not recorded in this file (written by an older version)"
        ),
        f"kept by the plan: {summary['kept']:,} samples ({100 * summary['saved_kept']:.1f}% saved)",
        f"pruning epochs: {summary['pruning_epochs']} of {n}, "
        f"{100 * summary['mean_pruned_fraction']:.1f}% of the data pruned per pruning epoch on average",
    ]
    if summary["trained"] not in (None, summary["kept"]):
        lines.append(
            "note: trained differs from kept: a partial epoch, several ranks (trained counts the saving "
            "rank only), padding, or training that skipped update()"
        )
    if io:
        lines.append(
            f"bytes read: {_size(summary['bytes_read'])}, skipped: {_size(summary['bytes_skipped'])} "
            "(by ib.tarfile_to_samples() / ib.dataset())"
        )
    scores = summary.get("scores")
    if scores is not None:
        line = f"scores: {scores['seen']:,} of {scores['samples']:,} samples seen"
        if scores["seen"]:
            q = scores["quantiles"]
            line += f"; mean {scores['mean']:.6g} ({scores['below_mean']:,} below it); quantiles " + ", ".join(
                f"{k} {v:.6g}" for k, v in q.items()
            )
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
    hist = summary.get("scores", {}).get("histogram")
    panels = 3 if hist and sum(hist["counts"]) else 2
    fig = Figure(figsize=(4.2 * panels, 3.4), layout="constrained")
    axes = fig.subplots(1, panels)
    epochs = [s["epoch"] for s in run.stats]
    axes[0].bar(epochs, [s["kept"] / s["total"] if s["total"] else 0.0 for s in run.stats], color="tab:blue")
    axes[0].set(title="kept fraction per epoch", xlabel="epoch", ylabel="kept / total", ylim=(0, 1.05))
    with_t = [(s["epoch"], s["threshold"]) for s in run.stats if _finite(s["threshold"])]
    axes[1].plot([e for e, _ in with_t], [t for _, t in with_t], marker="o", color="tab:orange")
    axes[1].set(title="threshold per epoch (mean score)", xlabel="epoch", ylabel="threshold")
    for ax in axes[:2]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if panels == 3:  # the histogram the summary streamed: the scores themselves are never loaded whole
        edges = np.asarray(hist["edges"])
        axes[2].hist(edges[:-1], bins=edges, weights=hist["counts"], color="tab:gray")
        if hist["log"]:  # losses span decades: log bins
            axes[2].set_xscale("log")
        axes[2].set_yscale("log")  # a few well-learned bins would otherwise flatten the rest
        if _finite(summary["final_threshold"]):
            axes[2].axvline(summary["final_threshold"], color="tab:red", label="last epoch's threshold")
        mean = summary["scores"]["mean"]
        if _finite(mean):
            axes[2].axvline(mean, color="tab:red", linestyle="--", label="mean now (next threshold)")
        axes[2].set(title=f"scores ({summary['scores']['seen']:,} seen)", xlabel="score", ylabel="samples")
        axes[2].legend(fontsize="small")
    done, saved = (
        (summary["trained"], summary["saved_trained"])
        if summary["trained"] is not None
        else (summary["kept"], summary["saved_kept"])
    )
    fig.suptitle(
        f"{os.path.basename(run.path)}: {done:,} of {summary['full_data']:,} samples "
        f"{'trained' if summary['trained'] is not None else 'kept'} ({100 * saved:.1f}% saved)"
    )
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
