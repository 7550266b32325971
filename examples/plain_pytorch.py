"""DPS in a plain PyTorch training loop.

    python examples/plain_pytorch.py [--epochs 15] [--noise 0.2] [--seed 0]

scikit-learn's digits (8x8 images) with a fraction of the training labels flipped at
random; a small MLP trained with DPSLoss. The loader yields ``(x, y, index)`` through
``WithIndex``; after training, the posterior's ``label_error`` read-out ranks the
training samples by how likely their label is wrong, and the script prints how well
that ranking finds the flipped labels (AUROC; 0.5 = chance).
"""
import argparse

import torch
from torch.utils.data import DataLoader, TensorDataset

import dps_fast
from dps_fast.datasets import WithIndex

from _digits import flip_auroc, mlp, noisy_digits


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--noise", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    torch.manual_seed(a.seed)
    x, y, flipped, x_test, y_test = noisy_digits(a.noise, a.seed)

    loader = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=64, shuffle=True)  # (x, y, index)
    model = mlp()
    crit = dps_fast.DPSLoss(y, num_classes=10)  # one belief per training sample, started at its label
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, a.epochs)
    for epoch in range(a.epochs):
        model.train(); crit.train()                  # training mode: every step updates the bank rows
        for xb, yb, index in loader:
            loss = crit(model(xb), index)             # index: the samples' positions in the training set
            opt.zero_grad(); loss.backward(); opt.step()
        sched.step()
    model.eval(); crit.eval()                         # evaluation: the bank is read, never updated
    with torch.no_grad():
        acc = (model(x_test).argmax(1) == y_test).float().mean().item()
    auroc = flip_auroc(flipped, crit.posterior()["label_error"])
    print(f"test accuracy {100 * acc:.1f}%; {int(flipped.sum())} of {len(y)} training labels flipped; "
          f"label_error finds them with AUROC {auroc:.3f}")
    return acc, auroc


if __name__ == "__main__":
    main()
