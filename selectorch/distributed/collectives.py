"""Collectives for fitting on many processes: world info and gathers of uneven rows.

Everything here runs eagerly (it reads sizes with ``.tolist()``) and is a no-op without an
initialised process group of more than one rank. Every rank must make the same calls in the same
order, as with any ``torch.distributed`` code.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
import torch.distributed as dist

#: Dtypes that :func:`gather_rows` can carry (bool travels as uint8).
_DTYPES = (
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
)
#: Most dimensions of a tensor that :func:`gather_rows` can carry.
_MAX_DIMS = 8
# ``all_gather_single`` replaces ``all_gather_into_tensor`` in recent PyTorch releases
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_REPLICATED: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "selectorch_replicated_inputs", default=False
)


class World(NamedTuple):
    """This process's place in a process group.

    Attributes:
        rank: Rank of this process, ``0 <= rank < size``.
        size: Number of processes (1 without an initialised process group).
    """

    rank: int
    size: int


def get_world(group: dist.ProcessGroup | None = None) -> World:
    """Rank and size of ``group`` (the default group when ``None``); ``(0, 1)`` without one.

    Example:
        >>> get_world()  # no process group initialised
        World(rank=0, size=1)
    """
    if not (dist.is_available() and dist.is_initialized()):
        return World(0, 1)
    return World(dist.get_rank(group), dist.get_world_size(group))


def is_distributed(group: dist.ProcessGroup | None = None) -> bool:
    """Whether a process group of more than one rank is initialised (so collectives are needed).

    Example:
        >>> is_distributed()
        False
    """
    return get_world(group).size > 1


@contextlib.contextmanager
def replicated_inputs() -> Iterator[None]:
    """Declare that the tensors scored inside the block are the same on every rank.

    A sharded :class:`~selectorch.scores.KNNScore` then searches them as they are instead of
    exchanging every rank's queries first. :meth:`SelectiveModel.calibrate
    <selectorch.SelectiveModel.calibrate>` uses it after gathering the calibration rows. Only
    eager calls read it; a compiled forward always exchanges queries.
    """
    token = _REPLICATED.set(True)
    try:
        yield
    finally:
        _REPLICATED.reset(token)


def inputs_are_replicated() -> bool:
    """Whether the caller is inside :func:`replicated_inputs`."""
    return _REPLICATED.get()


def comm_device(device: torch.device, group: dist.ProcessGroup | None = None) -> torch.device:
    """Where a tensor on ``device`` travels: NCCL carries CUDA tensors only, gloo CPU tensors."""
    backend = str(dist.get_backend(group))
    if device.type == "cpu" and "cpu" not in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda" and backend == "gloo":
        return torch.device("cpu")
    return device


def _metadata(tensor: torch.Tensor) -> torch.Tensor:
    """``[rows, ndim, dtype code, *trailing shape, -1 padding]`` as an int64 tensor."""
    if tensor.dtype not in _DTYPES or not 1 <= tensor.ndim <= _MAX_DIMS:
        raise ValueError(
            f"Expected a tensor with 1 to {_MAX_DIMS} dimensions and a dtype in {_DTYPES} to "
            f"gather, got shape {tuple(tensor.shape)} and dtype {tensor.dtype}."
        )
    trailing = list(tensor.shape[1:]) + [-1] * (_MAX_DIMS - tensor.ndim)
    values = [tensor.shape[0], tensor.ndim, _DTYPES.index(tensor.dtype), *trailing]
    return torch.tensor(values, dtype=torch.int64, device=tensor.device)


def _describe(meta: list[int]) -> str:
    ndim, code = meta[1], meta[2]
    shape = ", ".join(["*", *map(str, meta[3 : 3 + ndim - 1])])
    return f"({shape}) {_DTYPES[code]}"


def _gather_padded(
    tensor: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, list[int]]:
    """``(W * longest, ...)`` buffer of every rank's rows padded to the longest, and the sizes."""
    home = tensor.device
    tensor = tensor.to(comm_device(home, group))
    meta = _metadata(tensor)
    metas = [torch.empty_like(meta) for _ in range(get_world(group).size)]
    dist.all_gather(metas, meta, group=group)
    info = [m.tolist() for m in metas]
    for rank, other in enumerate(info):
        if other[1:] != info[0][1:]:
            raise ValueError(
                f"Expected every rank to gather rows of the same shape and dtype, got "
                f"{_describe(info[0])} on rank 0 and {_describe(other)} on rank {rank}."
            )
    sizes = [m[0] for m in info]
    send = tensor.contiguous()
    if send.dtype == torch.bool:
        send = send.to(torch.uint8)
    longest = max(sizes)
    if send.shape[0] < longest:
        send = torch.cat([send, send.new_zeros((longest - send.shape[0], *send.shape[1:]))])
    buffer = send.new_empty((len(sizes) * longest, *send.shape[1:]))
    _all_gather_into(buffer, send, group=group)
    return buffer.to(device=home, dtype=tensor.dtype), sizes


def gather_parts(
    tensor: torch.Tensor, group: dist.ProcessGroup | None = None
) -> list[torch.Tensor]:
    """Every rank's ``tensor``, in rank order; the row counts may differ between ranks.

    Each rank sends its row count, shape and dtype first; the rows are then padded to the
    longest rank's count, all-gathered and cut back. Without a process group of more than one
    rank, ``[tensor]``.

    Args:
        tensor: ``(N_r, ...)`` rows of this rank; the trailing shape and dtype must be the same on
            every rank.
        group: Process group (the default group when ``None``).

    Returns:
        ``[(N_0, ...), (N_1, ...), ...]``, one tensor per rank, on ``tensor``'s device.

    Raises:
        ValueError: The trailing shape or the dtype differs between ranks (raised on every
            rank, so that none waits forever).
    """
    if get_world(group).size == 1:
        return [tensor]
    buffer, sizes = _gather_padded(tensor, group)
    longest = max(sizes)
    return [buffer[rank * longest : rank * longest + size] for rank, size in enumerate(sizes)]


def gather_rows(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Concatenate every rank's rows in rank order; the row counts may differ between ranks.

    Use it to fit a score on tensors that each rank holds a part of, so that every rank fits the
    same state: ``score.fit(gather_rows(X_part), gather_rows(y_part))``.

    Args:
        tensor: ``(N_r, ...)`` rows of this rank.
        group: Process group (the default group when ``None``).

    Returns:
        ``(N_0 + N_1 + ..., ...)`` on every rank; ``tensor`` itself without a process group.

    Raises:
        ValueError: The trailing shape or the dtype differs between ranks.

    Example:
        >>> gather_rows(torch.arange(3)).tolist()  # one process: unchanged
        [0, 1, 2]
    """
    if get_world(group).size == 1:
        return tensor
    buffer, sizes = _gather_padded(tensor, group)
    return buffer[_positions(sizes).to(buffer.device)] if min(sizes) < max(sizes) else buffer


def _positions(sizes: list[int]) -> torch.Tensor:
    """Rows of a padded gather buffer that hold data, in rank order."""
    longest = max(sizes)
    return torch.cat([torch.arange(size) + rank * longest for rank, size in enumerate(sizes)])


Rows = torch.Tensor | Mapping[str, torch.Tensor] | None


def _flatten(parts: tuple[Rows, ...]) -> list[torch.Tensor]:
    flat: list[torch.Tensor] = []
    for part in parts:
        if isinstance(part, Mapping):
            flat.extend(part[key] for key in sorted(part))
        elif part is not None:
            flat.append(part)
    return flat


def _unflatten(parts: tuple[Rows, ...], flat: list[torch.Tensor]) -> tuple[Rows, ...]:
    values = iter(flat)
    out: list[Rows] = []
    for part in parts:
        if isinstance(part, Mapping):
            out.append({key: next(values) for key in sorted(part)})
        else:
            out.append(None if part is None else next(values))
    return tuple(out)


def _identical(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and values, NaN equal to NaN."""
    if a.shape != b.shape:
        return False
    if a.is_floating_point():
        return bool(torch.isclose(a, b, rtol=0.0, atol=0.0, equal_nan=True).all())
    return torch.equal(a, b)


def gather_dataset(
    *parts: Rows,
    indices: torch.Tensor | None = None,
    group: dist.ProcessGroup | None = None,
    warn_replicated: bool = True,
) -> tuple[Rows, ...]:
    """Every rank's rows of a dataset that the ranks split between them, the same on every rank.

    This is what :meth:`SelectiveModel.fit <selectorch.SelectiveModel.fit>` and
    :meth:`~selectorch.SelectiveModel.calibrate` do under ``torch.distributed`` before fitting:

    * with ``indices`` (the dataset rows this rank saw, from :func:`sampler_indices`), the rows
      are put back in dataset order and rows seen twice (the padding of a
      ``DistributedSampler``) are kept once, so the result is what one process reading the
      dataset in order would have collected;
    * without, if every rank holds exactly the same rows, they are kept once (and a warning says
      that the work was not split); otherwise they are concatenated in rank order.

    Args:
        *parts: Tensors (or dicts of tensors, or ``None``), each with this rank's ``N_r`` rows.
        indices: Optional ``(N_r,)`` dataset index of each row of this rank.
        group: Process group (the default group when ``None``).
        warn_replicated: Warn when every rank held the same rows.

    Returns:
        The gathered ``parts``, in the same structure; ``parts`` unchanged without a process
        group of more than one rank.

    Warns:
        UserWarning: Some rank's rows do not match its ``indices`` one to one (a ``collate_fn``
            that drops samples, say): rows are then concatenated in rank order, padding kept.
    """
    world = get_world(group)
    flat = _flatten(parts)
    if world.size == 1 or not flat:
        return parts
    rows = flat[0].shape[0]
    # -1: no indices on this rank; -2: indices that do not match the rows one to one
    local = torch.full((rows,), -1, dtype=torch.int64, device=flat[0].device)
    if indices is not None:
        local.fill_(-2)
        if indices.shape == (rows,):
            local = indices.to(device=local.device, dtype=torch.int64)
    index = gather_rows(local, group)
    if bool((index >= 0).all()):
        order = torch.argsort(index, stable=True)
        ranked = index[order]
        first = torch.ones_like(ranked, dtype=torch.bool)
        first[1:] = ranked[1:] != ranked[:-1]
        keep = order[first].cpu()  # rows in dataset order, each dataset row once
        out = []
        for tensor in flat:  # one padded buffer per tensor, then one copy of the rows kept
            buffer, sizes = _gather_padded(tensor, group)
            out.append(buffer[_positions(sizes)[keep].to(buffer.device)])
        return _unflatten(parts, out)
    gathered = [gather_parts(tensor, group) for tensor in flat]
    if bool((index == -2).any()):
        warnings.warn(
            "The rows recorded on some rank do not match its DistributedSampler's indices one to "
            "one; they are concatenated in rank order and the sampler's padding is kept.",
            stacklevel=2,
        )
    same = all(all(_identical(p, per_rank[0]) for p in per_rank) for per_rank in gathered)
    if same:
        if warn_replicated:
            warnings.warn(
                f"Every one of the {world.size} ranks passed the same {rows} rows; they are used "
                "once. Give each rank its own part of the data (a DistributedSampler) to split "
                "the model's work.",
                stacklevel=2,
            )
        return _unflatten(parts, [per_rank[0] for per_rank in gathered])
    return _unflatten(parts, [torch.cat(per_rank) for per_rank in gathered])


def sampler_indices(data: Any) -> torch.Tensor | None:
    """The dataset rows a DataLoader visits on this rank, if it shards with a DistributedSampler.

    ``DistributedSampler`` is deterministic for a given seed and epoch, so iterating it again
    gives the rows that the loader yielded. Other loaders return ``None``.

    Args:
        data: Anything passed to ``fit`` or ``calibrate``.

    Returns:
        ``(N_r,)`` int64 dataset indices (without the last incomplete batch when the loader has
        ``drop_last=True``), or ``None``.

    Warns:
        UserWarning: The sampler has ``drop_last=True`` and leaves rows of the dataset out.
    """
    from torch.utils.data import DataLoader, DistributedSampler

    if not isinstance(data, DataLoader):
        return None
    for sampler in (data.sampler, getattr(data.batch_sampler, "sampler", None)):
        if isinstance(sampler, DistributedSampler):
            n = len(sampler.dataset)  # type: ignore[arg-type]
            if sampler.drop_last and n % sampler.num_replicas:
                warnings.warn(
                    f"DistributedSampler(drop_last=True) leaves {n % sampler.num_replicas} of the "
                    f"{n} rows out on every epoch; use drop_last=False (its padding is removed).",
                    stacklevel=3,
                )
            indices = torch.tensor(list(iter(sampler)), dtype=torch.int64)
            if data.drop_last and data.batch_size:  # the loader drops the last partial batch
                indices = indices[: len(indices) // data.batch_size * data.batch_size]
            return indices
    return None


def agreed_steps(rows: int, batch_size: int, group: dist.ProcessGroup | None = None) -> int:
    """The largest number of ``batch_size`` steps that any rank needs for its ``rows``.

    Scores whose forward runs collectives (a sharded kNN) run this many steps on every rank,
    some of them on empty batches, so that every rank makes the same collective calls.
    """
    steps = -(-rows // batch_size)
    if not is_distributed(group):
        return steps
    value = torch.tensor([steps], dtype=torch.int64)
    value = value.to(comm_device(value.device, group))
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return int(value)
