"""Everything InfoBatch asks of torch.distributed (NCCL on GPUs, Gloo on CPUs).

Score exchange: each rank records the (slot, loss) updates of its own batches; at the epoch
boundary every rank receives all of them, in the same order, so every store ends identical and
every rank plans the same epoch. Slots travel as int64 and losses as float32, 12 bytes per
update in one buffer (packing indices into a loss tensor, as the official code does, corrupts
indices above 2048 in fp16). The variable-size all_gather runs in chunks and each chunk is
applied as it arrives, so memory stays bounded whatever the epoch's size.

Node sharing: the local ranks of a node attach to one shared-memory store and plan created by
the node's lowest rank, which alone writes them.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable

import numpy as np
import torch

from .shm import SharedArray

log = logging.getLogger(__name__)
CHUNK = 1 << 20  # at most this many updates per rank per all_gather round (12 MiB sent) ...
ROUND_BYTES = 64 << 20  # ... and at most this much received per round, whatever the world size
_ENTRY = 12  # bytes per update: int64 slot + float32 loss


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _pack(slots: np.ndarray, values: np.ndarray, length: int) -> torch.Tensor:
    buf = np.zeros(length * _ENTRY, dtype=np.uint8)
    n = len(slots)
    buf[:n * 8] = np.ascontiguousarray(slots, dtype=np.int64).view(np.uint8)
    buf[length * 8:length * 8 + n * 4] = np.ascontiguousarray(values, dtype=np.float32).view(np.uint8)
    return torch.from_numpy(buf)


def _unpack(buf: np.ndarray, length: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    return buf[:n * 8].view(np.int64), buf[length * 8:length * 8 + n * 4].view(np.float32)


def exchange_updates(slots: np.ndarray, values: np.ndarray, apply: Callable[[np.ndarray, np.ndarray], None],
                     chunk: int | None = None) -> int:
    """All ranks' updates, handed to ``apply(slots, values)`` chunk by chunk (a collective).

    Every rank sees the same sequence of calls: chunk 0 of rank 0, 1, ..., then chunk 1 of each
    rank, and so on; a rank's own updates keep their order. Returns the number of updates.
    """
    dist = torch.distributed
    _, size = world()
    if chunk is None:
        chunk = max(min(CHUNK, ROUND_BYTES // (_ENTRY * size)), 1)
    device = _device()
    count = torch.tensor([len(slots)], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    for start in range(0, max(sizes), chunk):
        length = min(chunk, max(sizes) - start)
        mine = slice(start, min(start + length, len(slots)))
        send = _pack(slots[mine], values[mine], length).to(device)
        got = [torch.empty_like(send) for _ in range(size)]
        dist.all_gather(got, send)
        for r in range(size):
            n = max(0, min(length, sizes[r] - start))
            if n:
                apply(*_unpack(got[r].cpu().numpy(), length, n))
    return sum(sizes)


def all_gather_updates(slots: np.ndarray, values: np.ndarray, chunk: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's updates, concatenated in the order :func:`exchange_updates` applies them."""
    parts: list[tuple[np.ndarray, np.ndarray]] = []
    exchange_updates(slots, values, lambda s, v: parts.append((s.copy(), v.copy())), chunk)
    if not parts:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate([s for s, _ in parts]), np.concatenate([v for _, v in parts])


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (a collective), so all ranks take the same branch."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


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


def share_per_node(create: Callable[[], list[SharedArray]]) -> tuple[list[SharedArray], bool]:
    """``create()`` once per node, attached by the node's other ranks (a collective).

    Returns the arrays and whether this rank owns (and alone writes) them. A rank that cannot
    see its leader's files (a container with its own ``/dev/shm``) creates its own copy.
    """
    rank, size = world()
    if size == 1:
        return create(), True
    node = _node_id()
    nodes: list[str] = [""] * size
    torch.distributed.all_gather_object(nodes, node)
    leader = nodes.index(node)
    mine = create() if rank == leader else None
    described: list = [None] * size
    torch.distributed.all_gather_object(described, _describe(mine) if mine is not None else None)
    if mine is not None:
        return mine, True
    attached = _attach(described[leader])
    if attached is None:
        log.warning("rank %d cannot see the shared store of rank %d on node %s (another /dev/shm?): "
                    "keeping its own copy", rank, leader, node)
        return create(), True
    log.info("rank %d shares rank %d's store and plan", rank, leader)
    return attached, False
