"""Table 2's arithmetic: the average, and the best of the seeds per prompt ("10-Pass").

The paper: "For each method, we calculated both global averages and 10-Pass averages (taking the
best result from 10 outputs per prompt for averaging)." Here, per metric and method:

- Avg: the mean over every image that has a score (a failed score is left out and counted);
- N-Pass: per pair and prompt, the best score over its seeds; then the mean over those groups
  (a group none of whose seeds has a score is left out). N is the number of seeds.

Both are given over all pairs ("overall") and per pair. Pure Python: no torch.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Cell:
    """One metric for one method over some images."""

    avg: float | None
    best: float | None  # the N-Pass value
    images: int  # images with a score
    failed: int  # images whose score failed
    groups: int  # (pair, prompt) groups with a score


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def cell(records: Iterable[dict], metric: str) -> Cell:
    """Avg and N-Pass of `metric` over `records` (dicts with `pair`, `prompt`, `seed`, `metrics`, `errors`)."""
    scored: list[float] = []
    failed = 0
    groups: dict[tuple, list[float]] = defaultdict(list)
    for record in records:
        value = record.get("metrics", {}).get(metric)
        if value is None:
            failed += metric in record.get("errors", {})
            continue
        scored.append(float(value))
        groups[(record["pair"], record["prompt"])].append(float(value))
    best = [max(values) for values in groups.values()]
    return Cell(avg=_mean(scored), best=_mean(best), images=len(scored), failed=failed, groups=len(groups))


def table(records: list[dict], metrics: Iterable[str], methods: Iterable[str]) -> dict:
    """`{metric: {method: {"overall": Cell, "pairs": {pair: Cell}}}}` as plain dicts."""
    result: dict = {}
    for metric in metrics:
        result[metric] = {}
        for method in methods:
            mine = [record for record in records if record["method"] == method]
            pairs = sorted({record["pair"] for record in mine})
            result[metric][method] = {
                "overall": asdict(cell(mine, metric)),
                "pairs": {pair: asdict(cell([r for r in mine if r["pair"] == pair], metric)) for pair in pairs},
            }
    return result


def pass_label(seeds: int) -> str:
    """"10-Pass" for 10 seeds: the best of that many images per prompt."""
    return f"{seeds}-Pass"
