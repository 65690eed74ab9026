"""The unmerged (mixed-task) forward: one pass of the untouched base over rows of many tasks.

:class:`Mixer` maps every parameter of the image tower to its site (:mod:`server.sites`) once,
prepares an adapter's correction form (:mod:`server.corrections`, off the worker, from the
pristine host copy of the base), and runs a forward pass in which each task's correction is
added on its own rows. The live weights are only read: a failure anywhere in a mixed forward
leaves them, and every other forward, as they were (the hooks are removed however it ends).

What is exact: each row equals the same image served alone by the patched path up to float
rounding, because ``(W + ΔW)·x`` is computed as ``W·x + ΔW·x`` (measured within 1e-5 relative in
float32 by tests/unit/test_mixed.py on the tiny ViT, EfficientNet-Lite0 and a ViT-B-16-shaped
tower). Rows with no correction (zero-shot) run the base as it is.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from open_clip.transformer import VisionTransformer
from torch import nn

from adapters_store.adapter import Residual

from .corrections import Correction, Delta, NotMixable, effective_delta
from .patcher import FlatPatcher
from .sites import (
    AttentionSite,
    BatchNormSite,
    ConvSite,
    EmbeddingSite,
    Handle,
    LayerNormSite,
    LinearSite,
    ProjectionSite,
    Site,
    Work,
)

Part = tuple[Correction | None, int]
"""A run of consecutive rows of a mixed batch: the correction they get (None: the base) and how
many rows."""


def _site_for(module: nn.Module, roles: dict[str, str]) -> Site | None:
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return LinearSite(module, roles)
    if isinstance(module, nn.Conv2d):
        return ConvSite(module, roles)
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        return LayerNormSite(module, roles)
    if isinstance(module, nn.BatchNorm2d):
        return BatchNormSite(module, roles)
    return None


class Mixer:
    """The tower's correction sites; prepares corrections and runs mixed forwards (the latter
    on the serving worker only)."""

    def __init__(self, tower: nn.Module, patcher: FlatPatcher) -> None:
        self.patcher = patcher
        prefix = patcher.prefix
        self.sites: list[Site] = []
        self.by_key: dict[str, tuple[Site, str]] = {}
        self.unsupported: dict[str, str] = {}  # key -> why no site takes it
        last: list[Site] = []  # sites that read other sites' corrected outputs: installed last
        inside: set[int] = set()  # modules a parent site handles (attention's out_proj)
        for name, module in tower.named_modules():
            path = prefix + (f"{name}." if name else "")
            own = {path + n: n for n, _ in module.named_parameters(recurse=False)}
            if isinstance(module, nn.MultiheadAttention):
                inside.add(id(module.out_proj))
                own |= {
                    path + "out_proj." + n: "out_proj." + n
                    for n, _ in module.out_proj.named_parameters()
                }
                self._add(own, lambda r, m=module: AttentionSite(m, r))
            elif id(module) in inside or not own:
                continue
            elif isinstance(module, VisionTransformer):
                emb = {
                    k: r for k, r in own.items() if r in ("class_embedding", "positional_embedding")
                }
                self._add(emb, lambda r, m=module: EmbeddingSite(m, r))
                proj = {k: r for k, r in own.items() if r == "proj"}
                self._add(proj, lambda r, m=module: ProjectionSite(m, r), last)
                rest = {k: r for k, r in own.items() if k not in emb and k not in proj}
                self.unsupported |= dict.fromkeys(rest, "no correction site")
            else:
                self._add(own, lambda r, m=module: _site_for(m, r))
        self.sites += last
        self.order = {id(s): i for i, s in enumerate(self.sites)}

    def _add(self, roles: dict[str, str], make: Any, into: list[Site] | None = None) -> None:
        if not roles:
            return
        try:
            site = make(roles)
        except NotMixable as exc:
            self.unsupported |= dict.fromkeys(roles, str(exc))
            return
        if site is None:
            self.unsupported |= dict.fromkeys(roles, "no correction site")
            return
        (self.sites if into is None else into).append(site)
        for key, role in roles.items():
            self.by_key[key] = (site, role)

    def prepare(self, residual: Mapping[str, Residual]) -> Correction:
        """The correction form of a residual (thread-safe: reads the pristine host copy).

        Raises:
            NotMixable: a changed parameter has no correction site.
        """
        out = Correction()
        by_site: dict[int, tuple[Site, dict[str, Delta]]] = {}
        for key, res in sorted(residual.items()):
            if key not in self.by_key:
                raise NotMixable(f"{key}: {self.unsupported.get(key, 'not a tower parameter')}")
            site, role = self.by_key[key]
            dtype, start, numel = self.patcher.offsets[key]
            pos, values = res.indices.to(torch.int64), res.values
            if res.block_size > 1:  # every position of each block, up to the parameter's end
                b = res.block_size
                pos = (pos[:, None] * b + torch.arange(b)).reshape(-1)
                inside = int(torch.searchsorted(pos, numel))  # increasing: a tail block is last
                pos, values = pos[:inside], values.reshape(-1)[:inside]
            base = self.patcher.pristine[dtype].index_select(0, pos + start)
            keep, delta = effective_delta(base, values)
            if not bool(keep.all()):  # (a boolean-mask index is ~100x slower than this here)
                sel = torch.nonzero(keep).flatten()
                if sel.numel() == 0:
                    continue
                pos, delta = pos.index_select(0, sel), delta.index_select(0, sel)
            d = site.delta(role, pos, delta, self.patcher.device)
            out.deltas[key] = d
            by_site.setdefault(id(site), (site, {}))[1][role] = d
        out.sites = sorted(by_site.values(), key=lambda sd: self.order[id(sd[0])])
        return out

    @contextlib.contextmanager
    def applied(self, parts: Sequence[Part]) -> Iterator[None]:
        """Within the block, a forward of the tower over the parts' rows adds each part's
        correction on its rows. Hooks are removed however the block ends."""
        runs: list[tuple[Correction, int, int]] = []  # consecutive rows of one correction
        start = 0
        for correction, n in parts:
            if runs and runs[-1][0] is correction and runs[-1][1] + runs[-1][2] == start:
                runs[-1] = (correction, runs[-1][1], runs[-1][2] + n)
            elif correction is not None and correction.sites:
                runs.append((correction, start, n))
            start += n
        work: dict[int, tuple[Site, Work]] = {}
        for correction, first, count in runs:
            for site, deltas in correction.sites:
                work.setdefault(id(site), (site, []))[1].append(((first, count), deltas))
        handles: list[Handle] = []
        try:
            for site, site_work in sorted(work.values(), key=lambda sw: self.order[id(sw[0])]):
                handles += site.install(site_work)
            yield
        finally:
            for handle in reversed(handles):
                handle.remove()
