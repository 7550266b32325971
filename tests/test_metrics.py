"""docs/method.md §6 metrics against torchmetrics, sklearn and hand-computed examples."""
import math

import pytest
import torch

from dps_fast import metrics as M


def test_ece_hand_computed_with_right_closed_bins():
    # 2 bins: (0, .5] and (.5, 1]; confidences exactly 0.5 go to the first bin.
    probs = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    labels = torch.tensor([0, 0, 0, 0])
    # bin0: conf .5 (pred 0, correct) -> acc 1, conf .5; bin1: .9 ok, .8 wrong, .6 ok
    want = (1 / 4) * abs(1 - 0.5) + (3 / 4) * abs(2 / 3 - (0.9 + 0.8 + 0.6) / 3)
    assert math.isclose(M.ece(probs, labels, n_bins=2), want, rel_tol=1e-6)


def test_ece_against_torchmetrics():
    tm = pytest.importorskip("torchmetrics.classification")
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(2000, 10) * 3, -1)
    labels = torch.randint(0, 10, (2000,))
    # No confidence on a bin edge: torchmetrics bins are [lo, hi), ours (lo, hi].
    edges = torch.linspace(0, 1, 16)
    assert (probs.max(1).values[:, None] - edges).abs().min() > 1e-7
    ref = tm.MulticlassCalibrationError(num_classes=10, n_bins=15, norm="l1")(probs, labels)
    assert math.isclose(M.ece(probs, labels), float(ref), rel_tol=1e-5)


def test_classwise_ece_nll_brier_accuracy():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    assert math.isclose(M.nll(probs, labels), -(math.log(0.7) + math.log(0.4) + math.log(0.1)) / 3)
    assert math.isclose(M.brier(probs, labels), (2 * 0.09 + 2 * 0.36 + 2 * 0.81) / 3)
    assert math.isclose(M.accuracy(probs, labels), 1 / 3)
    # classwise with 1 bin: class k gap = |mean(y==k) - mean(p_k)|
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.8, 0.2]], dtype=torch.float64)
    c0 = abs(2 / 3 - (0.7 + 0.4 + 0.8) / 3)
    c1 = abs(1 / 3 - (0.3 + 0.6 + 0.2) / 3)
    assert math.isclose(M.classwise_ece(probs, labels, n_bins=1), (c0 + c1) / 2, rel_tol=1e-9)


def test_ood_auroc_against_sklearn_with_ties():
    skm = pytest.importorskip("sklearn.metrics")
    torch.manual_seed(1)
    p_in = torch.softmax(torch.randn(300, 5) * 2, -1)
    p_out = torch.softmax(torch.randn(200, 5), -1)
    p_in[:10] = p_out[:10]  # ties
    s = torch.cat([p_in.max(1).values, p_out.max(1).values]).numpy()
    y = [1] * 300 + [0] * 200
    assert math.isclose(M.ood_auroc(p_in, p_out), skm.roc_auc_score(y, s), rel_tol=1e-12)


def test_metric_input_errors():
    with pytest.raises(ValueError, match="labels must have shape"):
        M.ece(torch.rand(3, 2), torch.tensor([0, 1]))
    with pytest.raises(TypeError, match="integer"):
        M.nll(torch.rand(2, 2), torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="n_bins"):
        M.ece(torch.rand(2, 2).softmax(-1), torch.tensor([0, 1]), n_bins=0)


PROB_FUNCTIONS = [M.ece, M.classwise_ece, M.nll, M.brier, M.accuracy, M.summary]


@pytest.mark.parametrize("fn", PROB_FUNCTIONS, ids=lambda f: f.__name__)
def test_logits_are_refused_not_scored(fn):
    """ece(logits, labels) used to return 1.406; every metric now refuses non-probabilities."""
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 3.0, -2.0]])
    with pytest.raises(ValueError, match=r"softmax"):
        fn(logits, torch.tensor([0, 1]))


