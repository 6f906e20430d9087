"""The report of :func:`selectorch.evaluate`: a row per score, as text, Markdown, JSON, plots."""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["BenchReport", "Column"]


def _fraction(value: float) -> str:
    return f"{value:.3f}"


def _small(value: float) -> str:
    return f"{value:.4f}"


def _seconds(value: float) -> str:
    return f"{value:.2f}"


def _rate(value: float) -> str:
    return f"{value:,.0f}"


def _count(value: float) -> str:
    return f"{value:g}"


#: Cost columns, shown when the rows have them: the score's class attributes, then timings.
_COST = (
    ("requires_grad", "input\ngrad"),
    ("passes", "passes"),
    ("compile_clean", "full\ngraph"),
)


@dataclass(frozen=True)
class Column:
    """A column of the report's table.

    Attributes:
        key: Key of the value in each row.
        header: Text of the header cell; a ``"\n"`` splits it over two lines in
            :meth:`BenchReport.table` (Markdown joins them with a space).
        fmt: Formats a (finite) value.
        higher_is_better: Direction of the metric; ``None`` for descriptive columns.
    """

    key: str
    header: str
    fmt: Callable[[float], str] = _fraction
    higher_is_better: bool | None = None


@dataclass
class BenchReport:
    """What :func:`selectorch.evaluate` measured: one row per score.

    Attributes:
        rows: One dict of plain values per score, in the order given: ``score``, ``layer``,
            ``accuracy``, ``auroc:NAME``, ``fpr:NAME``, ``kept:NAME`` per OOD set,
            ``auroc_mean``, ``fpr_mean``, ``aurc``, ``augrc``, ``aurc_open``, ``coverage``,
            ``risk``, ``threshold``, the cost: ``requires_grad``, ``passes``,
            ``compile_clean`` (the score's class attributes), ``fit_s``,
            ``score_rows_per_s`` and ``rate_includes_model`` (whether the model's passes are
            in those timings: yes for scores that run the model on the raw data).
        meta: The setting: model, device, calibration target, OOD set names, rows and
            recording time per dataset, total seconds, versions.
        raw: Per score the tensors behind the rows: ``calibration`` (sorted calibration
            scores), ``test`` ``(N,)`` scores, ``ood`` ``{name: (M,)}`` scores, ``correct``
            ``(N,)`` bool (or ``None``) and ``threshold``; used by :meth:`save` for plots.

    Example:
        >>> report = BenchReport(
        ...     rows=[{"score": "energy", "layer": "logits", "accuracy": 0.99, "aurc": 0.001,
        ...            "augrc": 0.001, "coverage": 0.95, "risk": 0.002, "fit_s": 0.01,
        ...            "score_rows_per_s": 1e6}],
        ...     meta={"ood": []})
        >>> print(report.table())
        score   layer   accuracy    AURC   AUGRC  coverage   risk  fit s     scored
                                                                          rows/s
        ------  ------  --------  ------  ------  --------  -----  -----  ---------
        energy  logits     0.990  0.0010  0.0010     0.950  0.002   0.01  1,000,000
    """

    rows: list[dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    # -- columns ------------------------------------------------------------------------------

    @property
    def ood_names(self) -> list[str]:
        """Names of the OOD sets, in the order given to :func:`~selectorch.evaluate`."""
        return list(self.meta.get("ood", []))

    def columns(self) -> list[Column]:
        """The columns of :meth:`table` and :meth:`to_markdown`, in order."""
        tpr = round(100 * float(self.meta.get("tpr", 0.95)))
        cols = [Column("score", "score"), Column("layer", "layer"),
                Column("accuracy", "accuracy", higher_is_better=True)]
        for name in self.ood_names:
            cols.append(Column(f"auroc:{name}", f"AUROC\n{name}", higher_is_better=True))
            cols.append(Column(f"fpr:{name}", f"FPR@{tpr}\n{name}", higher_is_better=False))
        if len(self.ood_names) > 1:
            cols.append(Column("auroc_mean", "AUROC\nmean", higher_is_better=True))
            cols.append(Column("fpr_mean", f"FPR@{tpr}\nmean", higher_is_better=False))
        cols += [
            Column("aurc", "AURC", _small, higher_is_better=False),
            Column("augrc", "AUGRC", _small, higher_is_better=False),
            Column("coverage", "coverage"),
            Column("risk", "risk", higher_is_better=False),
        ]
        cols += [
            Column(key, header, _count) for key, header in _COST
            if any(key in row for row in self.rows)
        ]
        cols += [
            Column("fit_s", "fit s", _seconds, higher_is_better=False),
            Column("score_rows_per_s", "scored\nrows/s", _rate, higher_is_better=True),
        ]
        if any("rate_includes_model" in row for row in self.rows):
            cols.append(Column("rate_includes_model", "rate incl.\nmodel"))
        return cols

    def notes(self) -> list[str]:
        """What the cost columns count, one sentence each (empty for reports without them)."""
        if not any("rate_includes_model" in row for row in self.rows):
            return []
        lines = [
            "input grad: the score needs gradients w.r.t. the input; passes: forward passes of "
            "the model per batch; full graph: torch.compile(fullgraph=True) gives one graph.",
            "fit s and scored rows/s: with 'rate incl. model' = yes they include the model's "
            "passes (the score runs the model itself on the raw data); with 'no' they time "
            "the score alone on recorded features.",
        ]
        splits = self.meta.get("splits", {})
        rates = [info.get("rows_per_s") for info in splits.values()]
        rates = [r for r in rates if isinstance(r, (int, float)) and math.isfinite(r)]
        if rates:
            lines.append(
                f"Recording (one forward pass of the model) ran at {min(rates):,.0f} to "
                f"{max(rates):,.0f} rows/s over the splits (report.meta['splits'])."
            )
        return lines

    def _cells(self) -> tuple[list[str], list[list[str]], list[bool]]:
        cols = self.columns()
        body = []
        for row in self.rows:
            cells = []
            for col in cols:
                value = row.get(col.key)
                if isinstance(value, bool):
                    cells.append("yes" if value else "no")
                elif isinstance(value, (int, float)):
                    cells.append(col.fmt(value) if math.isfinite(value) else str(value))
                else:
                    cells.append("" if value is None else str(value))
            body.append(cells)
        numeric = [col.key not in ("score", "layer") for col in cols]
        return [col.header for col in cols], body, numeric

    # -- renderings ---------------------------------------------------------------------------

    def table(self) -> str:
        """The rows as a plain-text table, one line per score (for a terminal)."""
        header, body, numeric = self._cells()
        split = [(h.split("\n") + [""])[:2] for h in header]
        heads = [[top for top, _ in split], [bottom for _, bottom in split]]
        if not any(heads[1]):
            heads = heads[:1]
        widths = [
            max(len(r[i]) for r in [*heads, *body]) for i in range(len(header))
        ]

        def line(cells: list[str], align: bool) -> str:
            return "  ".join(
                c.rjust(w) if num and align else c.ljust(w)
                for c, w, num in zip(cells, widths, numeric, strict=True)
            ).rstrip()

        rules = "  ".join("-" * w for w in widths)
        return "\n".join(
            [*(line(h, True) for h in heads), rules, *(line(r, True) for r in body)]
        )

    def to_markdown(self) -> str:
        """The rows as a Markdown table, preceded by a line on the setting."""
        header, body, numeric = self._cells()
        align = ["---:" if num else ":---" for num in numeric]
        lines = [self.summary(), ""] if "splits" in self.meta else []
        header = [h.replace("\n", " ") for h in header]
        lines += ["| " + " | ".join(cells) + " |" for cells in (header, align, *body)]
        notes = self.notes()
        if notes:
            lines += ["", *notes]
        return "\n".join(lines)

    def summary(self) -> str:
        """One sentence on the setting: model, dataset sizes, calibration target, time."""
        splits = self.meta.get("splits", {})
        sizes = ", ".join(f"{name} {info['rows']:,}" for name, info in splits.items())
        target = self.meta.get("target", {})
        if "risk" in target:
            goal = f"risk <= {target['risk']} with probability {1 - target['delta']:.2f}"
        else:
            goal = f"coverage {target.get('coverage')}"
        seconds = self.meta.get("seconds")
        took = f", {seconds:.1f} s" if isinstance(seconds, (int, float)) else ""
        return (
            f"{self.meta.get('model', 'model')} on {self.meta.get('device', '?')}; rows: {sizes}; "
            f"threshold calibrated for {goal}{took}."
        )

    def to_dict(self) -> dict[str, Any]:
        """``{"meta": ..., "rows": [...]}`` with plain Python values (``nan`` as ``None``)."""

        def plain(value: Any) -> Any:
            if isinstance(value, float) and not math.isfinite(value):
                return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
            if isinstance(value, dict):
                return {k: plain(v) for k, v in value.items()}
            if isinstance(value, (list, tuple)):
                return [plain(v) for v in value]
            return value

        return {"meta": plain(self.meta), "rows": plain(self.rows)}

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON (see :meth:`to_dict`)."""
        return json.dumps(self.to_dict(), indent=indent)

    def best(self, key: str = "auroc_mean") -> str:
        """Label of the score with the best value in column ``key`` (NaN rows skipped).

        Raises:
            ValueError: ``key`` is not a column with a direction, or no row has a value.
        """
        ranked = {c.key: c.higher_is_better for c in self.columns()}
        if self.ood_names:
            ranked.update({"auroc_mean": True, "fpr_mean": False})
        ranked = {k: v for k, v in ranked.items() if v is not None}
        if key not in ranked:
            raise ValueError(f"Expected argument `key` to be one of {sorted(ranked)}, got {key!r}.")
        rows = [r for r in self.rows if isinstance(r.get(key), float) and not math.isnan(r[key])]
        if not rows:
            raise ValueError(f"No score has a value for {key!r}.")
        pick = max if ranked[key] else min
        return pick(rows, key=lambda r: r[key])["score"]

    def __str__(self) -> str:
        return self.table()

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    # -- files --------------------------------------------------------------------------------

    def save(self, directory: str | os.PathLike, *, plots: bool = True) -> Path:
        """Write the report to ``directory`` (created; files already there are replaced).

        Files: ``report.md`` (setting and table), ``report.txt`` (the plain table),
        ``report.json`` (:meth:`to_dict`), ``scores.pt`` (the per-sample scores of
        :attr:`raw`, tensors only: ``torch.load(path, weights_only=True)`` reads it) and, with
        ``plots`` and matplotlib installed, ``risk_coverage.png`` (every score on the test set),
        ``risk_coverage_open.png`` (test and OOD sets together, OOD predictions counted as
        wrong) plus ``plots/LABEL-risk_coverage.png`` and ``plots/LABEL-densities.png`` per
        score.

        Args:
            directory: Where to write.
            plots: Draw the figures (skipped with a warning when matplotlib is missing).

        Returns:
            The directory as a ``Path``.
        """
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        (root / "report.md").write_text(self.to_markdown() + "\n")
        (root / "report.txt").write_text(self.table() + "\n")
        (root / "report.json").write_text(self.to_json() + "\n")
        torch.save(self._raw_tensors(), root / "scores.pt")
        if plots and self.raw:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                warnings.warn(
                    "matplotlib is not installed: the report's plots were skipped "
                    "(pip install 'selectorch[plot]').",
                    stacklevel=2,
                )
            else:
                self._save_plots(root)
        return root

    def _raw_tensors(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for label, raw in self.raw.items():
            entry = {k: raw[k] for k in ("calibration", "test") if raw.get(k) is not None}
            if raw.get("correct") is not None:
                entry["correct"] = raw["correct"]
            entry.update({f"ood:{name}": s for name, s in raw.get("ood", {}).items()})
            entry["threshold"] = torch.tensor(float(raw.get("threshold", math.nan)))
            out[label] = entry
        return out

    def _save_plots(self, root: Path) -> None:
        from selectorch.plot import plot_risk_coverage, plot_score_densities

        folder = root / "plots"
        folder.mkdir(exist_ok=True)
        with_labels = {k: v for k, v in self.raw.items() if v.get("correct") is not None}
        if with_labels:
            curves = {k: (v["test"], v["correct"]) for k, v in with_labels.items()}
            fig = _all_risk_coverage(curves, "in-distribution test")
            fig.savefig(root / "risk_coverage.png", dpi=100)
            if self.ood_names:
                open_curves = {}
                for label, raw in with_labels.items():
                    ood = list(raw["ood"].values())
                    wrong = torch.zeros(sum(s.numel() for s in ood), dtype=torch.bool)
                    open_curves[label] = (
                        torch.cat([raw["test"], *ood]),
                        torch.cat([raw["correct"], wrong]),
                    )
                fig = _all_risk_coverage(open_curves, "test + OOD (OOD predictions are wrong)")
                fig.savefig(root / "risk_coverage_open.png", dpi=100)
        for label, raw in self.raw.items():
            name = _file_name(label)
            threshold = raw.get("threshold")
            threshold = threshold if threshold is not None and math.isfinite(threshold) else None
            if raw.get("correct") is not None:
                fig = plot_risk_coverage(raw["test"], raw["correct"], threshold=threshold)
                fig.suptitle(label)
                fig.savefig(folder / f"{name}-risk_coverage.png", dpi=100)
            ood = list(raw.get("ood", {}).values())
            fig = plot_score_densities(
                calibration=raw["calibration"] if raw["calibration"].numel() else None,
                test=raw["test"],
                ood=torch.cat(ood) if ood else None,
                threshold=threshold,
            )
            fig.suptitle(label)
            fig.savefig(folder / f"{name}-densities.png", dpi=100)


def _all_risk_coverage(curves: dict[str, tuple[torch.Tensor, torch.Tensor]], title: str) -> Any:
    """One figure with the risk-coverage curve of every score (and the oracle once)."""
    from matplotlib.figure import Figure

    from selectorch.plot import plot_risk_coverage

    fig = Figure(figsize=(7.0, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for i, (label, (score, correct)) in enumerate(curves.items()):
        first = len(ax.lines)
        plot_risk_coverage(score, correct, oracle=i == 0, ax=ax)
        line = ax.lines[first]  # the score's curve (the oracle follows it)
        line.set_label(f"{label}: {line.get_label()}")
        line.set_linestyle("-" if i < 10 else ":")  # 10 colours, then dotted
    ax.legend(loc="upper left", fontsize="x-small")
    ax.set_title(title, fontsize="small")
    return fig


def _file_name(label: str) -> str:
    """A file-name-safe version of a score label."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "score"
