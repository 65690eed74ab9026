"""Every CMKD term against values computed by hand (plain Python floats, docs/METHOD.md formulas)."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.losses import (
    CMKDWeights,
    calibration,
    classification_loss,
    cmkd_loss,
    fixmatch_loss,
    gini_impurity,
    ramp,
    source_only_loss,
)

# Two source and two target rows over three classes.
SRC_H = [[1.0, 2.0, 3.0], [1.0, 0.0, -1.0]]
SRC_G = [[0.5, -0.5, 2.0], [2.0, 1.0, 0.0]]
TGT_H = [[2.0, 0.5, -1.0], [0.0, 1.5, 1.0]]
TGT_G = [[1.0, 1.0, 0.0], [-1.0, 3.0, 0.5]]
LABELS = [2, 0]


def softmax(row: list[float]) -> list[float]:
    e = [math.exp(v) for v in row]
    return [v / sum(e) for v in e]


def ce(row: list[float], y: int, eps: float = 0.0) -> float:
    p = softmax(row)
    q = [(1 - eps) * (k == y) + eps / len(row) for k in range(len(row))]
    return -sum(qk * math.log(pk) for qk, pk in zip(q, p, strict=True))


def gi(P: list[list[float]], w: list[float]) -> float:
    n = [sum(row[k] for row in P) for k in range(len(P[0]))]
    return sum(
        wi * (1 - sum(row[k] ** 2 / n[k] for k in range(len(row))))
        for wi, row in zip(w, P, strict=True)
    )


def alpha(h: list[float], g: list[float]) -> float:
    ph, pg = softmax(h), softmax(g)
    return math.exp(-sum(a * (math.log(a) - math.log(b)) for a, b in zip(pg, ph, strict=True)))


def t(rows: list[list[float]], grad: bool = False) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64, requires_grad=grad)


def test_ramp_at_key_steps() -> None:
    assert ramp(0) == 0.0
    assert ramp(5_000) == pytest.approx(2 / (1 + math.exp(-0.5)) - 1)  # 0.244918662...
    assert ramp(5_000) == pytest.approx(0.2449186624)
    assert ramp(10_000) == pytest.approx(0.4621171573)
    assert ramp(20_000) == ramp(10_000)  # it stops at T
    assert ramp(50, gamma=2.0, max_iter=100) == pytest.approx(2 / (1 + math.exp(-1.0)) - 1)


def test_classification_loss_with_label_smoothing() -> None:
    # Row 0: log p = [1,2,3] - log(e+e²+e³) = [-2.4076, -1.4076, -0.4076]; q = [1/30, 1/30, 28/30].
    row0 = -(
        0.1 / 3 * (-2.4076059644) + 0.1 / 3 * (-1.4076059644) + (0.9 + 0.1 / 3) * (-0.4076059644)
    )
    assert ce(SRC_H[0], 2, 0.1) == pytest.approx(row0)
    expected = (ce(SRC_H[0], 2, 0.1) + ce(SRC_H[1], 0, 0.1)) / 2
    got = classification_loss(t(SRC_H), torch.tensor(LABELS), 0.1)
    assert float(got) == pytest.approx(expected, rel=1e-6)
    assert float(classification_loss(t(SRC_H), torch.tensor(LABELS), 0.0)) == pytest.approx(
        (ce(SRC_H[0], 2) + ce(SRC_H[1], 0)) / 2, rel=1e-6
    )


def test_calibration_is_exp_minus_kl_teacher_to_student_and_detached() -> None:
    h, g = t(TGT_H, grad=True), t(TGT_G, grad=True)
    a = calibration(h, g)
    assert not a.requires_grad
    assert a.tolist() == pytest.approx([alpha(TGT_H[0], TGT_G[0]), alpha(TGT_H[1], TGT_G[1])])
    # KL(p_g || p_h), not KL(p_h || p_g): the two differ on these rows.
    reverse = alpha(TGT_G[0], TGT_H[0])
    assert a[0].item() != pytest.approx(reverse)
    assert calibration(h, h).tolist() == pytest.approx([1.0, 1.0])


def test_gini_impurity_with_class_mass_normaliser() -> None:
    P = [[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]
    # n = [0.8, 0.5, 0.7]; row 0: 1 - (0.49/0.8 + 0.04/0.5 + 0.01/0.7) = 0.29321428...
    # row 1: 1 - (0.01/0.8 + 0.09/0.5 + 0.36/0.7) = 0.29321428... (equal: with two rows
    # sum_k (P_0k² - P_1k²) / n_k = sum_k (P_0k - P_1k) = 0), so the weights 0.5 and 2 tell.
    row0 = 1 - (0.49 / 0.8 + 0.04 / 0.5 + 0.01 / 0.7)
    row1 = 1 - (0.01 / 0.8 + 0.09 / 0.5 + 0.36 / 0.7)
    got = gini_impurity(t(P), torch.tensor([0.5, 2.0], dtype=torch.float64))
    assert float(got) == pytest.approx(0.5 * row0 + 2.0 * row1)
    assert float(got) == pytest.approx(gi(P, [0.5, 2.0]))
    assert float(gini_impurity(t(P))) == pytest.approx(row0 + row1)  # a sum over rows, no mean


def test_gini_impurity_normaliser_is_stop_gradient() -> None:
    P = t([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], grad=True)
    w = torch.tensor([0.5, 2.0], dtype=torch.float64)
    gini_impurity(P, w).backward()
    n = P.detach().sum(0)
    # d/dP_ik [w_i (1 - sum_k P_ik² / n_k)] with n_k constant = -2 w_i P_ik / n_k.
    assert torch.allclose(P.grad, -2 * w[:, None] * P.detach() / n)


def test_gini_impurity_survives_an_underflowed_class() -> None:
    P = t([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    assert torch.isfinite(gini_impurity(P))


@pytest.mark.parametrize("step", [0, 5_000, 10_000, 20_000])
def test_full_cmkd_loss_against_hand_values(step: int) -> None:
    w = CMKDWeights(lambda1=0.25, lambda2=0.1, lambda3=0.025, label_smoothing=0.1)
    terms = cmkd_loss(t(SRC_H), t(SRC_G), t(TGT_H), t(TGT_G), torch.tensor(LABELS), step, w)
    ph = [softmax(r) for r in TGT_H]
    pg = [softmax(r) for r in TGT_G]
    a = [alpha(h, g) for h, g in zip(TGT_H, TGT_G, strict=True)]
    pm = [[(x + y) / 2 for x, y in zip(rh, rg, strict=True)] for rh, rg in zip(ph, pg, strict=True)]
    cls = (ce(SRC_H[0], 2, 0.1) + ce(SRC_H[1], 0, 0.1)) / 2
    gi_h, gi_m = gi(ph, a), gi(pm, [1 - x for x in a])
    ce_g = (ce(SRC_G[0], 2) + ce(SRC_G[1], 0)) / 2
    gi_g = gi(pg, [1.0, 1.0])
    lam = 2 / (1 + math.exp(-min(step, 10_000) / 10_000)) - 1
    total = cls + 0.25 * lam * (gi_h + gi_m) + 0.1 * ce_g + 0.025 * lam * gi_g
    for name, value in [
        ("cls", cls),
        ("gi_h", gi_h),
        ("gi_m", gi_m),
        ("ce_g", ce_g),
        ("gi_g", gi_g),
    ]:
        assert float(terms[name]) == pytest.approx(value, rel=1e-6), name
    assert float(terms["ramp"]) == pytest.approx(lam)
    assert float(terms["total"]) == pytest.approx(total, rel=1e-6)
    if step == 0:  # no ramp yet: only the supervised terms
        assert float(terms["total"]) == pytest.approx(cls + 0.1 * ce_g, rel=1e-6)


def test_no_gradient_flows_through_the_stop_gradient_terms() -> None:
    """With λ2 = λ3 = 0 the teacher's target logits only enter through sg(alpha) and sg(p_g)."""
    g = t(TGT_G, grad=True)
    h = t(TGT_H, grad=True)
    w = CMKDWeights(lambda1=0.25, lambda2=0.0, lambda3=0.0)
    cmkd_loss(t(SRC_H), t(SRC_G), h, g, torch.tensor(LABELS), 10_000, w)["total"].backward()
    assert g.grad is not None and torch.count_nonzero(g.grad) == 0
    assert h.grad is not None and torch.count_nonzero(h.grad) > 0