@pytest.mark.parametrize("fn", PROB_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("case,message", [
    ("half_row", r"row 2 sums to 0\.5"),
    ("negative", r"row 1 has the negative entry -0\.2"),
    ("nan", r"row 3 holds NaN"),
    ("inf", r"row 0 holds NaN or inf"),
])
def test_rows_that_are_not_probabilities_are_refused(fn, case, message):
    p = torch.softmax(torch.randn(5, 4, generator=torch.Generator().manual_seed(0)), -1)
    if case == "half_row":
        p[2] *= 0.5
    elif case == "negative":
        p[1] = torch.tensor([0.7, 0.5, -0.2, 0.0])  # sums to 1: only the sign is wrong
    elif case == "nan":
        p[3, 1] = float("nan")
    else:
        p[0, 0] = float("inf")
    with pytest.raises(ValueError, match=message):
        fn(p, torch.tensor([0, 1, 2, 3, 0]))


@pytest.mark.parametrize("fn", PROB_FUNCTIONS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("bad", [-1, 4])
def test_labels_outside_the_classes_are_refused(fn, bad):
    p = torch.full((3, 4), 0.25)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        fn(p, torch.tensor([0, bad, 1]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("c", [2, 10, 1000])
def test_probabilities_rounded_to_their_dtype_are_accepted(dtype, c):
    """The tolerance follows the dtype and C: softmax output in any float dtype, and
    float32 probabilities cast up to float64, pass; a row off by 10x the tolerance does not."""
    g = torch.Generator().manual_seed(c)
    logits = 4 * torch.randn(64, c, generator=g)
    labels = torch.randint(0, c, (64,), generator=g)
    p = torch.softmax(logits, -1).to(dtype) if dtype != torch.float64 else torch.softmax(logits, -1).double()
    s = M.summary(p, labels)
    assert 0 <= s["ece"] <= 1 and 0 <= s["accuracy"] <= 1
    tol = M.row_sum_tolerance(dtype, c)
    assert tol < 0.2  # loose enough for rounding, never so loose that a row of half the mass passes
    bad = torch.softmax(logits.double(), -1)
    bad[5] *= 1 + 10 * tol
    with pytest.raises(ValueError, match="row 5 sums to"):
        M.ece(bad, labels)


def test_one_unit_convention_fractions_everywhere():
    """summary() used to give ece_pct (percent) next to accuracy (a fraction); every value
    of the library is now a fraction, under the name of the function that computes it."""
    g = torch.Generator().manual_seed(3)
    p = torch.softmax(3 * torch.randn(500, 6, generator=g), -1)
    y = torch.randint(0, 6, (500,), generator=g)
    s = M.summary(p, y, n_bins=10)
    assert set(s) == {"accuracy", "ece", "classwise_ece", "nll", "brier", "n_bins"}
    assert s["ece"] == M.ece(p, y, 10) and s["classwise_ece"] == M.classwise_ece(p, y, 10)
    assert s["accuracy"] == M.accuracy(p, y) and s["nll"] == M.nll(p, y) and s["brier"] == M.brier(p, y)
    assert 0 < s["ece"] < 1 and 0 < s["classwise_ece"] < 1
    # The trainer's run files (metrics.csv, final.json) keep ECE in percent, under *_pct keys.
    from dps_fast.train.experiment import run_metrics

    r = run_metrics(p, y)
    assert list(r) == ["accuracy", "ece_pct", "classwise_ece_pct", "nll", "brier", "n_bins", "mean_confidence"]
    assert r["ece_pct"] == 100 * M.ece(p, y) and r["classwise_ece_pct"] == 100 * M.classwise_ece(p, y)
    assert r["accuracy"] == s["accuracy"]
    assert r["mean_confidence"] == pytest.approx(float(p.max(1).values.mean()))  # a fraction, as accuracy


def test_ood_auroc_and_auroc_check_their_input():
    p = torch.softmax(torch.randn(20, 3, generator=torch.Generator().manual_seed(5)), -1)
    with pytest.raises(ValueError, match="probs_out must be class probabilities"):
        M.ood_auroc(p, torch.randn(10, 3))  # logits for the OOD set
    with pytest.raises(ValueError, match="same classes"):
        M.ood_auroc(p, torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match="NaN"):
        M.auroc(torch.tensor([0.1, float("nan"), 0.3]), torch.tensor([True, False, True]))
