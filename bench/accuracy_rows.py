"""The accuracy study's rows: a loss and a sparsity rule each, and which get more seeds."""

from __future__ import annotations

from dataclasses import dataclass

FROZEN_TAU = 1e9  # larger than any weight move: RST resets the whole tower after every step


@dataclass(frozen=True)
class Setting:
    """One row of the study: a loss, a sparsity rule, and whether it is a core row (more seeds)."""

    key: str
    label: str
    method: str
    tau: float
    max_density: float | None = None
    extra: tuple[str, ...] = ()  # further ``deltaclip train`` arguments
    core: bool = False
    lr_mult: float = 1.0  # the run's image-tower lr: the chosen lr × this
    variant_of: str | None = None  # a retention variant of this row (chosen on source-val)


def settings(budgets: list[float], budget_tau: float, block_budget: float) -> list[Setting]:
    """The study's rows; ``core`` rows get ``--core-seeds`` seeds, the others ``--other-seeds``."""
    rows = [
        Setting("source-only-ft", "source-only FT", "source-only", 0.0, core=True),
        # AdaBN control: target batches pass through the head in train mode, no target loss. It
        # separates the head's BatchNorm statistics from what CMKD's loss does.
        Setting(
            "adabn-ft",
            "source-only FT + AdaBN (target BN statistics)",
            "source-only",
            0.0,
            extra=("--adabn",),
            core=True,
        ),
        Setting("cmkd-ft", "CMKD FT", "cmkd", 0.0, core=True),
        # Ablation: CMKD without the terms that read the unlabelled target (λ1 = λ3 = 0).
        Setting(
            "cmkd-ft-no-target",
            "CMKD FT without its target terms (λ1 = λ3 = 0)",
            "cmkd",
            0.0,
            extra=("--lambda1", "0", "--lambda3", "0"),
            core=True,
        ),
        Setting("linear-probe", "linear probe (frozen tower)", "source-only", FROZEN_TAU),
        Setting("cmkd-fixmatch-ft", "CMKD + FixMatch FT", "cmkd", 0.0, extra=("--fixmatch",)),
    ]
    for d in budgets:
        rows.append(
            Setting(
                f"cmkd-rst-{d:g}",
                f"CMKD + RST ≤ {d:.2%}",
                "cmkd",
                budget_tau,
                d,
                core=d == max(budgets),
            )
        )
    rows.append(
        Setting(
            f"cmkd-rst-{block_budget:g}-b16",
            f"CMKD + RST ≤ {block_budget:.2%}, B = 16",
            "cmkd",
            budget_tau,
            block_budget,
            extra=("--block-size", "16"),
        )
    )
    # RST retention: variants of the largest budget's row that the method allows; the study
    # picks one on the source validation images (never the target's labels).
    top = max(budgets)
    base = f"cmkd-rst-{top:g}"
    rows += [
        Setting(
            f"{base}-end",
            f"CMKD + RST ≤ {top:.2%}, budget applied at the end",
            "cmkd",
            budget_tau,
            top,
            extra=("--budget-at-end",),
            variant_of=base,
        ),
        Setting(
            f"{base}-lr3x",
            f"CMKD + RST ≤ {top:.2%}, image-tower lr × 3",
            "cmkd",
            budget_tau,
            top,
            lr_mult=3.0,
            variant_of=base,
        ),
        Setting(
            f"{base}-lr10x",
            f"CMKD + RST ≤ {top:.2%}, image-tower lr × 10",
            "cmkd",
            budget_tau,
            top,
            lr_mult=10.0,
            variant_of=base,
        ),
    ]
    return rows
