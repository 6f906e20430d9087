"""Nearest-neighbour search over a bank split by rows across ranks.

Each rank holds a contiguous slice of the bank. A search sends every rank's queries to every
rank (one all-gather of ``(B, D)`` queries), each rank searches its slice for ``k`` candidates per
query, each rank receives the candidates of its own queries (one all-to-all of ``(B, k)``
distances and global indices, never the bank) and merges them: the result is exactly the ``k``
nearest rows of the whole bank. The exchanges are functional collectives, so the search compiles
into one graph with ``torch.compile``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from selectorch.distributed.collectives import (
    comm_device,
    get_world,
    inputs_are_replicated,
)

#: ``(queries, k) -> (distances, indices)``, both ``(Q, k)`` and sorted, in one rank's slice.
LocalSearch = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]

# ``all_gather_single`` replaces ``all_gather_tensor`` in recent PyTorch releases
_all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor


def shard_sizes(rows: int, world_size: int) -> list[int]:
    """Rows held by each rank when ``rows`` are split contiguously and as evenly as possible.

    The first ``rows % world_size`` ranks hold one row more (as ``torch.tensor_split``).

    Example:
        >>> shard_sizes(10, 3)
        [4, 3, 3]
    """
    base, extra = divmod(rows, world_size)
    return [base + int(rank < extra) for rank in range(world_size)]


def merge_topk(
    distances: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest of ``C`` candidate distances per row, sorted.

    Among equal distances the earlier candidate comes first (a stable sort), so every rank
    merging the same candidates gets the same neighbours.

    Args:
        distances: ``(B, C)`` candidate distances, ``C >= k``.
        indices: ``(B, C)`` their indices.
        k: Number to keep.

    Returns:
        ``(distances, indices)``, both ``(B, k)``, by increasing distance.

    Example:
        >>> d = torch.tensor([[0.5, 0.2, 0.9, 0.1]])
        >>> merge_topk(d, torch.tensor([[10, 11, 20, 21]]), 2)[1].tolist()
        [[21, 11]]
    """
    values, order = torch.sort(distances, dim=1, stable=True)
    return values[:, :k], indices.gather(1, order[:, :k])


def _check_same_bank(bank: torch.Tensor, world_size: int, group: dist.ProcessGroup | None) -> None:
    """Raise on every rank unless every rank holds a bank of the same shape and sums."""
    weights = torch.arange(bank.shape[0], dtype=bank.dtype, device=bank.device)
    summary = torch.tensor(
        [
            bank.shape[0],
            bank.shape[1],
            torch.sum(bank, dtype=torch.float64).item(),
            torch.sum(weights @ bank, dtype=torch.float64).item(),
        ],
        dtype=torch.float64,
    )
    summary = summary.to(comm_device(summary.device, group))
    everyone = [torch.empty_like(summary) for _ in range(world_size)]
    dist.all_gather(everyone, summary, group=group)
    for rank, other in enumerate(everyone):
        if not torch.allclose(other, everyone[0], rtol=1e-6, atol=0.0):
            raise ValueError(
                "A sharded KNNScore is fitted on the whole reference set, the same on every rank; "
                f"rank {rank} passed {int(other[0])} rows that differ from the "
                f"{int(everyone[0][0])} rows of rank 0. Gather them first with "
                "selectorch.distributed.gather_rows(X), or fit through SelectiveModel.fit."
            )


def take_shard(
    bank: torch.Tensor, group: dist.ProcessGroup | None = None
) -> tuple[torch.Tensor, list[int], int]:
    """This rank's contiguous slice of a bank that every rank holds whole.

    Args:
        bank: ``(M, D)`` the whole bank, the same on every rank.
        group: Process group (the default group when ``None``).

    Returns:
        ``(shard, sizes, rank)``: a copy of this rank's rows, the rows of every rank
        (:func:`shard_sizes`) and this rank.

    Raises:
        ValueError: The ranks passed different banks (compared by shape and two float64 sums),
            or there are fewer rows than ranks.
    """
    world = get_world(group)
    if world.size == 1:
        return bank, [bank.shape[0]], 0
    _check_same_bank(bank, world.size, group)
    if bank.shape[0] < world.size:
        raise ValueError(
            f"Expected at least one reference row per rank to shard the bank, got "
            f"{bank.shape[0]} rows for {world.size} ranks."
        )
    sizes = shard_sizes(bank.shape[0], world.size)
    start = sum(sizes[: world.rank])
    return bank[start : start + sizes[world.rank]].clone(), sizes, world.rank


