"""Saving modules whose state is split across ranks: one file per rank plus a JSON header.

A directory written by :func:`save_sharded` holds ``header.json`` and ``rank-RRRRR-of-WWWWW.pt``
for every rank. Each rank's file holds its rows of every sharded buffer (the ``bank_`` of a
``KNNScore(shard=True)``); rank 0's file also holds everything that is the same on every rank
(the model's weights, the mean, the threshold, ...), once. The header, written last, lists
every file's size and SHA-256; files are checked, then read with
``torch.load(..., weights_only=True, mmap=True)``, so nothing in them is run and a rank reads
only the files that hold its rows.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from selectorch._version import __version__
from selectorch.distributed.collectives import gather_parts, get_world
from selectorch.distributed.search import locate_shard, shard_sizes

#: Name of the header file in a sharded checkpoint directory.
HEADER = "header.json"
#: Format tag written in the header.
FORMAT = "selectorch-sharded"
#: Version of the layout; a newer one is refused with a clear error.
VERSION = 1
#: Buffers of a sharded module that describe the split; recomputed when loading.
LAYOUT_BUFFERS = ("shard_sizes_", "shard_rank_")


def _rank_file(rank: int, world_size: int) -> str:
    return f"rank-{rank:05d}-of-{world_size:05d}.pt"


def sharded_modules(module: nn.Module) -> dict[str, nn.Module]:
    """Submodules whose state is split across ranks, by state-dict prefix (``"score."``).

    A module takes part by naming its row-split buffers in ``sharded_buffers`` and describing
    the split in the buffers ``shard_sizes_`` (rows of every rank) and ``shard_rank_``.
    """
    return {
        (name + "." if name else ""): sub
        for name, sub in module.named_modules()
        if getattr(sub, "sharded_buffers", ())
    }


def _barrier() -> None:
    if get_world().size > 1:
        dist.barrier()


def _digest(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def _gather_digests(path: Path) -> list[dict[str, Any]]:
    """``{"bytes", "sha256"}`` of every rank's file, computed by each rank on its own file."""
    size = path.stat().st_size
    packed = torch.tensor([size, *bytes.fromhex(_digest(path))], dtype=torch.int64)
    return [
        {"bytes": int(part[0, 0]), "sha256": bytes(part[0, 1:].tolist()).hex()}
        for part in gather_parts(packed[None], None)
    ]


