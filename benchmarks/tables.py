"""Result records of the solver benchmarks (``accuracy_per_nfe.py``, ``defaults_per_budget.py``): one dictionary per
run with ``problem, impl, label, kind, budget, tol, steps, schedule, nfe`` and its errors (``rmse``,
``rmse_median_sample``, ``sw2``, ...), or ``error`` for a run that raised. Here: which run a table cell shows and
the best run of a library within a budget.

Nothing here is part of the ``sdediff`` package; the scripts import this file by its plain name (benchmarks/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

PRIMARY = {"ode": "rmse", "sde": "sw2"}


def cell_record(recs: Sequence[dict[str, Any]], budget: int, metric: str) -> dict[str, Any] | None:
    """The run shown under an NFE budget: the fixed-step run for that budget, or the best adaptive run
    (and for k-diffusion rows grouped over schedules, the best schedule) that used at most ``budget`` NFE."""
    if any(r.get("budget") is not None for r in recs):
        pool = [r for r in recs if r.get("budget") == budget]
    else:
        pool = [r for r in recs if r.get("nfe") is not None and r["nfe"] <= budget]
    good = [r for r in pool if "error" not in r and math.isfinite(r.get(metric, math.nan))]
    if good:
        return min(good, key=lambda r: r[metric])
    return pool[0] if pool else None


def is_custom(r: dict[str, Any]) -> bool:
    """A diffusers run on one of sdediff's grids (``timesteps=``, ``sigmas=``, ``trained_betas``)."""
    return str(r.get("schedule") or "").startswith("custom:")


def rows(records: Sequence[dict[str, Any]], kind: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Records by table row: one per (impl, label); diffusers' schedules pooled into a row of its standard schedules
    and one of sdediff's grids passed in (each cell then shows the best, and names it)."""
    out: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["kind"] == kind:
            label = r["label"]
            if r["impl"] == "diffusers":
                label = label.split(" [")[0] + (" [sdediff grids]" if is_custom(r) else " [own schedules]")
            out.setdefault((r["impl"], label), []).append(r)
    return out


def best_by_impl(records: Sequence[dict[str, Any]], kind: str, impl: str, budget: int,
                 standard: bool = True) -> dict[str, Any] | None:
    """The run of ``impl`` with the lowest error within ``budget`` (``standard``: diffusers on its own schedules only)."""
    metric = PRIMARY[kind]
    pool = [r for r in records if not (standard and is_custom(r))]
    cands = [cell_record(recs, budget, metric) for (im, _), recs in rows(pool, kind).items() if im == impl]
    cands = [r for r in cands if r is not None and "error" not in r and r["nfe"] <= budget
             and math.isfinite(r.get(metric, math.nan))]
    return min(cands, key=lambda r: r[metric]) if cands else None


def versus(ours: dict[str, Any] | None, theirs: dict[str, Any] | None) -> tuple[str, str]:
    """``(RMSE ratio, median ratio)`` of two runs, sdediff's over the peer's, as text (``—`` if one is missing)."""
    if ours is None or theirs is None:
        return "—", "—"
    return (f"{ours['rmse'] / theirs['rmse']:.2f}",
            f"{ours['rmse_median_sample'] / theirs['rmse_median_sample']:.2f}")
