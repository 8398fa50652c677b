"""Checkpoint files under damage: every flipped byte, crafted header and malformed state ends in a
``CheckpointError`` naming the file and the part, or loads the saved data exactly; ``report`` on
the same files prints one line and exits 1, never a traceback."""

from __future__ import annotations

import copy
import json
import logging
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from infobatch_stream import InfoBatch
from infobatch_stream.checkpoint import (
    MAGIC,
    MAGIC_V1,
    CheckpointError,
    check_state,
    iter_chunks,
    load_state,
    save_state,
)
from infobatch_stream.cli import main
from tests.helpers.data import train_epochs
from tests.helpers.loaders import meta_loader

ARRAYS = ("scores", "plan", "kept_per_shard", "pending_slots", "pending_losses")


@pytest.fixture(scope="module")
def saved(tmp_path_factory, shared_shards):
    """A real run's checkpoint (3 epochs, 2 pruning), its bytes, and its state as numpy values."""
    folder = tmp_path_factory.mktemp("ckpt")
    _, index = shared_shards(4, 10)
    ib = InfoBatch(index, num_epochs=3, prune_ratio=0.5, delta=1.0)
    train_epochs(ib, meta_loader(ib, 5), 3)
    path = str(folder / "state.ibs")
    ib.save(path)
    reference = {k: v.numpy() if isinstance(v, torch.Tensor) else v for k, v in ib.state_dict().items()}
    return index, path, open(path, "rb").read(), reference


