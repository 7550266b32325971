"""dps-train's note on a run that ends under-confident (dps_fast/train/advice.py, issue 27 item 5)."""
import pytest
import torch

import dps_fast
from dps_fast.train.advice import GAP, prior_share, under_confidence_note


@pytest.mark.parametrize("gamma, passes", [(0.95, 1), (0.95, 30), (0.9, 7), (1.0, 5)])
def test_prior_share_is_what_a_bank_keeps_after_that_many_passes(gamma, passes):
    c, num_classes, off = 100.0, 10, 9e-4
    crit = dps_fast.DPSLoss(torch.tensor([3]), num_classes, c=c, gamma=gamma, off_label=off)
    gen = torch.Generator().manual_seed(0)
    for _ in range(passes):
        crit(torch.randn(1, num_classes, generator=gen, dtype=torch.float64).float(), torch.tensor([0]))
    row = crit.alpha[0].double()
    kept = gamma ** passes * c * (1 + off)  # every entry of the prior, discounted once a pass
    assert prior_share(c, gamma, passes, off) == pytest.approx(kept / float(row.sum()), rel=1e-5)


def final(acc, conf, ece=20.0):
    return {"accuracy": acc, "mean_confidence": conf, "ece_pct": ece}


def test_the_note_names_the_cause_that_applies():
    assert under_confidence_note("ce", final(0.9, 0.5), 100, 0.95, 30, 1.0) is None  # DPS runs only
    assert under_confidence_note("dps", final(0.9, 0.9 - GAP / 2), 100, 0.95, 30, 1.0) is None  # not clearly
    assert under_confidence_note("dps", {"accuracy": 0.9, "ece_pct": 5.0}, 100, 0.95, 30, 1.0) is None
    short = under_confidence_note("dps", final(0.944, 0.573), 100, 0.95, 30, 1.0)
    assert short.startswith("dps ended under-confident: mean confidence 57.3% for 94.4% accuracy")
    assert "the prior still holds 58% of each row's mass" in short and "train longer" in short
    assert "--tau-e auto" in under_confidence_note("dps+con", final(0.9, 0.7), 100, 0.95, 100, 1.0)
    assert "fit_temperature" in under_confidence_note("dps", final(0.9, 0.7), 100, 0.95, 100, "auto")
    # a --tau-e-adapt run cannot add --tau-e auto (the trainer refuses both): the last remedy
    assert "fit_temperature" in under_confidence_note("dps", final(0.9, 0.7), 100, 0.95, 100, 1.0, 2.0)