def save_sharded(module: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Save ``module`` with one file per rank plus ``header.json``; every rank must call it.

    Args:
        module: A :class:`~selectorch.SelectiveModel`, a score or any module; its sharded
            submodules (a ``KNNScore(shard=True)``) must be fitted.
        directory: Directory to write (created if needed; existing files are overwritten).

    Returns:
        The directory. The header is written last, by rank 0, after every rank wrote its file.

    Example:
        >>> import tempfile
        >>> score = scores.KNNScore(k=2, shard=True).fit(torch.randn(20, 4))
        >>> path = save_sharded(score, tempfile.mkdtemp())  # one process: one rank file
        >>> sorted(p.name for p in path.iterdir())
        ['header.json', 'rank-00000-of-00001.pt']
    """
    world = get_world()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if world.rank == 0:  # a header left from an earlier save must not describe the new files
        (directory / HEADER).unlink(missing_ok=True)
    _barrier()
    state = module.state_dict()
    layout: dict[str, dict[str, Any]] = {}
    for prefix, sub in sharded_modules(module).items():
        sizes = [int(n) for n in sub.shard_sizes_.tolist()]
        locate_shard(sizes, int(sub.shard_rank_), getattr(sub, sub.sharded_buffers[0]).shape[0])
        layout[prefix] = {"sizes": sizes, "buffers": list(sub.sharded_buffers)}
    split = {prefix + name for prefix, info in layout.items() for name in info["buffers"]}
    skip = {prefix + name for prefix in layout for name in LAYOUT_BUFFERS}
    mine = {key: value for key, value in state.items() if key in split}
    if world.rank == 0:
        mine.update({k: v for k, v in state.items() if k not in split and k not in skip})
    torch.save(mine, directory / _rank_file(world.rank, world.size))
    digests = _gather_digests(directory / _rank_file(world.rank, world.size))
    if world.rank == 0:
        header = {
            "format": FORMAT,
            "version": VERSION,
            "selectorch": __version__,
            "module": type(module).__name__,
            "world_size": world.size,
            "files": [_rank_file(rank, world.size) for rank in range(world.size)],
            "digests": digests,
            "sharded": layout,
        }
        partial = directory / (HEADER + ".partial")
        partial.write_text(json.dumps(header, indent=2))
        partial.replace(directory / HEADER)
    _barrier()
    return directory


def _read_header(directory: Path) -> dict[str, Any]:
    path = directory / HEADER
    if not path.is_file():
        raise FileNotFoundError(
            f"No {HEADER} in {directory}: not a sharded checkpoint, or its saving did not finish "
            "(the header is written last)."
        )
    header = json.loads(path.read_text())
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a selectorch sharded checkpoint (format {FORMAT!r}).")
    if header.get("version", 0) > VERSION:
        raise ValueError(
            f"{path} has layout version {header['version']}, newer than this selectorch "
            f"{__version__} reads ({VERSION}); upgrade selectorch to load it."
        )
    from selectorch.persistence import compatible_version  # persistence imports the scores

    if not compatible_version(str(header.get("selectorch"))):
        raise ValueError(
            f"{path} was written by selectorch {header.get('selectorch')}; this is selectorch "
            f"{__version__}, and saves load only in the same major.minor version."
        )
    return header


def load_sharded(
    module: nn.Module, directory: str | os.PathLike[str], *, strict: bool = True
) -> nn.Module:
    """Load a checkpoint of :func:`save_sharded` into ``module``, on any number of ranks.

    Sharded buffers are split again for the current world size (contiguous, as even as
    possible), whatever the world size at saving: each rank reads only the rows of its new slice
    from the files that hold them. Without a process group the whole bank is loaded into one
    process. Every rank must call it with an unfitted or fitted ``module`` built with the same
    hyperparameters as the saved one.

    Args:
        module: The module to load into (same class and hyperparameters as the saved one).
        directory: Directory written by :func:`save_sharded`.
        strict: As in ``nn.Module.load_state_dict``.

    Returns:
        ``module``.

    Raises:
        FileNotFoundError: No header, or a rank file is missing.
        ValueError: Another format, a newer layout or another selectorch ``major.minor``, a
            file whose size or SHA-256 differs from the header's, fewer rows than ranks, or state
            that does not fit ``module`` (as ``load_state_dict`` reports it).
    """
    directory = Path(directory)
    header = _read_header(directory)
    files = [directory / name for name in header["files"]]
    missing = [str(path) for path in files if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"Sharded checkpoint {directory} is missing {missing}.")
    cache: dict[int, dict[str, Any]] = {}

    def read(rank: int) -> dict[str, Any]:
        if rank not in cache:
            expected = header["digests"][rank]
            size = files[rank].stat().st_size
            if size != expected["bytes"] or _digest(files[rank]) != expected["sha256"]:
                raise ValueError(
                    f"{files[rank]} has {size} bytes and another SHA-256 than the header says "
                    f"({expected['bytes']} bytes): it was truncated or altered. Not loaded."
                )
            cache[rank] = torch.load(files[rank], map_location="cpu", weights_only=True, mmap=True)
        return cache[rank]

    world = get_world()
    state = dict(read(0))
    for prefix, info in header["sharded"].items():
        saved = info["sizes"]
        total = sum(saved)
        if total < world.size:
            raise ValueError(
                f"Cannot shard the {total} rows of {prefix}{info['buffers'][0]} over {world.size} "
                "ranks: expected at least one row per rank. Load on fewer ranks."
            )
        sizes = shard_sizes(total, world.size)
        start = sum(sizes[: world.rank])
        stop = start + sizes[world.rank]
        for name in info["buffers"]:
            pieces, first = [], 0
            for rank, size in enumerate(saved):
                lo, hi = max(start, first), min(stop, first + size)
                if lo < hi:
                    pieces.append(read(rank)[prefix + name][lo - first : hi - first])
                first += size
            state[prefix + name] = torch.cat(pieces)
        state[prefix + "shard_sizes_"] = torch.tensor(sizes, dtype=torch.int64)
        state[prefix + "shard_rank_"] = torch.tensor(world.rank, dtype=torch.int64)
    module.load_state_dict(state, strict=strict)
    return module