def split(raw: bytes) -> tuple[dict[str, Any], bytes]:
    """The header and the array bytes (from the arrays' aligned start) of an IBSTATE2 file."""
    assert raw[:8] == MAGIC
    length = int.from_bytes(raw[8:16], "little")
    start = -(-(20 + length) // 64) * 64
    return json.loads(raw[20 : 20 + length]), raw[start:]


def join(header: bytes | dict, blob: bytes, magic: bytes = MAGIC, fix_crc: bool = True, crc: bytes = b"") -> bytes:
    """An IBSTATE2 (or, without checksum, IBSTATE1) file of ``header`` and the array bytes."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(text).to_bytes(8, "little")
    if magic == MAGIC:
        crc = zlib.crc32(length + text).to_bytes(4, "little") if fix_crc else crc
    head = magic + length + crc + text
    return head + b"\0" * (-len(head) % 64) + blob


def outcome(path: str, index: Any, reference: dict[str, Any]) -> str:
    """ "ok" if the file loads, passes check_state and holds exactly the saved state; else the
    CheckpointError's message. Any other exception fails the test."""
    try:
        state = load_state(path)
        check_state(state, index)
    except CheckpointError as e:
        return str(e)
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        if isinstance(value, np.ndarray):
            np.testing.assert_array_equal(np.asarray(state[key]), value)
        else:
            assert json.dumps(state[key]) == json.dumps(value), key
    return "ok"


def assert_report_refuses(path: str, capsys) -> str:
    """``infobatch-stream report path`` exits 1 with one line on stderr naming the file."""
    assert main(["report", path]) == 1
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and err.startswith("infobatch-stream report: error: ") and path in err, err
    assert "Traceback" not in err
    return err


def test_a_checkpoint_carries_checksums_and_loads_exactly(saved, tmp_path):
    index, path, raw, reference = saved
    assert raw.startswith(MAGIC)
    header, _ = split(raw)
    assert set(header["arrays"]) == set(ARRAYS) and all("crc32" in s for s in header["arrays"].values())
    assert outcome(path, index, reference) == "ok"
    again = InfoBatch(index, num_epochs=3, prune_ratio=0.5, delta=1.0)
    again.load(path)
    np.testing.assert_array_equal(np.asarray(again.store.scores), reference["scores"])


def test_every_flipped_byte_is_refused_or_harmless(saved, tmp_path, capsys):
    """All positions of the file: a flip in the header, a length, a checksum or an array is a
    CheckpointError naming what failed; only flips in alignment padding load, and then exactly."""
    index, _, raw, reference = saved
    header, _ = split(raw)
    start = len(raw) - len(split(raw)[1])
    rng = np.random.default_rng(11)
    loaded, messages = [], set()
    path = str(tmp_path / "flipped.ibs")
    for pos in range(len(raw)):
        damaged = bytearray(raw)
        damaged[pos] ^= int(rng.integers(1, 256))
        with open(path, "wb") as f:
            f.write(damaged)
        result = outcome(path, index, reference)
        if result == "ok":
            loaded.append(pos)
        else:
            assert path in result and ("use an earlier" in result or pos < 8 and "not an infobatch_stream" in result), (
                result
            )
            messages.add(result)
        if pos % 97 == 0 or (pos >= start and pos % 7 == 0):
            if result == "ok":
                assert main(["report", path]) == 0
                capsys.readouterr()
            else:
                assert_report_refuses(path, capsys)
    data = {
        k: (start + s["offset"], start + s["offset"] + int(np.prod(s["shape"])) * np.dtype(s["dtype"]).itemsize)
        for k, s in header["arrays"].items()
    }
    assert not [p for p in loaded if p < 20 or any(a <= p < b for a, b in data.values())]  # only padding loads
    for what in [
        f"the checksum of array {key!r} does not match its bytes" for key in ("scores", "plan", "kept_per_shard")
    ] + ["the checksum of its header does not match", "is not an infobatch_stream checkpoint"]:
        assert any(what in m for m in messages), what


def _set(*keys_and_value: Any) -> Callable[[dict], None]:
    *keys, value = keys_and_value

    def mutate(header: dict) -> None:
        target = header
        for key in keys[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value

    return mutate


_DELETE = object()
HEADER_MUTATIONS = {
    "negative offset": _set("arrays", "scores", "offset", -64),
    "huge offset": _set("arrays", "scores", "offset", 2**62),
    "offset past 2**64": _set("arrays", "scores", "offset", 10**30),
    "string offset": _set("arrays", "scores", "offset", "0"),
    "float offset": _set("arrays", "scores", "offset", 1.5),
    "bool offset": _set("arrays", "scores", "offset", False),
    "huge shape": _set("arrays", "scores", "shape", [2**40]),
    "huge 2-D shape": _set("arrays", "scores", "shape", [40, 2**40]),
    "empty but huge shape": _set("arrays", "scores", "shape", [0, 2**62, 2**62]),
    "negative dim": _set("arrays", "scores", "shape", [-1]),
    "nested shape": _set("arrays", "scores", "shape", [[40]]),
    "string shape": _set("arrays", "scores", "shape", "40"),
    "64 dims": _set("arrays", "scores", "shape", [1] * 64),
    "0-d scores": _set("arrays", "scores", "shape", []),
    "2-D scores": _set("arrays", "scores", "shape", [20, 2]),
    "short scores": _set("arrays", "scores", "shape", [39]),
    "object dtype": _set("arrays", "scores", "dtype", "|O"),
    "float64 scores": _set("arrays", "scores", "dtype", "<f8"),
    "int64 plan": _set("arrays", "plan", "dtype", "<i8"),
    "unicode dtype": _set("arrays", "scores", "dtype", "<U4"),
    "list dtype": _set("arrays", "scores", "dtype", ["<f4"]),
    "no dtype": _set("arrays", "scores", "dtype", _DELETE),
    "no checksum": _set("arrays", "scores", "crc32", _DELETE),
    "negative checksum": _set("arrays", "scores", "crc32", -1),
    "checksum past 32 bits": _set("arrays", "scores", "crc32", 2**40),
    "string checksum": _set("arrays", "plan", "crc32", "x"),
    "array spec not an object": _set("arrays", "scores", 5),
    "arrays a list": _set("arrays", []),
    "no arrays": _set("arrays", _DELETE),
    "no state": _set("state", _DELETE),
    "state a list": _set("state", []),
    "scores missing": _set("arrays", "scores", _DELETE),
    "plan missing": _set("arrays", "plan", _DELETE),
    "pending_losses missing": _set("arrays", "pending_losses", _DELETE),
    "an array that is also a value": lambda h: h["arrays"].update(epoch=h["arrays"]["kept_per_shard"]),
    "stats given as an array": lambda h: (
        h["state"].pop("stats"),
        h["arrays"].update(stats=h["arrays"]["kept_per_shard"]),
    ),
    "epoch a string": _set("state", "epoch", "x"),
    "epoch negative": _set("state", "epoch", -1),
    "epoch a float": _set("state", "epoch", 1.5),
    "epoch a bool": _set("state", "epoch", True),
    "epoch beyond int64": _set("state", "epoch", 2**70),
    "epoch missing": _set("state", "epoch", _DELETE),
    "stats a number": _set("state", "stats", 5),
    "stats entry a number": _set("state", "stats", [5]),
    "stats entry empty": _set("state", "stats", [{}]),
    "stats epoch a string": _set("state", "stats", 0, "epoch", "x"),
    "stats kept negative": _set("state", "stats", 0, "kept", -3),
    "stats threshold a string": _set("state", "stats", 1, "threshold", "x"),
    "stats unknown field": _set("state", "stats", 0, "bogus", 1),
    "stats required field missing": _set("state", "stats", 0, "total", _DELETE),
    "config a number": _set("state", "config", 5),
    "config with a list": _set("state", "config", "seed", [1]),
    "threshold a string": _set("state", "threshold", "x"),
    "threshold null": _set("state", "threshold", None),
    "updates negative": _set("state", "updates", -1),
    "updates missing": _set("state", "updates", _DELETE),
    "format 2": _set("state", "format", 2),
    "format true": _set("state", "format", True),
    "num_samples a string": _set("state", "num_samples", "x"),
    "num_samples wrong": _set("state", "num_samples", 41),
    "fingerprint a number": _set("state", "index_fingerprint", 5),
}


@pytest.mark.parametrize("name", list(HEADER_MUTATIONS))
def test_crafted_headers_end_in_a_checkpoint_error(saved, tmp_path, capsys, name):
    """Headers with a valid checksum (so the checks behind it run) but impossible contents."""
    index, _, raw, reference = saved
    header, blob = split(raw)
    HEADER_MUTATIONS[name](header)
    path = str(tmp_path / "crafted.ibs")
    with open(path, "wb") as f:
        f.write(join(header, blob))
    result = outcome(path, index, reference)
    assert result != "ok" and "Traceback" not in result
    assert path in result, result
    if name not in ("num_samples wrong", "num_samples a string", "fingerprint a number", "format 2", "format true"):
        assert "damaged" in result or "truncated" in result or "unexpected dtype" in result, result
    reported = {
        "scores missing",
        "plan missing",
        "pending_losses missing",
        "updates negative",
        "updates missing",
        "threshold a string",
        "threshold null",
        "epoch missing",
        "num_samples a string",
        "fingerprint a number",
        "stats unknown field",
    }
    if name in reported:  # fields the report does not use: it reports what it can
        assert main(["report", path]) == 0
        capsys.readouterr()
    else:
        assert_report_refuses(path, capsys)


RAW_MUTATIONS: dict[str, Callable[[bytes], bytes]] = {
    "header length 2**63": lambda raw: raw[:8] + (2**63).to_bytes(8, "little") + raw[16:],
    "header length 2**64-1": lambda raw: raw[:8] + b"\xff" * 8 + raw[16:],
    "header length 0": lambda raw: raw[:8] + bytes(8) + raw[16:],
    "header length = file size": lambda raw: raw[:8] + len(raw).to_bytes(8, "little") + raw[16:],
    "header length past 64 MiB": lambda raw: raw[:8] + ((64 << 20) + 1).to_bytes(8, "little") + raw[16:],
    "magic only": lambda raw: raw[:8],
    "cut in the length": lambda raw: raw[:12],
    "cut in the checksum": lambda raw: raw[:18],
    "cut in the header": lambda raw: raw[:100],
    "cut in the scores": lambda raw: raw[: len(raw) - len(split(raw)[1]) + 50],
    "header not checksummed again": lambda raw: join(
        json.dumps(dict(split(raw)[0], extra=1)).encode(), split(raw)[1], fix_crc=False, crc=raw[16:20]
    ),
    "deeply nested header": lambda raw: join(b"[" * 200_000 + b"]" * 200_000, b""),
    "a 5000-digit number": lambda raw: join(b'{"state": {"epoch": ' + b"9" * 5000 + b'}, "arrays": {}}', b""),
    "not UTF-8": lambda raw: join(b'{"state": {"\xff\xfe": 1}, "arrays": {}}', b""),
    "header a list": lambda raw: join(b"[1, 2]", b""),
    "no header at all": lambda raw: join(b"", b""),
    "IBSTATE1 with a huge header length": lambda raw: MAGIC_V1 + (2**62).to_bytes(8, "little") + raw[16:],
    "IBSTATE1 with an object array": lambda raw: join(
        json.dumps({"state": {}, "arrays": {"x": {"dtype": "|O", "shape": [1], "offset": 0}}}).encode(),
        bytes(64),
        MAGIC_V1,
    ),
}


@pytest.mark.parametrize("name", list(RAW_MUTATIONS))
def test_crafted_bytes_end_in_a_checkpoint_error(saved, tmp_path, capsys, name):
    index, _, raw, reference = saved
    path = str(tmp_path / "crafted.ibs")
    with open(path, "wb") as f:
        f.write(RAW_MUTATIONS[name](raw))
    result = outcome(path, index, reference)
    assert result != "ok" and path in result, result
    assert_report_refuses(path, capsys)


def test_crafted_files_through_the_real_entry_point(saved, tmp_path):
    """The same refusals from the installed command's process: exit 1, one line, no traceback."""
    _, _, raw, _ = saved
    paths = []
    for i, name in enumerate(("header length 2**63", "deeply nested header", "cut in the scores")):
        paths.append(str(tmp_path / f"bad{i}.ibs"))
        with open(paths[-1], "wb") as f:
            f.write(RAW_MUTATIONS[name](raw))
    flipped = bytearray(raw)
    flipped[len(raw) - len(split(raw)[1]) + 3] ^= 0x40  # in the scores
    paths.append(str(tmp_path / "flipped.ibs"))
    with open(paths[-1], "wb") as f:
        f.write(flipped)
    script = (
        "import sys; from infobatch_stream.cli import main; sys.exit(max(main(['report', p]) for p in sys.argv[1:]))"
    )
    for path in paths:
        done = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and path in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    assert "checksum of array 'scores'" in done.stderr


STATE_MUTATIONS: dict[str, tuple[str, Callable[[dict], None]]] = {
    "scores float64": ("scores", lambda s: s.update(scores=s["scores"].double())),
    "scores bfloat16": ("scores", lambda s: s.update(scores=s["scores"].to(torch.bfloat16))),
    "scores 2-D": ("scores", lambda s: s.update(scores=s["scores"].reshape(20, 2))),
    "scores short": ("scores", lambda s: s.update(scores=s["scores"][:-1].clone())),
    "scores a list": ("scores", lambda s: s.update(scores=s["scores"].tolist())),
    "plan int64": ("plan", lambda s: s.update(plan=s["plan"].long())),
    "plan long": ("plan", lambda s: s.update(plan=torch.cat([s["plan"], s["plan"]]))),
    "kept_per_shard off by one": (
        "kept_per_shard",
        lambda s: s["kept_per_shard"].__setitem__(1, s["kept_per_shard"][1] + 1),
    ),
    "kept_per_shard int32": ("kept_per_shard", lambda s: s.update(kept_per_shard=s["kept_per_shard"].int())),
    "pending slot out of range": (
        "pending_slots",
        lambda s: s.update(pending_slots=torch.tensor([40]), pending_losses=torch.tensor([0.5])),
    ),
    "pending slot negative": (
        "pending_slots",
        lambda s: s.update(pending_slots=torch.tensor([-1]), pending_losses=torch.tensor([0.5])),
    ),
    "pending lengths differ": (
        "pending_losses",
        lambda s: s.update(pending_slots=torch.tensor([3]), pending_losses=torch.tensor([0.5, 0.2])),
    ),
    "pending loss NaN": (
        "pending_losses",
        lambda s: s.update(pending_slots=torch.tensor([3]), pending_losses=torch.tensor([float("nan")])),
    ),
    "epoch a tensor": ("epoch", lambda s: s.update(epoch=torch.tensor(2))),
    "config with a tensor": ("config", lambda s: s["config"].update(seed=torch.tensor(0))),
    "stats a tensor": ("stats", lambda s: s.update(stats=torch.zeros(3))),
    "threshold a tensor": ("threshold", lambda s: s.update(threshold=torch.tensor(0.5))),
}


@pytest.mark.parametrize("name", list(STATE_MUTATIONS))
def test_malformed_state_dicts_are_refused_naming_the_field(saved, tmp_path, capsys, name):
    """torch.save() checkpoints carry no checksum of ours: the fields are checked instead."""
    index, path, _, _ = saved
    state = InfoBatch(index, num_epochs=3, prune_ratio=0.5, delta=1.0)
    state.load(path)
    state = copy.deepcopy(state.state_dict())
    field, mutate = STATE_MUTATIONS[name]
    mutate(state)
    with pytest.raises(CheckpointError, match=f"state field {field!r}"):
        check_state(state, index)
    with pytest.raises(CheckpointError, match=f"state field {field!r}"):
        InfoBatch(index, num_epochs=3).load_state_dict(state)
    ckpt = str(tmp_path / "last.ckpt")
    torch.save({"model": {"w": torch.ones(2)}, "ib": state}, ckpt)
    if field in ("scores", "epoch", "config", "stats"):  # what the report reads
        assert field in assert_report_refuses(ckpt, capsys)
    else:
        assert main(["report", ckpt]) == 0
        capsys.readouterr()


def test_an_unchecksummed_file_of_the_previous_version_loads_and_says_so(saved, tmp_path, caplog, capsys):
    index, _, raw, reference = saved
    header, blob = split(raw)
    for spec in header["arrays"].values():
        del spec["crc32"]
    path = str(tmp_path / "old.ibs")
    with open(path, "wb") as f:
        f.write(join(header, blob, MAGIC_V1))
    with caplog.at_level(logging.INFO, logger="infobatch_stream.checkpoint"):
        assert outcome(path, index, reference) == "ok"
    assert any("IBSTATE1" in r.getMessage() and "no checksums" in r.getMessage() for r in caplog.records)
    assert main(["report", path]) == 0 and "ib.save" in capsys.readouterr().out


def test_save_refuses_a_header_it_could_not_load(tmp_path):
    with pytest.raises(CheckpointError, match="more than a checkpoint header holds"):
        save_state(str(tmp_path / "big.ibs"), {"blob": "x" * (65 << 20)})
    assert os.listdir(tmp_path) == []


def test_non_regular_files_are_refused_without_opening_them(tmp_path):
    fifo = str(tmp_path / "pipe.ibs")
    os.mkfifo(fifo)
    for path, kind in ((fifo, "named pipe"), (str(tmp_path), "directory"), (os.devnull, "character device")):
        with pytest.raises(CheckpointError, match=kind):
            load_state(path)
    with pytest.raises(FileNotFoundError):
        load_state(str(tmp_path / "missing.ibs"))


def _rss_file_kb() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssFile:"))


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads RssFile from /proc")
def test_iter_chunks_releases_the_pages_of_a_mapped_array(tmp_path):
    """A pass over a mapped 64 MiB array keeps one piece resident, not the file."""
    values = np.arange(16 << 20, dtype=np.float32)
    path = str(tmp_path / "big.ibs")
    save_state(path, {"scores": values})
    with open(path, "rb") as f:  # into the page cache: the pass then only maps pages
        while f.read(8 << 20):
            pass
    scores = load_state(path)["scores"]
    before, total = _rss_file_kb(), 0.0
    pieces = 0
    for chunk in iter_chunks(scores, 1 << 20):
        total += float(chunk.sum(dtype=np.float64))
        pieces += 1
    assert pieces == 16 and total == float(values.sum(dtype=np.float64))
    assert _rss_file_kb() - before < 16 << 10  # kB; the array is 64 MiB
    np.testing.assert_array_equal(np.concatenate(list(iter_chunks(scores, 3 << 18))), values)
