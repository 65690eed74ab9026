"""The model host: one base model on one device, patched per adapter by the serving worker.

Only the batcher's worker thread calls :meth:`Engine.run`, :meth:`Engine.restore_base`,
:meth:`Engine.reset` and :meth:`Engine.verify` (or, while no worker runs, the runtime restarting
it); the live weights are therefore mutated by exactly one thread. Preparing adapters
(:meth:`prepare`) reads only the pristine host copy and may run on any thread.

Switching is exception-safe: whatever fails partway through a patch or a restore, the live
weights end as the pristine base and :attr:`Engine.current` as None, so the record of what is
patched and the weights never disagree.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from adapters_store.adapter import Adapter
from adapters_store.bases import BaseSignature, base_fingerprint
from adapters_store.head import TaskHead, head_from_state
from adapters_store.zeroshot import class_embeddings

from .corrections import Correction, NotMixable
from .images import EvalTransforms, Transform
from .metrics import Metrics
from .mixed import Mixer, Part
from .patcher import FlatPatcher, PreparedResidual

log = logging.getLogger("deltaclip.server")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(eq=False)
class PreparedAdapter:
    """Everything the worker needs to answer for one adapter (identity is the digest)."""

    task: str
    version: int
    digest: str
    class_names: list[str]
    head: TaskHead
    residual: PreparedResidual
    correction: Correction | None = None  # the mixed path's form (None: patched path only)

    @property
    def nbytes(self) -> int:
        head = sum(t.numel() * t.element_size() for t in self.head.state_dict().values())
        mixed = self.correction.nbytes if self.correction is not None else 0
        return self.residual.nbytes + head + mixed


class Engine:
    def __init__(
        self,
        net: nn.Module,
        signature: BaseSignature,
        device: str,
        dtype: str,
        metrics: Metrics | None = None,
        mixed: bool = True,
    ) -> None:
        self.signature = signature
        self.metrics = metrics
        self.device = torch.device(device)
        self.dtype = DTYPES[dtype]
        self.net = net.eval().to(self.device)
        self.visual: nn.Module = net.visual.to(self.dtype)  # type: ignore[assignment]
        self.transforms = EvalTransforms(self.net)
        self.patcher = FlatPatcher(self.visual)
        self.mixer = Mixer(self.visual, self.patcher) if mixed else None  # unmerged path
        # The identity of the weights as served (after the dtype cast): restored weights must match it.
        self.serving_fingerprint = base_fingerprint(self.net)
        self.current: PreparedAdapter | None = None
        self.swaps = 0
        self.failed_switches = 0
        self.resets = 0  # whole-base resets after a failed switch or a worker restart
        self._dirty = False  # set while a switch or reset is in progress or after it failed
        self._text_lock = threading.Lock()

    def transform_for(self, train_config: dict[str, Any] | None = None) -> Transform:
        """The evaluation transform at the size an adapter was trained at (the base's native size
        for zero-shot); :class:`~server.images.EvalTransforms` defines it, this base holds one."""
        return self.transforms.for_config(train_config)

    def prepare(self, record: Any, adapter: Adapter) -> PreparedAdapter:
        head = head_from_state(adapter.head).to(self.device)
        correction = None
        if self.mixer is not None:
            try:
                correction = self.mixer.prepare(adapter.residual)
            except NotMixable as exc:
                log.info(
                    "%s v%s is served by the patched path only: %s",
                    record.task,
                    record.version,
                    exc,
                )
        return PreparedAdapter(
            task=record.task,
            version=record.version,
            digest=record.digest,
            class_names=list(adapter.meta.class_names),
            head=head,
            residual=self.patcher.prepare(adapter),
            correction=correction,
        )

    def _switch(self, target: PreparedAdapter | None) -> None:
        """Make ``target`` the patched adapter (None: the bare base).

        Exception-safe: if restoring the current adapter or patching the target raises partway,
        the live weights are reset to the pristine base as a whole and the record says "no
        adapter" before the error leaves, so :attr:`current` and the live weights never
        disagree (the next request for either adapter patches it afresh).
        """
        if self.current is target and not self._dirty:
            return
        try:
            if self._dirty:  # an earlier reset failed: start again from the pristine base
                self.reset()
            self._dirty = True  # until the weights are known to match the record again
            if self.current is not None:
                self.patcher.restore(self.current.residual)
            self.current = None
            if target is not None:
                self.patcher.patch(target.residual)
                self.swaps += 1
                if self.metrics is not None:
                    self.metrics.swaps.inc()
            self.current = target
            self._dirty = False
        except BaseException:
            self.failed_switches += 1
            log.error("adapter switch failed; resetting the live weights to the pristine base")
            self.current = None
            self.reset()  # if this raises too, _dirty stays set and the next switch retries it
            raise

    def reset(self) -> None:
        """The exact base from the pristine copy, recorded as "no adapter" (the recovery path
        after a failed switch or a worker restart; never needed by a switch that succeeds)."""
        self._dirty = True
        self.current = None
        self.patcher.reset()
        self._dirty = False
        self.resets += 1

    def verify(self) -> bool:
        """True when the live weights are exactly what :attr:`current` says (worker thread only;
        reads, repairs nothing)."""
        if self._dirty:
            return False
        return self.patcher.matches(self.current.residual if self.current is not None else None)

    @torch.inference_mode()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.visual(images.to(self.device, self.dtype)).float()

    @torch.inference_mode()
    def run(self, adapter: PreparedAdapter, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities ``[N, C]`` of ``adapter``'s task for a batch of images."""
        self._switch(adapter)
        return self.head_probs(adapter, self.features(images))

    @torch.inference_mode()
    def run_zero_shot(self, text_embeddings: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Probabilities of the base's text head (CLIP zero-shot) over the given label embeddings."""
        self._switch(None)
        return self.zero_shot_probs(text_embeddings, self.features(images))

    @torch.inference_mode()
    def head_probs(self, adapter: PreparedAdapter, features: torch.Tensor) -> torch.Tensor:
        return adapter.head(features).softmax(-1).cpu()

    @torch.inference_mode()
    def zero_shot_probs(
        self, text_embeddings: torch.Tensor, features: torch.Tensor
    ) -> torch.Tensor:
        z = nn.functional.normalize(features, dim=-1)
        scale = self.net.logit_scale.exp().float()  # type: ignore[operator]
        return (scale * z @ text_embeddings.to(self.device).T).softmax(-1).cpu()

    @torch.inference_mode()
    def run_mixed(self, parts: list[Part], images: torch.Tensor) -> torch.Tensor:
        """Image features ``[N, D]`` (float32) of one forward of the untouched base over rows of
        several tasks, each part's correction added on its rows (docs/API.md: what is exact).
        The base is restored first if an adapter is patched; the live weights are only read."""
        if self.mixer is None:
            raise NotMixable("the mixed path is off")
        self._switch(None)
        with self.mixer.applied(parts):
            return self.features(images)

    def restore_base(self) -> None:
        self._switch(None)

    def base_fingerprint(self) -> str:
        """The fingerprint of the weights now (worker thread only). Hashes the live weights as
        they are: callers restore the base first (a normal switch) after :meth:`verify`."""
        return base_fingerprint(self.net)

    @torch.inference_mode()
    def text_embeddings(self, labels: list[str]) -> torch.Tensor:
        """The base's class embeddings for ``labels`` (its text side is never patched).

        Raises:
            UnmappedLabel: the default base's WordNet head cannot place a label (a 400).
        """
        sig = self.signature
        with self._text_lock:
            return class_embeddings(self.net, sig.model, sig.pretrained, labels)
