"""Everything InfoBatch asks of torch.distributed (NCCL on GPUs, Gloo on CPUs).

Score exchange: each rank records the (slot, loss) updates of its own batches; at the epoch
boundary every rank receives all of them, in the same order, so every store ends identical and
every rank plans the same epoch. Slots travel as int64 and losses as float32, 12 bytes per
update in one buffer (packing indices into a loss tensor, as the official code does, corrupts
indices above 2048 in fp16). The variable-size all_gather runs in chunks and each chunk is
applied as it arrives, so memory stays bounded whatever the epoch's size.

Planning: each rank plans a slice of the slots and the ranks combine their figures with
all_reduce (and, across nodes, their plan bits with the same chunked gather), so planning costs
``N / W`` per rank.

Node sharing: the local ranks of a node attach to one shared-memory store and plan created by
the node's lowest rank, which alone applies the exchanged updates.

Agreement: ``InfoBatch()``, ``set_epoch`` and ``load_state_dict`` first gather one small dict
per rank (the call, the index fingerprint, the settings, the epoch) and compare them
(:func:`agree`). Any difference, or a rank that failed before that point, raises on every rank
before the collectives that would otherwise hang on the ranks that went on.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .errors import SettingsMismatchError
from .shm import SharedArray

log = logging.getLogger(__name__)
ROUND_BYTES = 32 << 20  # received per all_gather round, whatever the world size


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


OVERLAP_ROUNDS = True  # False: each round waits for the next before applying (the benchmark's baseline)
UPDATE = np.dtype([("slot", "<i8"), ("loss", "<f4")])  # 12 bytes, no padding


def all_gather_bytes(
    data: np.ndarray, apply: Callable[[int, int, np.ndarray], None], item: int = 1, round_bytes: int = ROUND_BYTES
) -> list[int]:
    """Every rank's ``data`` (uint8, any length), handed to ``apply(rank, offset, chunk)`` round
    by round (a collective). Chunks hold whole items of ``item`` bytes; at most ``round_bytes``
    arrive per round whatever the world size, so memory stays bounded (two rounds: the next one
    travels while ``apply`` takes this one). Every rank sees the same
    sequence of calls: round 0 of rank 0, 1, ..., then round 1 of each rank, and so on.
    Returns every rank's length in bytes."""
    dist = torch.distributed
    _, size = world()
    device = _device()
    length = torch.tensor([len(data)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length)
    sizes = [int(t.item()) for t in lengths]
    step = max(round_bytes // size // item, 1) * item

    def start(offset: int) -> tuple[Any, torch.Tensor, int, torch.Tensor]:
        """Round ``offset``'s gather, started and not waited for (``async_op``); its buffers are
        returned with it so that they live until it is waited for."""
        width = min(step, max(sizes) - offset)
        send = np.zeros(width, dtype=np.uint8)
        mine = data[offset : offset + width]
        send[: len(mine)] = mine
        got = torch.empty((size, width), dtype=torch.uint8, device=device)
        sent = torch.from_numpy(send).to(device)
        work = dist.all_gather(list(got.unbind(0)), sent, async_op=True)
        return work, got, width, sent

    # Round k + 1 travels while round k is applied: the apply, the largest cost at scale, overlaps
    # with the transfer (two rounds of buffers at most).
    offsets = list(range(0, max(sizes), step))
    running = start(offsets[0]) if offsets else None
    for i, offset in enumerate(offsets):
        assert running is not None
        work, got, width, _ = running
        work.wait()
        host = got.cpu().numpy()  # one device-to-host copy per round
        running = start(offsets[i + 1]) if i + 1 < len(offsets) else None
        if not OVERLAP_ROUNDS and running is not None:
            running[0].wait()
        for r in range(size):
            n = max(0, min(width, sizes[r] - offset))
            if n:
                apply(r, offset, host[r, :n])
    return sizes


def pack_updates(slots: np.ndarray, values: np.ndarray) -> np.ndarray:
    """(slot, loss) pairs as one array of 12-byte records, the form they travel in."""
    packed = np.empty(len(slots), dtype=UPDATE)
    packed["slot"], packed["loss"] = slots, values
    return packed


def exchange_updates(
    packed: np.ndarray, apply: Callable[[np.ndarray, np.ndarray], None], round_bytes: int = ROUND_BYTES
) -> int:
    """All ranks' updates (``packed`` by :func:`pack_updates`), handed to ``apply(slots, values)``
    in pieces (a collective). Every rank sees the same sequence of pieces and a rank's own
    updates keep their order. Returns the number of updates."""

    def unpack(rank: int, offset: int, chunk: np.ndarray) -> None:
        updates = chunk.view(UPDATE)
        apply(updates["slot"], updates["loss"])

    sizes = all_gather_bytes(
        np.ascontiguousarray(packed, dtype=UPDATE).view(np.uint8), unpack, UPDATE.itemsize, round_bytes
    )
    return sum(sizes) // UPDATE.itemsize


def all_gather_updates(
    slots: np.ndarray, values: np.ndarray, round_bytes: int = ROUND_BYTES
) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's updates, concatenated in the order :func:`exchange_updates` applies them."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    exchange_updates(pack_updates(slots, values), lambda s, v: parts.append((s.copy(), v.copy())), round_bytes)
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate([s for s, _ in parts]), np.concatenate([v for _, v in parts])


def all_reduce_sum(array: np.ndarray) -> np.ndarray:
    """Element-wise sum over ranks (a collective); the array itself without a process group."""
    if world()[1] == 1:
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array)).to(_device())
    torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor.cpu().numpy()


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (a collective), so all ranks take the same branch."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def gather_object(value: Any) -> list[Any]:
    """Every rank's ``value`` (small and picklable), by rank (a collective); ``[value]`` without
    a process group."""
    _, size = world()
    if size == 1:
        return [value]
    values: list = [None] * size
    torch.distributed.all_gather_object(values, value)
    return values


