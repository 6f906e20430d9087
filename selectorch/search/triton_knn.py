"""Exact k-nearest-neighbour search in one pass over the bank, as a fused Triton kernel.

The plain search (:func:`selectorch.functional.knn_search`) writes a ``(B, chunk)`` block of
scores per chunk and runs ``topk`` on it, so it moves the bank once and the scores several
times. Here one kernel streams the bank in tiles, computes ``q.b`` on the tensor cores with
fp32 accumulation and keeps, per query and per slice of the bank, a buffer holding the exact
top candidates of that slice; only scores below a per-query bound (from a bank sample, reduced
to its bound by one selection kernel, and refined by a second where it is sparse) are ever
written, never the ``(B, M)`` matrix.
A selection kernel over the small ``(B, slices * out_slots)`` candidate buffer merges the
slices, and the distances of the chosen neighbours are recomputed exactly in fp32 from the
stored rows (and re-ranked), as the plain path does. Triton is imported only when the kernel
first runs, so this module imports on machines without it.

The kernels are ``torch.library`` custom ops (the candidates kernel an opaque one, so that its
launch options survive compilation): ``torch.compile(fullgraph=True)`` keeps them in one graph.
"""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import torch

from selectorch.functional.distances import normalize_rows, stored_norms_usable

__all__ = ["FUSED_MIN_WORK", "MAX_K", "fused_knn_search", "supports", "use_fused"]

METRICS = ("euclidean", "cosine")
#: Largest ``k`` the fused kernel serves (each split keeps its top ``k`` plus a margin).
MAX_K = 128
#: Bank dtypes the kernel reads directly.
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_HAS_TRITON = importlib.util.find_spec("triton") is not None


def _has_gluon() -> bool:
    try:
        return importlib.util.find_spec("triton.experimental.gluon") is not None
    except (ImportError, ValueError):
        return False


_HAS_GLUON = _HAS_TRITON and _has_gluon()


def _kernels() -> ModuleType:
    """The Triton kernels, imported on first use (Triton is not needed on CPU-only machines).

    No module-level "loaded" flag: ``torch.compile`` would guard on it, and the first compiled
    call, which loads the kernels while tracing, would fail that guard and compile again.
    """
    from selectorch.search import _triton_kernels

    return _triton_kernels


def _gluon() -> ModuleType:
    """The warp-specialised Gluon kernel (Hopper), imported on first use like :func:`_kernels`."""
    from selectorch.search import _gluon_kernels

    return _gluon_kernels


@torch.compiler.assume_constant_result
def _is_hopper(index: int) -> bool:
    # the Gluon kernel uses Hopper's wgmma; other GPUs keep the Triton kernel
    return torch.cuda.get_device_capability(index) == (9, 0)


def _use_ws(bank: torch.Tensor, cfg: dict[str, Any]) -> bool:
    """Whether the candidates pass runs the warp-specialised Gluon kernel (else the Triton one).

    Half banks with 128-query tiles (``B > 64``) and ``D`` a multiple of 64, on a Hopper GPU,
    unless ``cfg["ws"]`` is off (on an H100 the Gluon kernel took 2.46-2.53 ms where the Triton
    kernel took 2.74-2.81 ms, headline case, benchmarks/RESULTS.md); the kernel itself falls
    back to the Triton one where the tensors do not suit tensor descriptors. ``refine_ws``
    also runs the refinement sample through it (no clear gain, off). Depends only on metadata
    and the device.
    """
    return (
        bool(cfg["ws"])
        and _HAS_GLUON
        and bank.dtype in (torch.bfloat16, torch.float16)
        and cfg["block_q"] == 128
        and cfg["block_d"] == 64
        and bank.shape[1] % 64 == 0
        and _is_hopper(bank.device.index if bank.device.index is not None else 0)
    )


