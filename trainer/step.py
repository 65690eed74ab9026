"""One training session: the model, the optimiser, RST, and what a single step does.

The step is the reference's: SGD (Nesterov, momentum 0.9, weight decay 5e-4) over the image tower
(lr) and the task head (lr × multiplier), the per-iteration decay ``lr_t = lr·(1 + gamma·t)^−0.75``,
then RST after *every* optimiser step. Source, target (and strong) images go through the tower
in one batch (its BatchNorms are in eval mode, so that changes nothing) and through the task head
separately, so the head's BatchNorm sees per-domain batch statistics as in the reference.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from adapters_store.bases import tower_parameters
from adapters_store.head import TaskHead

from .config import TrainConfig
from .evaluate import predictions, report
from .execution import autocast
from .losses import cmkd_loss, fixmatch_loss, source_only_loss
from .model import CMKDModel, TextHead
from .rst import ResidualSparsity


class Session:
    """The trainable state of a run and the operations on it (step, evaluate, save, load)."""

    def __init__(
        self,
        cfg: TrainConfig,
        net: nn.Module,
        class_embeddings: torch.Tensor,
        logit_scale: float,
        device: torch.device,
    ) -> None:
        self.cfg = cfg
        self.device = device
        torch.manual_seed(cfg.seed)  # the head's N(0, 0.001²) init is part of the run's seed
        head = TaskHead(int(class_embeddings.shape[1]), int(class_embeddings.shape[0]))
        self.model = CMKDModel(net, head, TextHead(class_embeddings, logit_scale)).to(device)
        self.tower = tower_parameters(net)
        tau = float(cfg.require(cfg.tau, "tau"))
        self.rst = ResidualSparsity(
            self.tower, tau, cfg.max_density, cfg.block_size, cfg.budget_at_end
        )
        lr = float(cfg.require(cfg.lr, "lr"))
        mult = float(cfg.require(cfg.head_lr_mult, "head_lr_mult"))
        self.optimizer = torch.optim.SGD(
            [
                {"params": list(self.tower.values()), "base_lr": lr},
                {"params": self.model.head_parameters(), "base_lr": lr * mult},
            ],
            lr=lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.nesterov,
        )
        self.weights = cfg.loss_weights
        self.step = 0
        self._set_lr()
        self.model.train()
        # The module a training step calls: the model itself, or its DDP wrapper under torchrun.
        self.runner: nn.Module = self.model

    def distribute(self, device: torch.device) -> None:
        """Average gradients across ``torchrun`` ranks with DistributedDataParallel."""
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        self.runner = DistributedDataParallel(self.model, device_ids=ids)

    def _set_lr(self) -> None:
        decay = (1.0 + self.cfg.lr_gamma * self.step) ** (-self.cfg.lr_decay)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * decay

    @property
    def lrs(self) -> tuple[float, float]:
        """Current (tower, head) learning rates."""
        tower, head = self.optimizer.param_groups
        return float(tower["lr"]), float(head["lr"])

    def _to(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.device, non_blocking=True)

    def train_step(self, source: Any, target: Any) -> dict[str, torch.Tensor]:
        """One optimiser step on a (source, target) batch, then RST; returns the loss terms."""
        cfg = self.cfg
        xs, ys = self._to(source[0]), self._to(source[1])
        views = target[0] if cfg.fixmatch else [target[0]]
        # AdaBN: target batches pass through the head (train-mode BatchNorm) with no loss on them
        use_target = cfg.method == "cmkd" or cfg.fixmatch or cfg.adabn
        parts = [xs] + ([self._to(v) for v in views] if use_target else [])
        with autocast(self.device, cfg.amp):
            heads, teachers = self.runner(parts)
            src_h = heads[0]
            if use_target:
                tgt_h, tgt_g = heads[1], teachers[1]
            if cfg.method == "cmkd":
                # λ(t) at the 1-based iteration: the run's last step uses λ(T)
                terms = cmkd_loss(src_h, teachers[0], tgt_h, tgt_g, ys, self.step + 1, self.weights)
            else:
                terms = source_only_loss(src_h, ys, self.weights)
            if cfg.fixmatch:
                strong_h, strong_g = heads[2], teachers[2]
                fm = fixmatch_loss(
                    tgt_h, tgt_g, strong_h, strong_g, cfg.fixmatch_threshold, cfg.fixmatch_weight
                )
                terms = {**terms, **fm, "total": terms["total"] + fm["total"]}
        self.optimizer.zero_grad(set_to_none=True)
        terms["total"].backward()
        self.optimizer.step()
        self.rst.apply()
        self.step += 1
        self._set_lr()
        return {k: v.detach() for k, v in terms.items()}

    @torch.no_grad()
    def evaluate(self, loader: Any, class_names: list[str]) -> dict[str, Any]:
        """Target accuracy of the task head and of the text head (evaluation only)."""
        model = self.model

        def heads(images: torch.Tensor) -> dict[str, torch.Tensor]:
            features = model.features(images)
            return {"task": model.head(features), "text": model.teacher(features)}

        model.eval()
        try:
            with autocast(self.device, self.cfg.amp):
                preds, labels = predictions(loader, heads, self.device)
        finally:
            model.train()
        task = report(preds["task"], labels, class_names)
        return {**task, "teacher_accuracy": report(preds["text"], labels, class_names)["accuracy"]}

    def state(self) -> dict[str, Any]:
        """The trainable state for a checkpoint, as CPU copies (tower, head, optimiser, step)."""
        return {
            "step": self.step,
            "tower": {k: p.detach().cpu().clone() for k, p in self.tower.items()},
            "head": {k: v.detach().cpu().clone() for k, v in self.model.head.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }

    @torch.no_grad()
    def load_state(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state`: weights, momentum buffers, step and learning rates."""
        for key, p in self.tower.items():
            p.copy_(state["tower"][key])
        self.model.head.load_state_dict(state["head"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self._set_lr()
        self.rst.recount()

    def tower_state(self) -> dict[str, torch.Tensor]:
        """The trained tower ``W`` on CPU, keyed like the base."""
        return {k: p.detach().cpu().clone() for k, p in self.tower.items()}

    def base_state(self) -> dict[str, torch.Tensor]:
        """The base tower ``W0`` on CPU, as RST resets towards it."""
        return {k: v.cpu().clone() for k, v in self.rst.base.items()}

    def head_state(self) -> dict[str, torch.Tensor]:
        """The task head's parameters and buffers on CPU, as the adapter stores them."""
        return {k: v.detach().cpu().clone() for k, v in self.model.head.state_dict().items()}

    @torch.no_grad()
    def set_tower(self, state: dict[str, torch.Tensor]) -> None:
        """Replace the tower's weights (the snapped, served ones) and recount the changes."""
        for key, p in self.tower.items():
            p.copy_(state[key])
        self.rst.recount()
