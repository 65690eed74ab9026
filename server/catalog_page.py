"""The ``/catalog`` page for people: server-rendered HTML with inline SVG charts, so it works
offline (no CDN, no script).

This module turns catalog records into plain values (numbers formatted, layers grouped, bars
measured); the markup is the Jinja2 template ``templates/catalog.html``, rendered with
autoescaping, so no catalog text reaches the page unescaped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape

_ENV = Environment(
    loader=PackageLoader("server", "templates"),
    autoescape=select_autoescape(["html"]),
    keep_trailing_newline=False,
)


def layer_of(param: str) -> str:
    """Group a parameter into its layer: up to the last index of the first numbered block."""
    parts = param.removeprefix("visual.").split(".")
    out: list[str] = []
    seen_index = False
    for part in parts[:-1] if len(parts) > 1 else parts:
        if seen_index and not part.isdigit():
            break
        out.append(part)
        seen_index = seen_index or part.isdigit()
    return ".".join(out) or param


def layer_counts(
    param_counts: Mapping[str, int], shapes: Mapping[str, tuple[int, ...]] | None
) -> list[tuple[str, int, int | None]]:
    """``(layer, changed, layer size or None)`` in the tower's parameter order where known."""
    order = list(shapes) if shapes else sorted(param_counts)
    changed: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for name in order:
        layer = layer_of(name)
        changed.setdefault(layer, 0)
        if shapes and name in shapes:
            n = 1
            for d in shapes[name]:
                n *= d
            sizes[layer] = sizes.get(layer, 0) + n
    for name, count in param_counts.items():
        changed[layer_of(name)] = changed.get(layer_of(name), 0) + int(count)
    return [(layer, count, sizes.get(layer)) for layer, count in changed.items()]


@dataclass(frozen=True)
class Bar:
    """One layer's bar: its top, its label and count, its width in pixels."""

    y: int
    label: str
    count: int
    width: float
    text: str


@dataclass(frozen=True)
class LayerChart:
    """A horizontal bar chart of changed weights per layer, measured for the SVG."""

    bars: list[Bar]
    bar_height: int = 14
    label_width: int = 190
    bar_width: int = 300

    @property
    def width(self) -> int:
        return self.label_width + self.bar_width + 150

    @property
    def height(self) -> int:
        return self.bar_height * len(self.bars) + 6


def layer_chart(rows: list[tuple[str, int, int | None]]) -> LayerChart:
    """The bars for ``(layer, changed, layer size)`` rows, scaled to the largest count."""
    top = max((c for _, c, _ in rows), default=0) or 1
    chart = LayerChart([])
    for i, (layer, count, size) in enumerate(rows):
        width = 0 if count == 0 else max(1.0, chart.bar_width * count / top)
        share = f" ({count / size:.3%})" if size else ""
        chart.bars.append(
            Bar(i * chart.bar_height + 3, layer[-30:], count, width, f"{count:,}{share}")
        )
    return chart


def _accuracy(metrics: Mapping[str, Any]) -> str:
    """The adapter's accuracy as text; "–" for anything that is not a sane number. Registration
    refuses such values, but a store can hold rows from before, and one row must never break
    the page for everyone (a 4,000-digit integer does not even convert to a float)."""
    for key in ("target_accuracy", "target_acc", "accuracy", "acc"):
        value = metrics.get(key) if isinstance(metrics, Mapping) else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not -1e6 < value < 1e6 or value != value:  # huge, infinite or NaN
                return "–"
            return f"{value:.1%}" if value <= 1 else f"{value:.1f}%"
    return "–"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def _alias_label(alias: str, share: float) -> str:
    """``production``, or ``production 90%`` for a version of a weighted alias."""
    return alias if share == 100 else f"{alias} {share:g}%"


def _usage(r: Any) -> dict[str, Any]:
    return {
        "requests": f"{r.requests:,}",
        "images": f"{r.images:,}",
        "errors": f"{r.errors:,}",
        "last_served": (r.last_served_at or "never")[:19].replace("T", " "),
    }


def _row(r: Any, shapes: Mapping[str, tuple[int, ...]] | None, same_base: bool) -> dict[str, Any]:
    dense = r.eligible_params * 4
    return {
        **_usage(r),
        "task": r.task,
        "version": r.version,
        "aliases": [_alias_label(a, share) for a, share in r.alias_shares.items()],
        "source_domain": r.source_domain,
        "target_domain": r.target_domain,
        "method": r.method,
        "accuracy": _accuracy(r.metrics),
        "density": f"{r.density:.3%}",
        "nnz": f"{r.nnz:,}",
        "size": _size(r.size_bytes),
        "ratio": f"{dense / r.size_bytes:,.0f}×" if r.size_bytes else "–",
        "chart": layer_chart(layer_counts(r.param_counts, shapes if same_base else None)),
        "digest": r.digest,
    }


SORT_LABELS = {
    "task": "task",
    "requests": "most requests",
    "images": "most images",
    "errors": "most errors",
    "last_served": "last served",
}


def render(
    records: Iterable[Any],
    *,
    total: int,
    limit: int,
    offset: int,
    task: str | None,
    sort: str = "task",
    base_label: str,
    shapes: Mapping[str, tuple[int, ...]] | None,
    base_fingerprint: str | None,
) -> str:
    """The page for one slice of the catalog (records as the registry lists them).

    Layer sizes (``shapes``) are only used for adapters trained on the serving base, whose
    layers they describe.
    """
    rows = [_row(r, shapes, base_fingerprint == r.base_fingerprint) for r in records]
    query: dict[str, Any] = {"task": task} if task else {}
    if sort != "task":
        query["sort"] = sort
    previous = (
        urlencode({**query, "offset": max(0, offset - limit), "limit": limit})
        if offset > 0
        else None
    )
    following = (
        urlencode({**query, "offset": offset + limit, "limit": limit})
        if offset + limit < total
        else None
    )
    shown = (
        f"{offset + 1}–{min(offset + limit, total)} of {total}"
        if total
        else "no adapters registered yet"
    )
    return _ENV.get_template("catalog.html").render(
        rows=rows,
        task=task,
        sort=sort,
        sorts=SORT_LABELS,
        base_label=base_label,
        shown=shown,
        previous=previous,
        next=following,
    )
