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
        M.ece(torch.rand(2, 2), torch.tensor([0, 1]), n_bins=0)
