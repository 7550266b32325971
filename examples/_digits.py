"""The examples' data: scikit-learn's digits with a fraction of the training labels flipped."""
import torch
from sklearn.datasets import load_digits


def noisy_digits(noise: float, seed: int = 0):
    """(x_train [N, 64], noisy y_train [N], flipped [N] bool, x_test, y_test), 360 test images."""
    d = load_digits()
    x = torch.tensor(d.images / 16.0, dtype=torch.float32).flatten(1)
    y = torch.tensor(d.target)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    train, test = perm[360:], perm[:360]
    y_train = y[train].clone()
    flip = torch.rand(len(train), generator=g) < noise
    y_train[flip] = (y_train[flip] + torch.randint(1, 10, (int(flip.sum()),), generator=g)) % 10
    return x[train], y_train, flip, x[test], y[test]


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))


def flip_auroc(flipped: torch.Tensor, label_error: torch.Tensor) -> float:
    """How well DPS's label_error read-out ranks the flipped labels first (0.5 = chance)."""
    from sklearn.metrics import roc_auc_score

    if not 0 < int(flipped.sum()) < len(flipped):
        return float("nan")
    return float(roc_auc_score(flipped.numpy(), label_error.float().cpu().numpy()))