def ranks_phrase(ranks: list[int]) -> str:
    """``"rank 3"``, ``"ranks 0 and 2"``, ``"ranks 0-5, 7 and 9"``: runs of ranks shortened."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    items: list[str] = []
    for first, last in runs:
        if first == last:
            items.append(str(first))
        else:
            items += [str(first), str(last)] if last == first + 1 else [f"{first}-{last}"]
    listed = items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
    return ("rank " if len(ranks) == 1 else "ranks ") + listed


def differences(values: list[dict[str, Any]], shown: list[dict[str, str]] | None = None) -> list[tuple[str, str]]:
    """``(key, "KEY differs across ranks: ranks 0 and 2 have 0, rank 1 has 7")`` for each key
    whose value is not the same on every rank (``values``: one dict per rank, by rank).
    ``shown``: per rank, text that replaces some values' ``repr`` (e.g. a path with a fingerprint)."""
    out = []
    for key in dict.fromkeys(k for d in values for k in d):
        groups: list[tuple[Any, list[int]]] = []  # (value, the ranks holding it), by first rank
        for r, d in enumerate(values):
            v = d.get(key)
            for held, ranks in groups:
                if held == v:
                    ranks.append(r)
                    break
            else:
                groups.append((v, [r]))
        if len(groups) > 1:

            def text(v: Any, r: int, key: str = key) -> str:
                return shown[r][key] if shown and key in shown[r] else repr(v)

            holders = ", ".join(
                f"{ranks_phrase(rs)} {'has' if len(rs) == 1 else 'have'} {text(v, rs[0])}" for v, rs in groups
            )
            out.append((key, f"{key} differs across ranks: {holders}"))
    return out


