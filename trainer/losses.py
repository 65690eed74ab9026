"""The CMKD loss and the FixMatch loss as pure functions of logits (docs/METHOD.md, the loss).

Notation: ``h`` is the task head (student), ``g`` the text head (teacher, on the *current*
encoder); ``p_h = softmax(h(f(x_t)))``, ``p_g = softmax(g(f(x_t)))``; ``sg`` is stop-gradient.

    L = L_cls + λ1·λ(t)·[GI_alpha(p_h) + GI_{1−alpha}(p_m)] + λ2·CE(g(f(x_s)), y_s) + λ3·λ(t)·GI_1(p_g)

Every function here is free of state and side effects so that each term can be checked against
hand-computed values; the training loop only feeds logits in and reads the returned terms.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import CMKDWeights

__all__ = [
    "DEFAULT_WEIGHTS",
    "CMKDWeights",
    "calibration",
    "classification_loss",
    "cmkd_loss",
    "fixmatch_loss",
    "gini_impurity",
    "ramp",
    "source_only_loss",
]

Terms = dict[str, torch.Tensor]
# The method's coefficients, for callers that do not pass their own.
DEFAULT_WEIGHTS = CMKDWeights()


def ramp(step: int, gamma: float = 1.0, max_iter: int = 10_000) -> float:
    """``λ(t) = 2 / (1 + exp(−gamma·min(t, T)/T)) − 1``: 0 at the start, ≈0.462 from ``t = T`` on."""
    p = min(step, max_iter) / max_iter
    return 2.0 / (1.0 + math.exp(-gamma * p)) - 1.0


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, smoothing: float
) -> torch.Tensor:
    """``L_cls``: mean cross-entropy against ``(1 − ε)·onehot + ε/C`` targets."""
    return F.cross_entropy(logits.float(), labels, label_smoothing=smoothing)


def calibration(logits_h: torch.Tensor, logits_g: torch.Tensor) -> torch.Tensor:
    """``alpha_i = sg(exp(−KL(p_g,i ‖ p_h,i)))``, with ``KL(p‖q) = Σ_k p_k (log p_k − log q_k)``.

    Computed from log-softmax, so a probability that underflows to 0 contributes 0, never NaN.
    """
    with torch.no_grad():
        log_h = F.log_softmax(logits_h.float(), dim=1)
        log_g = F.log_softmax(logits_g.float(), dim=1)
        kl = (log_g.exp() * (log_g - log_h)).sum(dim=1)
        return torch.exp(-kl)


def gini_impurity(probs: torch.Tensor, weights: torch.Tensor | float = 1.0) -> torch.Tensor:
    """``GI_w(P) = Σ_i w_i (1 − Σ_k P_ik² / sg(n_k))`` with the class mass ``n_k = Σ_j P_jk``.

    ``n_k`` is a sum over the batch (as in the reference code). A class whose mass underflows to
    exactly 0 has ``P_ik = 0`` for every row, so its term is 0; the clamp keeps it from being 0/0.
    """
    mass = probs.sum(dim=0).detach().clamp_min(torch.finfo(probs.dtype).tiny)
    return (weights * (1.0 - (probs.pow(2) / mass).sum(dim=1))).sum()


def source_only_loss(
    src_logits_h: torch.Tensor, labels: torch.Tensor, weights: CMKDWeights = DEFAULT_WEIGHTS
) -> Terms:
    """The baseline: ``L = L_cls``."""
    cls = classification_loss(src_logits_h, labels, weights.label_smoothing)
    return {"total": cls, "cls": cls.detach(), "w_cls": cls.detach()}


def cmkd_loss(
    src_logits_h: torch.Tensor,
    src_logits_g: torch.Tensor,
    tgt_logits_h: torch.Tensor,
    tgt_logits_g: torch.Tensor,
    labels: torch.Tensor,
    step: int,
    weights: CMKDWeights = DEFAULT_WEIGHTS,
) -> Terms:
    """The full CMKD loss at schedule position ``step`` (``t`` of ``λ(t)``), and each of its terms.

    A training session passes its 1-based iteration (the steps done, this one included), so the
    first step of a ``T``-step run weighs the target terms by ``λ(1/T)`` and the last by ``λ(T)``.

    Returns:
        ``total`` (differentiable) and, detached for logging: ``cls``, ``gi_h`` (GI_alpha(p_h)),
        ``gi_m`` (GI_{1−alpha}(p_m)), ``ce_g`` (the teacher's source CE), ``gi_g`` (GI_1(p_g)),
        ``alpha`` (batch mean) and ``ramp`` (λ(t)), all unweighted; and each term as it enters
        ``total`` (its coefficient and ramp applied): ``w_cls``, ``w_gi_h``, ``w_gi_m``,
        ``w_ce_g``, ``w_gi_g``, which add up to ``total``.
    """
    lam = ramp(step, weights.ramp_gamma, weights.ramp_iters)
    cls = classification_loss(src_logits_h, labels, weights.label_smoothing)
    p_h = F.softmax(tgt_logits_h.float(), dim=1)
    p_g = F.softmax(tgt_logits_g.float(), dim=1)
    alpha = calibration(tgt_logits_h, tgt_logits_g)
    p_m = 0.5 * (p_h + p_g.detach())
    gi_h = gini_impurity(p_h, alpha)
    gi_m = gini_impurity(p_m, 1.0 - alpha)
    ce_g = F.cross_entropy(src_logits_g.float(), labels)
    gi_g = gini_impurity(p_g)
    weighted = {
        "w_cls": cls,
        "w_gi_h": weights.lambda1 * lam * gi_h,
        "w_gi_m": weights.lambda1 * lam * gi_m,
        "w_ce_g": weights.lambda2 * ce_g,
        "w_gi_g": weights.lambda3 * lam * gi_g,
    }
    total = sum(weighted.values(), torch.zeros((), device=cls.device))
    return {
        **{k: v.detach() for k, v in weighted.items()},
        "total": total,
        "cls": cls.detach(),
        "gi_h": gi_h.detach(),
        "gi_m": gi_m.detach(),
        "ce_g": ce_g.detach(),
        "gi_g": gi_g.detach(),
        "alpha": alpha.mean(),
        "ramp": torch.tensor(lam),
    }


def _pseudo_label_ce(
    weak_logits: torch.Tensor, strong_logits: torch.Tensor, threshold: float
) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        confidence, pseudo = F.softmax(weak_logits.float(), dim=1).max(dim=1)
        mask = (confidence >= threshold).float()
    ce = F.cross_entropy(strong_logits.float(), pseudo, reduction="none")
    return (ce * mask).mean(), mask.mean()


def fixmatch_loss(
    weak_logits_h: torch.Tensor,
    weak_logits_g: torch.Tensor,
    strong_logits_h: torch.Tensor,
    strong_logits_g: torch.Tensor,
    threshold: float = 0.95,
    weight: float = 0.5,
) -> Terms:
    """``L_fm``: each head learns, on the strong view, its own confident weak-view predictions.

    ``L_fm = λ_fm·mean_i[1(max p_h ≥ τ)·CE(h(x_strong), argmax p_h)] + (the same for g)``, with
    the pseudo-labels and the mask detached. The mean runs over the whole batch, masked rows
    counting as 0, as in the reference.

    Returns:
        ``total`` and, detached: ``fm_h``, ``fm_g`` (weighted; also as ``w_fm_h``, ``w_fm_g``, the
        names the run's summary of weighted terms reads) and ``fm_mask_h``, ``fm_mask_g`` (the
        fraction of rows above the threshold).
    """
    fm_h, mask_h = _pseudo_label_ce(weak_logits_h, strong_logits_h, threshold)
    fm_g, mask_g = _pseudo_label_ce(weak_logits_g, strong_logits_g, threshold)
    total = weight * fm_h + weight * fm_g
    return {
        "total": total,
        "fm_h": weight * fm_h.detach(),
        "fm_g": weight * fm_g.detach(),
        "w_fm_h": weight * fm_h.detach(),
        "w_fm_g": weight * fm_g.detach(),
        "fm_mask_h": mask_h,
        "fm_mask_g": mask_g,
    }
