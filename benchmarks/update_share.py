"""What ``ib.update()`` costs on a training step, against the same loop with a plain mean loss.

A small ResNet (or a small ViT, ``--model vit``) on 32x32 inputs at batch 256 trains on batches
already on the device (the input pipeline is not what is measured). Both loops run the same
steps, alternating in blocks, synchronising the device only at the ends of a block:

- ``plain``: ``criterion(out, y).mean()`` (``reduction="none"``), backward, step;
- ``infobatch``: ``ib.update(meta, criterion(out, y))``, backward, step, with the metadata as a
  pinned host tensor (what ``DataLoader(pin_memory=True)`` delivers) or on the device (``--meta``).

It reports the median step time of each and ``update()``'s share, ``1 - plain / infobatch``
(target <= 2% on a GPU). On a CPU it runs too; there ``update()`` reads the loss on the host,
which costs nothing extra because nothing runs asynchronously.

    python benchmarks/update_share.py                     # cuda if present, else cpu
    python benchmarks/update_share.py --model vit --steps 50 --repeats 5 --json share.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import webdataset as wds
from torch import nn
from torch.nn import functional as F

from infobatch_stream import InfoBatch, build_index
from infobatch_stream.meta import make_meta


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.skip = nn.Sequential()
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))) + self.skip(x))


def resnet(classes: int = 10) -> nn.Module:
    """A ResNet-10-like network for 32x32 images (four stages of one basic block)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    for cin, cout, stride in ((32, 32, 1), (32, 64, 2), (64, 128, 2), (128, 256, 2)):
        layers.append(Block(cin, cout, stride))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, classes)]
    return nn.Sequential(*layers)


class ViT(nn.Module):
    """A small ViT: 4x4 patches of a 32x32 image, 6 layers of width 192."""

    def __init__(self, classes: int = 10, dim: int = 192, depth: int = 6) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, dim, 4, 4)
        self.pos = nn.Parameter(torch.zeros(1, 64, dim))
        layer = nn.TransformerEncoderLayer(dim, 3, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.encoder(tokens).mean(1))


def _index(folder: str, n: int) -> str:
    """A real index of ``n`` tiny samples (update() only needs its slots and tag)."""
    with wds.ShardWriter(os.path.join(folder, "s-%03d.tar"), maxcount=n // 4, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": f"{i:07d}", "cls": b"0"})
    urls = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".tar"))
    return build_index(urls, os.path.join(folder, "index.json")).path


def _block(model, opt, batches, ib, steps: int, device: torch.device) -> float:
    """Seconds per step over ``steps`` steps (device synchronised at both ends only)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        x, y, meta = batches[i % len(batches)]
        per_sample = F.cross_entropy(model(x), y, reduction="none")
        loss = per_sample.mean() if ib is None else ib.update(meta, per_sample)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if ib is not None:
        ib.sync_scores()  # the last batch lands: its cost is part of the block
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("resnet", "vit"), default="resnet")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=30, help="steps per timed block")
    p.add_argument("--repeats", type=int, default=5, help="blocks per loop, alternating")
    p.add_argument("--meta", choices=("pinned", "device"), default="pinned")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = (resnet() if args.model == "resnet" else ViT()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    with tempfile.TemporaryDirectory() as folder:
        ib = InfoBatch(_index(folder, 8 * args.batch_size), num_epochs=10, prune_ratio=0.5)
        batches = []
        for b in range(8):
            rows = [make_meta(b * args.batch_size + i, 0, i % 3 == 0, ib.tag) for i in range(args.batch_size)]
            meta = torch.from_numpy(np.stack(rows))
            meta = meta.to(device) if args.meta == "device" else meta.pin_memory() if device.type == "cuda" else meta
            x = torch.randn(args.batch_size, 3, 32, 32, device=device)
            batches.append((x, torch.randint(0, 10, (args.batch_size,), device=device), meta))
        _block(model, opt, batches, None, 5, device)  # warm-up (cudnn autotune, allocator)
        _block(model, opt, batches, ib, 5, device)
        times: dict[str, list[float]] = {"plain": [], "infobatch": []}
        for _ in range(args.repeats):
            times["plain"].append(_block(model, opt, batches, None, args.steps, device))
            times["infobatch"].append(_block(model, opt, batches, ib, args.steps, device))
    plain, ours = statistics.median(times["plain"]), statistics.median(times["infobatch"])
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "meta": args.meta,
        "plain_ms": 1000 * plain,
        "infobatch_ms": 1000 * ours,
        "update_share": 1 - plain / ours,
        "times_s": times,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }
    print(
        f"{args.model} batch {args.batch_size} on {result['device']}: plain {1000 * plain:.2f} ms/step, "
        f"with ib.update() {1000 * ours:.2f} ms/step: update() share {100 * result['update_share']:+.2f}%"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