def _candidates(query_k: torch.Tensor, bank: torch.Tensor, bias: torch.Tensor,
                tau: torch.Tensor, scale: float, has_bias: bool, n_sel: int, precision: str,
                cfg: dict[str, Any], sample_step: int = 0, refine: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One candidates pass (the full bank, or with ``sample_step`` the refinement sample)."""
    stages = cfg["num_stages"]
    splits, tma = cfg["splits_per_sm"], cfg["tma"]
    if refine:
        stages = cfg["refine_stages"] or stages
        splits, tma = cfg["refine_splits_per_sm"], cfg["refine_tma"]
    ws = (cfg["refine_ws"] or not refine) and _use_ws(bank, cfg)
    if splits is None:
        # the Gluon kernel's programs fill a multiprocessor each (shared-memory stages): one
        # wave of long splits beat two of half as long (2.47-2.53 vs 2.66-2.77 ms, headline
        # case, and a selection over half the columns); the Triton kernel runs two at a time
        splits = 1 if ws else 2
    args = (query_k, bank, bias, tau, scale, has_bias, n_sel, cfg["block_q"], cfg["block_n"],
            cfg["block_d"], cfg["num_warps"], stages, splits, precision, cfg["chunk_tiles"],
            cfg["rounds"], cfg["maxnreg"], sample_step, tma, cfg["epilogue"])
    if ws:
        return _gluon().knn_candidates_ws(*args, cfg["ws_stages"], cfg["ws_regs"])
    return _kernels().knn_candidates(*args)


def supports(query: torch.Tensor, bank: torch.Tensor, k: int) -> bool:
    """Whether :func:`fused_knn_search` can serve this search (else use the torch path).

    True when Triton is installed, both tensors are 2-D on the same CUDA device, the bank is
    fp32, bf16 or fp16 with unit stride along ``D``, ``D`` is a multiple of 16 and the same for
    both, and ``1 <= k <= min(MAX_K, M)``. Depends only on metadata, so it is safe under
    ``torch.compile``.

    Args:
        query: ``(B, D)`` queries.
        bank: ``(M, D)`` reference rows.
        k: Number of neighbours.

    Returns:
        ``True`` if the fused kernel applies.
    """
    if not (_HAS_TRITON and isinstance(query, torch.Tensor) and isinstance(bank, torch.Tensor)):
        return False
    if query.device.type != "cuda" or bank.device != query.device:
        return False
    if query.dim() != 2 or bank.dim() != 2 or not query.dtype.is_floating_point:
        return False
    n_bank, dim = bank.shape
    return (
        bank.dtype in BANK_DTYPES
        and query.shape[1] == dim
        and dim % 16 == 0
        and bank.stride(1) == 1
        and query.shape[0] >= 1
        and 1 <= k <= min(MAX_K, n_bank)
        and n_bank < 2**31 - 2**20
    )


#: Queries x bank rows from which the fused kernel beat the chunked torch search on an H100
#: (benchmarks/RESULTS.md, 2026-11-22: 4.2x at 256 x 1.28M x 2048 bf16, 4.2x / 2.0x at
#: 4096 x 1.28M x 512 bf16 / fp32; tied or lost at 1 query and at 4096 x 50K).
FUSED_MIN_WORK = 1 << 28


def use_fused(query: torch.Tensor, bank: torch.Tensor, k: int) -> bool:
    """Whether a search is large enough, and suitable, for :func:`fused_knn_search`.

    Depends only on shapes and metadata, so it is safe under ``torch.compile``.
    """
    return query.shape[0] * bank.shape[0] >= FUSED_MIN_WORK and supports(query, bank, k)


def _n_selected(k: int, n_bank: int) -> int:
    # re-rank a few more than k with exact distances: reduced-precision scores choose the
    # candidates, exact fp32 distances choose among them
    return min(n_bank, max(k, min(k + max(8, k // 4), MAX_K)))


def _default_config(n_query: int, dim: int, dtype: torch.dtype) -> dict[str, Any]:
    block_d = next(b for b in (64, 32, 16) if dim % b == 0)
    if dtype == torch.float32:
        block_d = min(block_d, 32)
    # few queries: the pass is bound by reading the bank, a second sample costs more than the
    # candidates it saves
    cfg: dict[str, Any] = dict(block_d=block_d, splits_per_sm=None, chunk_tiles=4, rounds=2,
                               maxnreg=0, sample=True, sample_step=128, refine_step=0,
                               sample_group=1, refine_splits_per_sm=1, refine_stages=0,
                               refine_tma=True, tma=True,
                               epilogue=1, ws=True, refine_ws=False, ws_stages=6, ws_regs=240)
    if n_query <= 16:
        return dict(cfg, block_q=16, block_n=128, num_warps=4, num_stages=4)
    if n_query <= 32:
        return dict(cfg, block_q=32, block_n=128, num_warps=4, num_stages=4)
    if n_query <= 64:
        return dict(cfg, block_q=64, block_n=128, num_warps=4, num_stages=4)
    # a large first sample (every 32nd row) reduced to group minima, instead of a small one
    # refined by a second through the candidates kernel: its product costs ~0.09 ms and its
    # bound ~0.04 ms, the refinement ~0.24 ms (headline case, H100); with many queries the
    # sample gets sparser (at most ~2**24 scores) and the refinement runs again
    cfg.update(block_q=128, block_n=128, num_warps=8, num_stages=3, sample_step=32,
               sample_group=32, refine_step=32)
    if dtype != torch.float32:
        # 128 x 256 tiles: the query tile is re-read from L2 half as often (chunks of 2 tiles
        # keep the candidate buffers at the size of 4 tiles of 128); the three-pass fp32
        # products need too many registers for them
        cfg.update(block_n=256, chunk_tiles=2, num_stages=4)
    return cfg


#: Most scores of the bank sample held at once (``B * rows``), 64 MB in fp32.
_SAMPLE_SCORES = 1 << 24


def _sample_step(n_query: int, n_bank: int, n_sel: int, step: int) -> int:
    """Row step of the bank sample: at least 16 ``n_sel`` rows, at most ~2**24 scores in all."""
    step = max(step, n_bank * n_query // _SAMPLE_SCORES)
    return max(1, min(step, n_bank // (16 * n_sel)))


#: Queries from which the selection kernels (one program per query) replace ``topk``: with
#: fewer, their few programs run too long (at 1 query, 0.4 ms instead of ~0.05).
SELECT_MIN_QUERIES = 128


def _bound(kth: torch.Tensor, query_k: torch.Tensor, bias: torch.Tensor | None, scale: float,
           rel_error: float) -> torch.Tensor:
    """``kth`` (B,) plus the margin ``rel_error |scale| |q| max|b|``; +inf where not finite."""
    b_max = bias.max().clamp_min(0).sqrt() if bias is not None else 1.0
    q_norm = torch.linalg.vector_norm(query_k.float(), dim=1)
    tau = kth + rel_error * abs(scale) * (q_norm * b_max * 1.01 + 1e-30)
    # candidates pass only below the bound: where the margin is lost in kth's rounding (a zero
    # or tiny query), the next float up, so that ties at kth pass
    tau = torch.where(tau > kth, tau, torch.nextafter(kth, torch.full_like(kth, float("inf"))))
    # an overflowed or NaN bound would reject real neighbours: fall back to no bound
    return torch.where(torch.isfinite(tau), tau, float("inf"))


def _sample_product(query_k: torch.Tensor, bank: torch.Tensor, step: int) -> torch.Tensor:
    """``q.b`` (B, rows) in fp32 for every ``step``-th bank row, through torch's product.

    Half inputs give an fp32 output: the same exact products and fp32 sums as the kernel. (As
    ``(sample @ q.T).T``: for this layout cuBLAS picks Hopper kernels, 9-24 us on an H100 for
    256 queries x 1,251-10,009 rows x 2048 where ``q @ sample.T`` took 15-85 us.)
    """
    sample = bank[::step]
    if query_k.dtype == torch.float32:
        return query_k @ sample.T
    return torch.mm(sample, query_k.T, out_dtype=torch.float32).T


def _sample_threshold(
    query_k: torch.Tensor,
    bank: torch.Tensor,
    bias: torch.Tensor | None,
    scale: float,
    n_sel: int,
    step: int,
    rel_error: float,
) -> torch.Tensor:
    """Per-query upper bound on the ``n_sel``-th smallest score, from every ``step``-th bank row.

    With torch's ``topk`` and element-wise ops (few queries; :func:`_threshold` uses the
    selection kernel otherwise). The sample's rows are bank rows, so its ``n_sel``-th smallest
    score bounds the bank's; the margin covers the rounding of this product against the
    kernel's (``rel_error`` of ``|scale| |q| max|b|``). Only a starting threshold: a bound that
    is too high costs time, never correctness. About ``n_sel * step`` scores per query pass it.
    """
    score = scale * _sample_product(query_k, bank, step)
    if bias is not None:
        score = score + bias[::step]
    kth = score.topk(n_sel, dim=1, largest=False, sorted=False).values.amax(dim=1)
    return _bound(kth, query_k, bias, scale, rel_error)


def _sample_group(rows: int, n_sel: int, most: int) -> int:
    """Rows per group of the first sample's bound: at most ``most``, at least ``32 n_sel`` groups.

    The ``n_sel``-th smallest of ``rows / g`` group minima bounds the ``n_sel``-th smallest
    score as the scores themselves do (:func:`~._triton_kernels.knn_group_minima`); with that
    many groups two of the ``n_sel`` smallest scores rarely share a group (the bound passes
    a fraction of about ``(g - 1) n_sel / (2 rows)`` more scores than the exact one:
    ``(g - 1) / (64 g)`` at ``32 n_sel`` groups, 1.5% for the headline's groups of 20), and
    the selection reads ``g`` times fewer keys.
    """
    return max(1, min(most, rows // (32 * n_sel)))


@torch.compiler.assume_constant_result
def _fp32_precision() -> str:
    # follow torch's own switch: "highest" (the default) keeps fp32 accuracy with three tf32
    # products; "high"/"medium" accept plain tf32, as torch's matmul then does
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _threshold(
    query_k: torch.Tensor,
    bank: torch.Tensor,
    bias: torch.Tensor,
    scale: float,
    cosine: bool,
    n_sel: int,
    precision: str,
    cfg: dict[str, Any],
) -> torch.Tensor:
    """The kernel's starting threshold (B,): an upper bound on each query's n_sel-th score.

    A strided sample (every ``step``-th row) through torch's product gives a first bound
    (with ``sample_group``, from the minima of groups of its rows: :func:`_sample_group`);
    where that sample is sparse, a denser one (about every ``refine_step``-th row, rounded so
    that its programs fill one wave) through the candidates kernel itself, starting from that
    bound, a tighter one, so that the full pass appends only ~``n_sel * min(step,
    refine_step)`` candidates per query. Each
    bound is the sample's ``n_sel``-th smallest score (:func:`knn_threshold`, one kernel that
    also adds the rounding margin and keeps the smaller of the two bounds): the sample's rows
    are bank rows, so it bounds the bank's. The margin covers the rounding of the sample's
    scores against the kernel's (``rel_error`` of ``|scale| |q| max|b|``). A bound that is too
    high costs time, never correctness. With fewer than :data:`SELECT_MIN_QUERIES` queries
    ``topk`` and element-wise ops replace the selection kernel.

    Args:
        query_k: ``(B, D)`` queries in the bank's dtype.
        bank: ``(M, D)`` bank.
        bias: ``(M,)`` fp32 squared norms (euclidean); unused for cosine.
        scale: Factor of the products in the scores (``-2`` euclidean, ``-1`` cosine).
        cosine: Whether the metric is cosine (no bias).
        n_sel: Rank whose score is bounded.
        precision: The kernel's ``tl.dot`` precision.
        cfg: Kernel options (:func:`_default_config`).

    Returns:
        ``(B,)`` fp32 bounds, ``+inf`` where there is none.
    """
    n_query, dim = query_k.shape
    step = _sample_step(n_query, bank.shape[0], n_sel, cfg["sample_step"])
    if not cfg["sample"] or step < 4:
        return torch.full((n_query,), float("inf"), device=bank.device)
    ops = _kernels()
    # products of half (or three-pass tf32) inputs are exact in fp32, so the sample's scores
    # and the kernel's differ only by the order of their fp32 sums: within 2 D 2**-24 |q| |b|
    # (twice that margin here); plain tf32 rounds the inputs too
    tf32 = bank.dtype == torch.float32 and precision == "tf32"
    rel_error = 2.0**-7 if tf32 else dim * 2.0**-22
    margin = rel_error * abs(scale)
    small = n_query < SELECT_MIN_QUERIES  # few queries: torch's topk instead of the kernels
    bias_or_none = None if cosine else bias
    if small:
        tau = _sample_threshold(query_k, bank, bias_or_none, scale, n_sel, step, rel_error)
    else:
        prod = _sample_product(query_k, bank, step)
        # cosine: no bias, b_max = 1 (unused tensors below are placeholders, never read)
        bias_max = prod if cosine else bias.max()
        sample_bias = prod if cosine else bias[::step]
        group = _sample_group(prod.shape[1], n_sel, cfg["sample_group"])
        if group > 1:
            keys = ops.knn_group_minima(prod, sample_bias, scale, not cosine, group).T
            tau = ops.knn_threshold(keys, query_k, keys, bias_max, keys, 1.0, margin, n_sel,
                                    False, False, not cosine, False)
        else:
            tau = ops.knn_threshold(prod, query_k, sample_bias, bias_max, prod, scale, margin,
                                    n_sel, True, not cosine, not cosine, False)
    fine = cfg["refine_step"]
    if fine and step >= 4 * fine:
        sub_vals, _ = _candidates(query_k, bank, bias, tau, scale, not cosine, n_sel, precision,
                                  cfg, fine, refine=True)
        if small:
            kth = sub_vals.topk(n_sel, dim=1, largest=False, sorted=False).values.amax(dim=1)
            tau = torch.minimum(tau, _bound(kth, query_k, bias_or_none, scale, rel_error))
        else:
            tau = ops.knn_threshold(sub_vals, query_k, sub_vals, bias_max, tau, 1.0, margin,
                                    n_sel, False, False, not cosine, True)
    return tau


def fused_knn_search(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    *,
    metric: str = "euclidean",
    bank_sq_norms: torch.Tensor | None = None,
    _config: dict[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact k nearest neighbours with the fused Triton kernel (CUDA only).

    Same contract as :func:`selectorch.functional.knn_search`: distances sorted ascending,
    euclidean distances recomputed exactly (fp32) for the chosen neighbours, cosine distance
    ``1 - cos`` against a bank that is already L2-normalised. The candidates are chosen from
    scores computed in the bank's dtype (fp32 accumulation); for fp32 banks the products use
    three tf32 passes (fp32 accuracy) unless ``torch.set_float32_matmul_precision`` allows
    tf32. A few more than ``k`` candidates are re-ranked with exact distances.

    Args:
        query: ``(B, D)`` queries, any floating dtype (cast to the bank's dtype for the
            products; the exact distances use the query in fp32).
        bank: ``(M, D)`` reference rows, fp32, bf16 or fp16, on the query's CUDA device.
        k: Number of neighbours, ``1 <= k <= min(MAX_K, M)``.
        metric: ``"euclidean"`` or ``"cosine"``.
        bank_sq_norms: Optional ``(M,)`` squared row norms (euclidean only; best in fp32).
            Computed here, at the cost of one more read of the bank, when omitted.
        _config: Kernel options: block sizes, register cap, samples (benchmarks and tests).

    Returns:
        ``(distances, indices)``, both ``(B, k)``; distances in the promoted dtype of query
        and bank, indices int64.

    Raises:
        ValueError: If ``metric`` is unknown or :func:`supports` rejects the inputs.

    Example:
        >>> bank = torch.randn(10_000, 128, device="cuda", dtype=torch.bfloat16)
        >>> d, i = fused_knn_search(torch.randn(4, 128, device="cuda"), bank, 5)
        >>> d.shape, i.shape
        (torch.Size([4, 5]), torch.Size([4, 5]))
    """
    if metric not in METRICS:
        raise ValueError(f"Expected argument `metric` to be one of {METRICS}, got {metric!r}.")
    if not supports(query, bank, k):
        raise ValueError(
            "fused_knn_search needs Triton, query (B, D) and bank (M, D) on one CUDA device, a "
            f"bank in {BANK_DTYPES} with unit stride along D, D a multiple of 16 and "
            f"1 <= k <= min({MAX_K}, M); got query {tuple(query.shape)} {query.dtype} on "
            f"{query.device}, bank {tuple(bank.shape)} {bank.dtype} on {bank.device}, k={k}. "
            "Check selectorch.search.supports() and use selectorch.functional.knn_search."
        )
    # the kernels fix their own dtypes; autocast would round the sample's scores to bf16
    with torch.autocast(query.device.type, enabled=False):
        return _fused_search(query, bank, k, metric, bank_sq_norms, _config)


