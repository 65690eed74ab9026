"""The loss terms as they entered a run's total: kept in its metrics and shown to the user.

The weighted terms (``w_*``, docs/METHOD.md §2–§3) show the teacher at work: a run whose target
terms stay near zero trains without CMKD's knowledge transfer.
"""

from __future__ import annotations

from typing import Any


def loss_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """Each loss term as it entered the total (weighted), over the last epoch and at its last step.

    ``loss_terms``: the last epoch's mean of each weighted term; ``loss_terms_last_step``: the
    same at the final step, with ``ramp`` (λ at that step, λ(T) for a run that ends at T).
    """
    if not history or "last_step" not in history[-1]:
        return {}
    last = history[-1]
    means = {k: v for k, v in last["losses"].items() if k.startswith("w_")}
    return {"loss_terms": means, "loss_terms_last_step": dict(last["last_step"])}


# How each weighted loss term is named for a user (docs/METHOD.md §2, §3).
TERM_NAMES = {
    "w_cls": "L_cls",
    "w_ce_g": "λ2·CE_teacher(source)",
    "w_gi_h": "λ1·λ·GI_alpha(p_h)",
    "w_gi_m": "λ1·λ·GI_1-alpha(p_m)",
    "w_gi_g": "λ3·λ·GI(p_g)",
    "w_fm_h": "FixMatch head",
    "w_fm_g": "FixMatch teacher",
}


def loss_terms_line(last_step: dict[str, float]) -> str:
    """The final step's loss terms as they entered the total, and λ there (the teacher at work)."""
    terms = ", ".join(
        f"{label} {last_step[key]:.4f}" for key, label in TERM_NAMES.items() if key in last_step
    )
    ramp = f"; λ = {last_step['ramp']:.3f}" if "ramp" in last_step else ""
    return f"loss terms at the last step (weighted): {terms}{ramp}"
