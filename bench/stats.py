"""Figures: repetitions summarised as median/min/max, latency percentiles, result rows.

A row pairs the project's figure with the raw ceiling measured for the same work in the
same run; the ratio between the two medians is what holds on a noisy machine, not the
absolute figures. Nothing here asserts anything about time.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Figure:
    """One quantity measured over several repetitions."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: list[float] | tuple[float, ...]) -> Figure:
        if not values:
            raise ValueError("a figure needs at least one value")
        return cls(tuple(float(v) for v in values))

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def min(self) -> float:
        return min(self.values)

    @property
    def max(self) -> float:
        return max(self.values)

    def as_json(self) -> dict[str, Any]:
        return {
            "median": self.median,
            "min": self.min,
            "max": self.max,
            "values": list(self.values),
        }


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted samples."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Row:
    """One line of the results table.

    `ratio` is project median / ceiling median. `better` says which way is good ("higher"
    for throughput, "lower" for latency and bytes) and `target` is the ratio we hold
    ourselves to (None when the issue sets none), so `met` can be printed beside it.
    """

    scenario: str
    name: str
    unit: str
    project: Figure
    ceiling: Figure
    ceiling_name: str
    better: str = "higher"
    target: float | None = None
    # A target on the project's own figure (in `unit`), for rows the issue sets one on.
    absolute_target: float | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        if self.ceiling.median == 0:
            return float("inf") if self.project.median else 1.0
        return self.project.median / self.ceiling.median

    @property
    def met(self) -> bool | None:
        if self.target is not None:
            value, goal = self.ratio, self.target
        elif self.absolute_target is not None:
            value, goal = self.project.median, self.absolute_target
        else:
            return None
        return value >= goal if self.better == "higher" else value <= goal

    def as_json(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "name": self.name,
            "unit": self.unit,
            "project": self.project.as_json(),
            "ceiling": {"name": self.ceiling_name, **self.ceiling.as_json()},
            "ratio": self.ratio,
            "better": self.better,
            "target": self.target,
            "absolute_target": self.absolute_target,
            "met": self.met,
            "notes": self.notes,
            "extra": self.extra,
        }


def fmt(value: float) -> str:
    """Compact human figure: 1234567 -> 1.23M, 0.000123 -> 0.000123."""
    magnitude = abs(value)
    if magnitude >= 1e6:
        return f"{value / 1e6:.2f}M"
    if magnitude >= 1e4:
        return f"{value / 1e3:.1f}k"
    if magnitude >= 100:
        return f"{value:.0f}"
    if magnitude >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_figure(figure: Figure) -> str:
    if len(figure.values) == 1:
        return fmt(figure.median)
    return f"{fmt(figure.median)} [{fmt(figure.min)}-{fmt(figure.max)}]"


def table(rows: list[Row]) -> str:
    """The rows as a Markdown table (also readable on a terminal)."""
    header = (
        "| scenario | figure | unit | project median [min-max] | ceiling | "
        "ceiling median [min-max] | ratio | target |"
    )
    lines = [header, "|" + "---|" * 8]
    for row in rows:
        sign = ">=" if row.better == "higher" else "<="
        verdict = "ok" if row.met else "MISSED"
        if row.target is not None:
            target = f"{sign} {row.target:g}x {verdict}"
        elif row.absolute_target is not None:
            target = f"{sign} {fmt(row.absolute_target)} {row.unit} {verdict}"
        else:
            target = "-"
        lines.append(
            f"| {row.scenario} | {row.name} | {row.unit} | {fmt_figure(row.project)} | "
            f"{row.ceiling_name} | {fmt_figure(row.ceiling)} | {row.ratio:.2f}x | {target} |"
        )
    return "\n".join(lines)
