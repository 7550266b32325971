"""What dps-train says after a DPS run that ends clearly under-confident (issue 27, item 5).

The test set's labels are clean, so the trainer can see what a user's own loop cannot: the
model's mean top confidence against its accuracy. When the confidence is lower by at least
``GAP`` the note names the likely cause and the remedy that measured best
(docs/results.md §6):

- a short schedule: each pass discounts the prior once, so after E passes it still holds
  ``gamma^E * s0 / (gamma^E * s0 + (1 - gamma^E) / (1 - gamma))`` of a row's mass (s0: the
  prior's mass). At the trainer's digits defaults (30 epochs, c = 100, gamma = 0.95) that is
  58%: the targets are still mostly the given labels, noisy ones included. 100 epochs took
  digits with 30% symmetric noise from ECE 33.2% to 7.8% with tau_e auto;
- a fixed tau_e: ``--tau-e auto`` (the ResNet grid's sym40: ECE 16.5% -> 6.6%);
- otherwise: a temperature fitted on clean held-out data (``calibration.fit_temperature``).
"""
from __future__ import annotations

GAP = 0.10          # accuracy - mean confidence: "clearly" under-confident
PRIOR_SHARE = 0.20  # above this share of the mass the prior still sets the targets


def prior_share(c: float, gamma: float, passes: int, off_label_mass: float = 0.0) -> float:
    """The prior's share of a row's mass after ``passes`` updates (docs/method.md §2)."""
    kept = gamma ** passes * c * (1 + off_label_mass)
    evidence = passes if gamma == 1 else (1 - gamma ** passes) / (1 - gamma)
    return kept / (kept + evidence)


def under_confidence_note(method: str, final: dict, c: float, gamma: float, epochs: int, tau_e,
                          tau_e_adapt: float = 0.0) -> str | None:
    """One line for a DPS run whose test accuracy exceeds its mean confidence by GAP, else None."""
    conf = final.get("mean_confidence")
    if not method.startswith("dps") or conf is None or final["accuracy"] - conf < GAP:
        return None
    head = (f"{method} ended under-confident: mean confidence {100 * conf:.1f}% for {100 * final['accuracy']:.1f}% "
            f"accuracy (ECE {final['ece_pct']:.1f}%)")
    share = prior_share(c, gamma, epochs)
    if share > PRIOR_SHARE:
        return (f"{head}. After {epochs} epochs the prior still holds {100 * share:.0f}% of each row's mass "
                f"(c {c:g}, gamma {gamma:g}), so the targets are still mostly the given labels: train longer "
                f"(digits, 30% noise: 100 epochs instead of 30 took ECE 33% -> 8% with --tau-e auto)")
    if tau_e != "auto" and not tau_e_adapt:
        return f"{head}: try --tau-e auto (ResNet, 40% symmetric noise: ECE 16.5% -> 6.6%)"
    return (f"{head}: fit a temperature on clean held-out data (dps_fast.calibration.fit_temperature; "
            f"ResNet sym40 with tau_e auto: ECE 7.1% -> 1.4%)")
