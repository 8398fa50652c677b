"""A training process for the SIGKILL-and-resume test (run as ``python -m
tests.helpers.resume_child`` from the repository root, or called in-process).

It trains with the fixed per-slot loss, appends every trained slot to ``slots.bin``, checkpoints
(InfoBatch state, loader state, counters) every ``--every`` steps with one atomic ``torch.save``,
and, given ``--die-at``, kills itself with SIGKILL at that step. Started again it resumes from the
last checkpoint and truncates ``slots.bin`` to what that checkpoint had seen.
"""

from __future__ import annotations

import argparse
import os
import signal

import numpy as np
import torch

from infobatch_stream import META_KEY, InfoBatch
from tests.helpers.data import slot_loss
from tests.helpers.loaders import meta_loader

EPOCHS = 3
BATCH = 4
SHUFFLE = 7


def loader_of_kind(ib: InfoBatch, kind: str):
    """``sdlN``: a StatefulDataLoader with N forked workers; ``nodes``/``nodes-threads``: a torchdata.nodes graph."""
    if kind.startswith("sdl"):
        from torchdata.stateful_dataloader import StatefulDataLoader

        return meta_loader(
            ib, BATCH, shuffle=SHUFFLE, num_workers=int(kind[3:]), context="fork", loader_class=StatefulDataLoader
        )
    from torchdata.nodes import Batcher, Loader, Mapper, ParallelMapper

    source = ib.node(shuffle=SHUFFLE)
    if kind == "nodes":
        node = Mapper(source, lambda s: s[META_KEY])
    else:  # "nodes-threads": two mapping threads; the graph still resumes exactly (in order)
        node = ParallelMapper(source, lambda s: s[META_KEY], num_workers=2, method="thread", in_order=True)
    return Loader(Batcher(node, batch_size=BATCH, drop_last=False))


def as_meta(batch, kind: str) -> torch.Tensor:
    if kind.startswith("sdl"):  # [meta] from to_tuple + default collate
        return batch[0]
    return torch.as_tensor(np.stack(batch))  # a list of per-sample arrays from the Batcher


def _save(path: str, state: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def train(index: str, work: str, kind: str, every: int, die_at: int | None = None) -> np.ndarray:
    """Train to the end (resuming from ``work`` if a checkpoint is there); the final store."""
    ib = InfoBatch(index, num_epochs=EPOCHS, prune_ratio=0.5, delta=1.0, seed=5)
    loader = loader_of_kind(ib, kind)
    ckpt, log_path = os.path.join(work, "ckpt.pt"), os.path.join(work, "slots.bin")
    epoch, step, logged = 0, 0, 0
    if os.path.exists(ckpt):
        state = torch.load(ckpt, weights_only=True)  # no pickle: tensors and plain values only
        ib.load_state_dict(state["ib"])
        loader.load_state_dict(state["loader"])
        epoch, step, logged = state["epoch"], state["step"], state["logged"]
    with open(log_path, "ab") as log:
        log.truncate(logged * 8)  # what happened after the checkpoint is done again
        log.seek(0, os.SEEK_END)
        for epoch in range(epoch, EPOCHS):  # noqa: B020 - resumes from the saved epoch
            ib.set_epoch(epoch)
            for batch in loader:
                meta = as_meta(batch, kind)
                ib.update(meta, slot_loss(meta))
                log.write(meta[:, 0].numpy().astype(np.int64).tobytes())
                logged += len(meta)
                step += 1
                if step % every == 0:
                    log.flush()
                    os.fsync(log.fileno())
                    _save(
                        ckpt,
                        {
                            "ib": ib.state_dict(),
                            "loader": loader.state_dict(),
                            "epoch": epoch,
                            "step": step,
                            "logged": logged,
                        },
                    )
                if step == die_at:
                    log.flush()
                    os.kill(os.getpid(), signal.SIGKILL)
    return np.array(ib.store.scores)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("index")
    p.add_argument("work")
    p.add_argument("kind")
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--die-at", type=int)
    args = p.parse_args(argv)
    scores = train(args.index, args.work, args.kind, args.every, args.die_at)
    np.save(os.path.join(args.work, "final.npy"), scores)


if __name__ == "__main__":
    main()
