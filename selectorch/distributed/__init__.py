"""Fitting, calibrating and searching across processes with ``torch.distributed``.

selectorch scales on the engine that multi-GPU users already run (NCCL on GPUs, gloo on CPUs);
there is no cluster code of its own. Under an initialised process group of more than one rank:

* :meth:`SelectiveModel.fit <selectorch.SelectiveModel.fit>` and
  :meth:`~selectorch.SelectiveModel.calibrate` gather every rank's recorded rows
  (:func:`gather_dataset`, in dataset order for a ``DistributedSampler``, its padding removed),
  so every rank fits the same state and holds the same threshold as one process fitting on all
  the data;
* ``KNNScore(shard=True)`` keeps only this rank's slice of the bank and searches it with the
  other ranks (:func:`sharded_search`), exactly as an unsplit search;
* :func:`save_sharded` / :func:`load_sharded` write one file per rank plus a header, and load
  it on any number of ranks.

See ``docs/distributed.md`` for the ``torchrun`` commands.
"""

from __future__ import annotations

from selectorch.distributed.checkpoint import load_sharded, save_sharded, sharded_modules
from selectorch.distributed.collectives import (
    World,
    agreed_steps,
    gather_dataset,
    gather_parts,
    gather_rows,
    get_world,
    inputs_are_replicated,
    is_distributed,
    replicated_inputs,
    sampler_indices,
)
from selectorch.distributed.search import (
    locate_shard,
    merge_topk,
    shard_sizes,
    sharded_search,
    take_shard,
)
from selectorch.distributed.stats import all_reduce_gaussian_stats

__all__ = [
    "World",
    "agreed_steps",
    "all_reduce_gaussian_stats",
    "gather_dataset",
    "gather_parts",
    "gather_rows",
    "get_world",
    "inputs_are_replicated",
    "is_distributed",
    "load_sharded",
    "locate_shard",
    "merge_topk",
    "replicated_inputs",
    "sampler_indices",
    "save_sharded",
    "shard_sizes",
    "sharded_modules",
    "sharded_search",
    "take_shard",
]