def _fused_search(
    query: torch.Tensor,
    bank: torch.Tensor,
    k: int,
    metric: str,
    bank_sq_norms: torch.Tensor | None,
    config: dict[str, Any] | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    ops = _kernels()
    n_query, dim = query.shape
    n_bank = bank.shape[0]
    out_dtype = torch.promote_types(query.dtype, bank.dtype)
    cosine = metric == "cosine"
    if cosine:
        # contiguous: knn_finish reads each query row as one run (a transposed input keeps
        # its layout through normalize)
        query_f = normalize_rows(query.float()).contiguous()
        bias, scale = query_f, -1.0  # bias unused
    else:
        # the exact distances read the query in fp32 from its own dtype (exact for fp16, bf16
        # and fp32); fp64 is rounded to fp32 first, as the plain path does
        query_f = (query if query.dtype != torch.float64 else query.float()).contiguous()
        if not stored_norms_usable(bank_sq_norms):  # none, or half (overflowed or coarse)
            bank_sq_norms = torch.linalg.vector_norm(bank, dim=1, dtype=torch.float32).square()
        bias, scale = bank_sq_norms.to(torch.float32).contiguous(), -2.0
    # (a no-op when the query already has the bank's dtype; fp16/bf16/fp32 convert directly
    # with one rounding, as through fp32)
    query_k = query_f.to(bank.dtype).contiguous()
    n_sel = _n_selected(k, n_bank)
    cfg = _default_config(n_query, dim, bank.dtype)
    if config:
        cfg.update(config)
    precision = _fp32_precision() if bank.dtype == torch.float32 else "tf32"
    tau = _threshold(query_k, bank, bias, scale, cosine, n_sel, precision, cfg)
    values, cand = _candidates(query_k, bank, bias, tau, scale, not cosine, n_sel, precision,
                               cfg)
    # merge the splits: the bank rows of the n_sel smallest candidate scores (B, n_sel)
    if n_query >= SELECT_MIN_QUERIES:
        chosen = ops.knn_select(values, cand, n_sel)
    else:
        pos = values.topk(n_sel, dim=1, largest=False, sorted=False).indices
        chosen = cand.gather(1, pos)
    return ops.knn_finish(query_f, bank, chosen, k, cosine, out_dtype)
