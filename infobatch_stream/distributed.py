"""Score exchange between ranks over torch.distributed (NCCL on GPUs, Gloo on CPUs).

Each rank records the (slot, loss) updates of its own batches; at the epoch boundary every rank
receives all of them, in rank order, so every store ends identical and every rank plans the same
epoch. Slots travel as int64 and losses as float32 (packing indices into a loss tensor, as the
official code does, corrupts indices above 2048 in fp16). A variable-size all_gather is done in
chunks so memory stays bounded whatever the epoch's size.
"""

from __future__ import annotations

import numpy as np
import torch

CHUNK = 1 << 20  # entries per rank per all_gather round: 12 MB per rank in flight


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _device() -> torch.device:
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_updates(slots: np.ndarray, values: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Every rank's updates, concatenated in rank order (a collective: all ranks must call it)."""
    dist = torch.distributed
    _, size = world()
    device = _device()
    count = torch.tensor([len(slots)], dtype=torch.int64, device=device)
    counts = [torch.zeros_like(count) for _ in range(size)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    parts_s: list[list[np.ndarray]] = [[] for _ in range(size)]
    parts_v: list[list[np.ndarray]] = [[] for _ in range(size)]
    for start in range(0, max(sizes), chunk):
        length = min(chunk, max(sizes) - start)
        mine = slice(start, min(start + length, len(slots)))
        send_s = torch.full((length,), -1, dtype=torch.int64)
        send_v = torch.zeros(length, dtype=torch.float32)
        taken = max(0, mine.stop - mine.start)
        send_s[:taken] = torch.from_numpy(np.ascontiguousarray(slots[mine], dtype=np.int64))
        send_v[:taken] = torch.from_numpy(np.ascontiguousarray(values[mine], dtype=np.float32))
        send_s, send_v = send_s.to(device), send_v.to(device)
        got_s = [torch.empty_like(send_s) for _ in range(size)]
        got_v = [torch.empty_like(send_v) for _ in range(size)]
        dist.all_gather(got_s, send_s)
        dist.all_gather(got_v, send_v)
        for r in range(size):
            k = max(0, min(length, sizes[r] - start))
            parts_s[r].append(got_s[r][:k].cpu().numpy())
            parts_v[r].append(got_v[r][:k].cpu().numpy())
    flat_s = [p for r in range(size) for p in parts_s[r]]
    flat_v = [p for r in range(size) for p in parts_v[r]]
    if not flat_s:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    return np.concatenate(flat_s), np.concatenate(flat_v)


def any_rank(flag: bool) -> bool:
    """True if ``flag`` is true on any rank (a collective), so all ranks take the same branch."""
    if world()[1] == 1:
        return flag
    value = torch.tensor([int(flag)], dtype=torch.int64, device=_device())
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())