def test_source_only_is_the_classification_loss() -> None:
    terms = source_only_loss(t(SRC_H), torch.tensor(LABELS))
    assert float(terms["total"]) == pytest.approx((ce(SRC_H[0], 2, 0.1) + ce(SRC_H[1], 0, 0.1)) / 2)


def test_cmkd_loss_is_finite_with_clip_scale_teacher_logits() -> None:
    """s = 100 makes probabilities underflow to exactly 0; log-softmax and the clamp keep it finite."""
    tgt_g = torch.tensor([[100.0, -100.0, -100.0], [100.0, -100.0, -100.0]])
    terms = cmkd_loss(
        torch.tensor(SRC_H), torch.tensor(SRC_G), torch.tensor(TGT_H), tgt_g,
        torch.tensor(LABELS), 10_000,
    )  # fmt: skip
    assert all(torch.isfinite(v).all() for v in terms.values())


def test_fixmatch_thresholded_pseudo_labels_for_both_heads() -> None:
    weak_h = t([[4.0, 0.0, 0.0], [0.2, 0.1, 0.0]], grad=True)  # row 0 confident (0.964), row 1 not
    weak_g = t([[0.0, 0.0, 0.1], [0.0, 5.0, 0.0]], grad=True)  # row 1 confident (0.987)
    strong_h = t([[1.0, 2.0, 0.0], [0.0, 0.0, 3.0]], grad=True)
    strong_g = t([[0.0, 1.0, 1.0], [2.0, 1.0, 0.0]], grad=True)
    terms = fixmatch_loss(weak_h, weak_g, strong_h, strong_g, threshold=0.95, weight=0.5)
    fm_h = 0.5 * (ce([1.0, 2.0, 0.0], 0) + 0.0) / 2  # row 0 pseudo-label 0; row 1 masked
    fm_g = 0.5 * (0.0 + ce([2.0, 1.0, 0.0], 1)) / 2  # row 1 pseudo-label 1; row 0 masked
    assert float(terms["fm_h"]) == pytest.approx(fm_h)
    assert float(terms["fm_g"]) == pytest.approx(fm_g)
    assert float(terms["total"].detach()) == pytest.approx(fm_h + fm_g)
    assert float(terms["fm_mask_h"]) == 0.5 and float(terms["fm_mask_g"]) == 0.5
    terms["total"].backward()
    assert weak_h.grad is None and weak_g.grad is None  # pseudo-labels are detached
    assert strong_h.grad is not None and strong_g.grad is not None
