"""DistributedDataParallel training over WebDataset tar shards with InfoBatch pruning.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --quick
    python examples/ddp_train.py --quick          # one process, no process group

Needs the package with its examples extra (``pip install -e '.[examples]'``: Pillow, scikit-learn).
Everything else (process group, DDP wrapper, DataLoader, optimiser) is a plain DDP loop.
What changes in an existing DDP + WebDataset loop (each marked ``# IB`` below):

1. ``InfoBatch(index, ...)`` after ``init_process_group``, on EVERY rank: construction is a
   collective (the local ranks of a node share one score store and epoch plan).
2. ``ib.shards()`` replaces ``SimpleShardList`` + ``split_by_node`` + ``split_by_worker`` (and
   any shard shuffle): it orders the shards per epoch and cuts the epoch's kept samples evenly
   over ranks and workers, so every rank makes the same number of steps and a DDP all-reduce
   never waits on a rank that ran out of data (no ``with_epoch``/equalising tricks needed).
3. ``ib.tarfile_to_samples()`` replaces ``wds.tarfile_to_samples()``: it reads only the kept
   samples' bytes and tags each with ``__ib__``, which ``to_tuple`` must carry to the loop.
4. ``ib.set_epoch(epoch)`` before each pass, on every rank (a collective: the ranks exchange
   their losses, then all plan the same epoch). Its step count, ``ib.num_batches(batch, workers)``,
   is exact; pruned epochs are shorter, so the run's total step count is not known up front:
   ``ProgressScheduler`` drives a step-based scheduler (here cosine) by the run's progress.
5. The criterion uses ``reduction="none"`` and ``loss = ib.update(meta, per_sample_loss)``:
   scores in, weighted mean out; backward and step as before.

Without ``--shards`` rank 0 writes scikit-learn's digits as PNG shards, their index and the
held-out test digits (``digits-test.npz``) into ``--out``, reused by later runs; the split always
uses seed 0, so a reused folder never mixes test digits into training. Rank 0 evaluates on them
at the end. With ``--shards`` nothing is evaluated. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import logging
import os

import numpy as np
import torch
import torch.distributed as dist
import webdataset as wds
from common import shard_urls  # the examples' shard patterns: braces, then globs
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from infobatch_stream import InfoBatch, ProgressScheduler, build_index
from infobatch_stream.demo import write_digits_shards

log = logging.getLogger("ddp_train")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Train an MLP with DDP over tar shards (png + cls) with InfoBatch pruning.",
        epilog="example: torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --quick --out ddp_out\n"
        "         torchrun --nproc_per_node 2 examples/ddp_train.py --shards 'data/digits-{000..007}.tar'",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--shards",
        help="brace/glob pattern or index JSON of shards with png and cls fields "
        "(default: write the digits shards into --out)",
    )
    p.add_argument("--out", default="ddp_out", help="folder for generated shards and the index")
    p.add_argument("--epochs", type=int, help="default 30, or 6 with --quick")
    p.add_argument("--quick", action="store_true", help="a short run: 6 epochs unless --epochs is given")
    p.add_argument("--batch-size", type=int, default=32, help="per rank")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers per rank")
    p.add_argument("--prune-ratio", type=float, default=0.5)
    p.add_argument("--delta", type=float, default=0.875, help="fraction of the epochs that prune")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0, help="model init and InfoBatch decisions")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 6 if args.quick else 30
    return args


def prepare_index(args: argparse.Namespace, rank: int) -> str:
    """The index path; rank 0 writes what is missing while the others wait at the barrier."""
    if args.shards and args.shards.endswith(".json"):
        return args.shards
    path = os.path.join(args.out, "index.json")
    if rank == 0:
        if args.shards:  # user shards: (re)index them, a pass over the tar headers
            build_index(shard_urls(args.shards), path)
        elif not (os.path.exists(path) and os.path.exists(test_set_path(args.out))):
            urls, x_test, y_test = write_digits_shards(args.out, num_shards=8, seed=0)
            build_index(urls, path)
            np.savez(test_set_path(args.out), x=x_test, y=y_test)  # reruns skip scikit-learn entirely
    if dist.is_initialized():
        dist.barrier()
    return path


def to_tensors(sample: tuple) -> tuple[torch.Tensor, int, np.ndarray]:
    image, label, meta = sample  # decode("l"): float grayscale in [0, 1]
    return torch.as_tensor(np.asarray(image, dtype=np.float32).reshape(-1)), int(label), meta


def test_set_path(out: str) -> str:
    return os.path.join(out, "digits-test.npz")


def evaluate(model: nn.Module, out: str, device: torch.device) -> float:
    """Accuracy on the held-out digits (``digits_as_uint8(0)``'s test split, scaled to [0, 1])."""
    test = np.load(test_set_path(out))
    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(test["x"]).to(device)).argmax(1).cpu().numpy()
    return float((pred == test["y"]).mean())


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    distributed = "WORLD_SIZE" in os.environ  # set by torchrun
    if distributed:
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("infobatch_stream").setLevel(logging.WARNING)  # its per-epoch line repeats ours

    index_path = prepare_index(args, rank)
    ib = InfoBatch(
        index_path,
        num_epochs=args.epochs,
        prune_ratio=args.prune_ratio,  # IB 1: every rank
        delta=args.delta,
        seed=args.seed,
    )
    pipeline = wds.DataPipeline(
        ib.shards(),  # IB 2: per-epoch shard order, kept samples split over ranks and workers
        ib.tarfile_to_samples(),  # IB 3: reads only the kept samples, tags them with __ib__
        wds.shuffle(500),
        wds.decode("l"),
        wds.to_tuple("png", "cls", "__ib__"),  # IB 3: carry the metadata to the loop
        wds.map(to_tensors),
    )
    loader = torch.utils.data.DataLoader(
        pipeline, batch_size=args.batch_size, num_workers=args.workers, persistent_workers=args.workers > 0
    )

    torch.manual_seed(args.seed)  # the same initial weights on every rank (DDP also broadcasts them)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10)).to(device)
    ddp = DDP(model, device_ids=[device.index] if device.type == "cuda" else None) if distributed else model
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss(reduction="none")  # IB 5: one loss per sample
    schedule = ProgressScheduler(
        ib,
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000),  # IB 4
        args.batch_size,
        args.workers,
    )

    total_steps = samples = 0
    for epoch in range(args.epochs):
        stats = ib.set_epoch(epoch)  # IB 4: every rank, before the pass
        steps = ib.num_batches(args.batch_size, args.workers)  # exact for this rank, the same on all
        done, loss_sum = 0, 0.0
        for x, y, meta in loader:
            loss = ib.update(meta, criterion(ddp(x.to(device)), y.to(device)))  # IB 5: weighted mean
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()  # IB 4: the LR follows the run's progress, whatever the epochs' lengths
            done += 1
            samples += len(y)
            loss_sum += loss.item()
        assert done == steps, f"rank {rank} made {done} steps in epoch {epoch}, ib.num_batches said {steps}"
        total_steps += done
        log.info(
            "epoch %d: kept %d of %d, %d samples per rank, %d batches per rank, mean loss %.4f",
            epoch,
            stats.kept,
            stats.total,
            ib.samples_per_rank,
            done,
            loss_sum / max(done, 1),
        )

    per_rank = [(total_steps, samples)]
    if distributed:
        per_rank = [None] * world_size
        dist.all_gather_object(per_rank, (total_steps, samples))
    summary: dict = {}
    if rank == 0:
        trained = sum(s for _, s in per_rank)
        full = args.epochs * ib.index.num_samples
        accuracy = None if args.shards else evaluate(model, args.out, device)
        summary = {
            "world_size": world_size,
            "epochs": args.epochs,
            "steps_per_rank": [t for t, _ in per_rank],
            "samples": trained,
            "saved": round(1 - trained / full, 4),
            "accuracy": accuracy,
        }
        log.info(
            "trained %d samples over %d ranks of %d for full data: %.1f%% saved; test accuracy %s",
            trained,
            world_size,
            full,
            100 * summary["saved"],
            "not evaluated (user shards)" if accuracy is None else f"{100 * accuracy:.2f}%",
        )
        print(json.dumps(summary), flush=True)
    if distributed:
        dist.destroy_process_group()
    return summary


if __name__ == "__main__":
    main()
