"""The ``/catalog`` page for people: plain server-rendered HTML with inline SVG charts, so it
works offline (no CDN, no script)."""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlencode

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem;color:#1d2330;background:#fafbfc}
h1{margin:0 0 .2rem}p.sub{color:#5b6475;margin:0 0 1.2rem}
table{border-collapse:collapse;width:100%;background:#fff;box-shadow:0 1px 2px #0001}
th,td{padding:.45rem .6rem;border-bottom:1px solid #e6e8ee;text-align:left;vertical-align:top}
th{background:#f1f3f7;font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px;color:#3b4252}.alias{display:inline-block;background:#e3f1e8;color:#1d6b3a;
border-radius:3px;padding:0 .35rem;margin-right:.2rem;font-size:12px}
details summary{cursor:pointer;color:#2457b5}svg text{font:11px system-ui,sans-serif;fill:#333}
nav{margin:1rem 0}nav a{margin-right:1rem}form{margin:0 0 1rem}
"""


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


def layer_chart(rows: list[tuple[str, int, int | None]]) -> str:
    """A horizontal bar chart (SVG) of changed weights per layer."""
    top = max((c for _, c, _ in rows), default=0) or 1
    bar_h, label_w, bar_w = 14, 190, 300
    height = bar_h * len(rows) + 6
    parts = [f'<svg class="layer-chart" role="img" aria-label="changed weights per layer" width="{label_w + bar_w + 150}" '
             f'height="{height}" xmlns="http://www.w3.org/2000/svg">']  # fmt: skip
    for i, (layer, count, size) in enumerate(rows):
        y = i * bar_h + 3
        width = 0 if count == 0 else max(1.0, bar_w * count / top)
        share = f" ({count / size:.3%})" if size else ""
        parts.append(
            f'<text x="0" y="{y + 10}">{html.escape(layer[-30:])}</text>'
            f'<rect x="{label_w}" y="{y}" width="{width:.1f}" height="{bar_h - 3}" fill="#4a7bd0" data-count="{count}"/>'
            f'<text x="{label_w + width + 4:.1f}" y="{y + 10}">{count:,}{share}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _accuracy(metrics: Mapping[str, Any]) -> str:
    for key in ("target_accuracy", "target_acc", "accuracy", "acc"):
        value = metrics.get(key)
        if isinstance(value, int | float):
            return f"{value:.1%}" if value <= 1 else f"{value:.1f}%"
    return "–"


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def render(
    records: Iterable[Any],
    *,
    total: int,
    limit: int,
    offset: int,
    task: str | None,
    base_label: str,
    shapes: Mapping[str, tuple[int, ...]] | None,
    base_fingerprint: str | None,
) -> str:
    e = html.escape
    rows = []
    for r in records:
        same_base = base_fingerprint == r.base_fingerprint
        dense = r.eligible_params * 4
        ratio = f"{dense / r.size_bytes:,.0f}×" if r.size_bytes else "–"
        chart = layer_chart(layer_counts(r.param_counts, shapes if same_base else None))
        aliases = "".join(f'<span class="alias">{e(a)}</span>' for a in r.aliases)
        rows.append(
            f'<tr class="adapter" data-task="{e(r.task)}" data-version="{r.version}">'
            f"<td><b>{e(r.task)}</b></td><td class=num>v{r.version}</td><td>{aliases}</td>"
            f"<td>{e(r.source_domain) or '–'} → {e(r.target_domain) or '–'}</td><td>{e(r.method) or '–'}</td>"
            f"<td class=num>{_accuracy(r.metrics)}</td><td class=num>{r.density:.3%}</td>"
            f"<td class=num>{r.nnz:,}</td><td class=num>{_size(r.size_bytes)}</td><td class=num>{ratio}</td>"
            f"<td><details><summary>layers</summary>{chart}</details>"
            f"<code title='{e(r.digest)}'>{e(r.digest[:12])}</code></td></tr>"
        )
    nav = []
    query = {"task": task} if task else {}
    if offset > 0:
        nav.append(
            f'<a href="?{e(urlencode({**query, "offset": max(0, offset - limit), "limit": limit}))}">← previous</a>'
        )
    if offset + limit < total:
        nav.append(
            f'<a href="?{e(urlencode({**query, "offset": offset + limit, "limit": limit}))}">next →</a>'
        )
    shown = (
        f"{offset + 1}–{min(offset + limit, total)} of {total}"
        if total
        else "no adapters registered yet"
    )
    empty = (
        ""
        if rows
        else '<tr><td colspan="11">Nothing here. Register one with <code>POST /admin/adapters</code> or <code>deltaclip adapters register</code>.</td></tr>'
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>deltaclip catalog</title>
<meta name="viewport" content="width=device-width,initial-scale=1"><style>{_CSS}</style></head>
<body><h1>deltaclip catalog</h1>
<p class="sub">Serving base <code>{e(base_label)}</code>. Each row is one adapter version: a sparse residual over
the base's image tower plus a task head. Compression is against a dense float32 copy of the tower.</p>
<form method="get"><input name="task" placeholder="filter by task" value="{e(task or "")}">
<button>filter</button></form>
<table><thead><tr><th>task</th><th>version</th><th>aliases</th><th>domains</th><th>method</th><th>target acc.</th>
<th>density</th><th>changed weights</th><th>size</th><th>compression</th><th>where it changed</th></tr></thead>
<tbody>{"".join(rows) or empty}</tbody></table>
<nav><span id="shown">{shown}</span> {" ".join(nav)}</nav>
</body></html>"""