def agree(
    values: dict[str, Any],
    hints: dict[str, str],
    shown: dict[str, str] | None = None,
    failure: BaseException | None = None,
    peer_error: type[Exception] = RuntimeError,
    extra: Any = None,
) -> list[Any]:
    """Check that every rank passes equal ``values`` (one collective: a gather of small dicts).

    Raises on every rank, so that none goes on into a collective the others never join:

    - when ``values["call"]`` differs (ranks in different collectives, matched by accident):
      :class:`SettingsMismatchError` naming each rank's call;
    - when some rank passes a ``failure`` (it failed before this point): that rank re-raises
      it, the others raise ``peer_error`` naming the rank and the error;
    - when any other value differs: :class:`SettingsMismatchError` naming each differing key
      and which ranks hold which value, then the ``hints`` of those keys (``"*"``: the default).

    ``shown`` prints some values otherwise than their ``repr`` (they are compared as given).
    Returns every rank's ``extra``, by rank."""
    if world()[1] == 1:
        if failure is not None:
            raise failure
        return [extra]
    problem = None if failure is None else f"{type(failure).__name__}: {failure}"
    gathered = gather_object((values, shown or {}, problem, extra))
    every_shown = [g[1] for g in gathered]
    calls = differences([{"call": g[0].get("call")} for g in gathered], every_shown)
    if calls:
        raise SettingsMismatchError(f"{calls[0][1]}; {hints.get('call', hints['*'])}")
    if failure is not None:
        raise failure
    failed = [r for r, g in enumerate(gathered) if g[2] is not None]
    if failed:
        raise peer_error(
            f"{ranks_phrase(failed)} failed in {values.get('call')} ({gathered[failed[0]][2]}); "
            "this rank stops too rather than wait for it in a collective"
        )
    differ = differences([g[0] for g in gathered], every_shown)
    if differ:
        said = dict.fromkeys(hints.get(key, hints["*"]) for key, _ in differ)
        raise SettingsMismatchError("; ".join([text for _, text in differ] + list(said)))
    return [g[3] for g in gathered]


def barrier() -> None:
    if world()[1] > 1:
        torch.distributed.barrier()


def _node_id() -> str:
    """Ranks with the same id may share ``/dev/shm`` (checked again by inode when attaching)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = ""
    return f"{socket.gethostname()}/{boot}"


def _describe(arrays: list[SharedArray]) -> list[tuple[str, int, str, int, int]]:
    out = []
    for a in arrays:
        st = os.stat(a.path)
        out.append((a.path, a.length, a.dtype.str, st.st_dev, st.st_ino))
    return out


def _attach(described: list[tuple[str, int, str, int, int]]) -> list[SharedArray] | None:
    """The leader's arrays, or None when they are not visible here (another ``/dev/shm``)."""
    arrays = []
    for path, length, dtype, dev, ino in described:
        try:
            st = os.stat(path)
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != (dev, ino):
            return None
        arrays.append(SharedArray(path, length, dtype))
    return arrays


def share_per_node(create: Callable[[], list[SharedArray]]) -> tuple[list[SharedArray], bool, bool]:
    """``create()`` once per node, attached by the node's other ranks (a collective).

    Returns the arrays, whether this rank owns (and alone writes) them, and whether every rank
    of the job shares them (one node). A rank that cannot see its leader's files (a container
    with its own ``/dev/shm``) creates its own copy.
    """
    rank, size = world()
    if size == 1:
        return create(), True, True
    arrays, owner = _share(create, rank, size)
    return arrays, owner, not any_rank(owner and rank != 0)


def _share(create: Callable[[], list[SharedArray]], rank: int, size: int) -> tuple[list[SharedArray], bool]:
    node = _node_id()
    nodes: list[str] = [""] * size
    torch.distributed.all_gather_object(nodes, node)
    leader = nodes.index(node)
    mine, failure = None, None
    if rank == leader:
        try:
            mine = create()
        except Exception as e:  # noqa: BLE001 - told to every rank below, then raised
            failure = e
    described: list = [None] * size
    torch.distributed.all_gather_object(
        described,
        _describe(mine) if mine is not None else (f"{type(failure).__name__}: {failure}" if failure else None),
    )
    if failure is not None:
        raise failure
    if isinstance(described[leader], str):
        raise RuntimeError(f"rank {leader} could not create the shared store for node {node}: {described[leader]}")
    if mine is not None:
        return mine, True
    attached = _attach(described[leader])
    if attached is None:
        log.warning(
            "rank %d cannot see the shared store of rank %d on node %s (another /dev/shm?): keeping its own copy",
            rank,
            leader,
            node,
        )
        return create(), True
    log.info("rank %d shares rank %d's store and plan", rank, leader)
    return attached, False