def locate_shard(
    sizes: list[int], rank: int, rows: int, group: dist.ProcessGroup | None = None
) -> tuple[int, int]:
    """Check that a shard belongs to this process; return its first global row and the bank size.

    Args:
        sizes: Rows of every rank when the bank was split.
        rank: Rank whose slice this is.
        rows: Rows of the slice held here.
        group: Process group (the default group when ``None``).

    Returns:
        ``(offset, total)``: global index of the slice's first row, rows of the whole bank.

    Raises:
        ValueError: The slice was made for another world size or another rank; the message
            points to :func:`~selectorch.distributed.load_sharded`, which re-shards.
    """
    world = get_world(group)
    if len(sizes) != world.size or rank != world.rank or sizes[rank] != rows:
        raise ValueError(
            f"This sharded state holds rows of rank {rank} of {len(sizes)} ({rows} of "
            f"{sum(sizes)} rows), but this process is rank {world.rank} of {world.size}. Load "
            "sharded checkpoints with selectorch.distributed.load_sharded(module, directory), "
            "which re-shards the bank for the current world size."
        )
    return sum(sizes[:rank]), sum(sizes)


def _pad_candidates(
    distances: torch.Tensor, indices: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill a slice's ``(Q, k_local)`` candidates up to ``k`` with ``+inf`` and index ``-1``."""
    missing = k - distances.shape[1]
    if missing == 0:
        return distances, indices
    fill_d = distances.new_full((distances.shape[0], missing), float("inf"))
    fill_i = indices.new_full((indices.shape[0], missing), -1)
    return torch.cat([distances, fill_d], dim=1), torch.cat([indices, fill_i], dim=1)


def sharded_search(
    query: torch.Tensor,
    search: LocalSearch,
    k: int,
    *,
    offset: int,
    local_rows: int,
    total_rows: int,
    group: dist.ProcessGroup | None = None,
    replicated: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact ``k`` nearest neighbours of this rank's queries in a bank split across ranks.

    Every rank must call it the same number of times (SPMD). Eagerly, ranks may pass different
    numbers of queries (their counts are exchanged first, one small collective); under
    ``torch.compile`` every rank must pass the same ``(B, D)`` shape, as for any compiled
    collective. With ``replicated=True`` (or inside
    :func:`~selectorch.distributed.replicated_inputs`, eagerly) the queries are the same on every
    rank and are not exchanged: each rank searches them and gathers the candidates.

    Args:
        query: ``(B, D)`` this rank's queries, already in the bank's space.
        search: Searches this rank's slice: ``(queries, k_local) -> (distances, indices)``,
            ``(Q, k_local)``, sorted, with indices into the slice.
        k: Number of neighbours, ``1 <= k <= total_rows``.
        offset: Global index of the slice's first row.
        local_rows: Rows of this rank's slice.
        total_rows: Rows of the whole bank.
        group: Process group (the default group when ``None``).
        replicated: Whether ``query`` is the same on every rank.

    Returns:
        ``(distances, indices)``, both ``(B, k)``, sorted by increasing distance, with indices
        into the whole bank: what one search of the unsplit bank returns, for rows at distinct
        distances (among rows at equal distances, those of lower ranks come first).

    Raises:
        ValueError: ``k`` is out of range.
    """
    if not 1 <= k <= total_rows:
        raise ValueError(
            f"Expected argument `k` to be in [1, {total_rows}] (the bank size), got {k}."
        )
    world = get_world(group)
    local_k = min(k, local_rows)
    if world.size == 1:
        distances, indices = search(query, k)
        return distances, indices + offset
    pg = group if group is not None else dist.group.WORLD
    eager = not torch.compiler.is_compiling()
    replicated = replicated or (eager and inputs_are_replicated())
    rows = query.shape[0]
    longest = rows
    queries = query
    if not replicated:
        if eager:  # ranks may hold different batch sizes: pad to the longest
            counts = _all_gather(torch.tensor([rows], device=query.device), 0, pg)
            longest = int(counts.max())
            queries = torch.cat([query, query.new_zeros(longest - rows, query.shape[1])])
        queries = _all_gather(queries.contiguous(), 0, pg)  # (W * longest, D)
    distances, indices = search(queries, local_k)
    distances, indices = _pad_candidates(distances, indices + offset, k)
    if replicated:
        distances = _all_gather(distances.contiguous(), 0, pg)  # (W * B, k): every rank's
        indices = _all_gather(indices.contiguous(), 0, pg)
    else:  # rank s receives, from every rank, the candidates of rank s's queries
        distances = funcol.all_to_all_single(distances.contiguous(), None, None, pg)
        indices = funcol.all_to_all_single(indices.contiguous(), None, None, pg)
    distances = distances.view(world.size, longest, k)[:, :rows]
    indices = indices.view(world.size, longest, k)[:, :rows]
    # candidates in rank order, each rank's by distance: a tie goes to the lower rank
    distances = distances.permute(1, 0, 2).reshape(rows, world.size * k)
    indices = indices.permute(1, 0, 2).reshape(rows, world.size * k)
    return merge_topk(distances, indices, k)
