"""A hand-written training loop on digits with noisy labels, as a user writes one around the
README's quick start (issue 27, item 5: why a hand loop and dps-train disagreed).

    python tools/digits_hand_loop.py --method auto --epochs 30 --optimizer sgd --seeds 0,1,2

The data, the split and the noisy labels are dps-train's (``--dataset digits --noise sym
--noise-rate 0.3``, noise seed 12345); the model is its MLP shape (2 x 256, ReLU); no
augmentation, no weight decay, no learning-rate schedule: the plain loop. Prints one line per
seed (final test accuracy %, ECE % with 15 bins, mean top confidence %) and the mean.
"""
import argparse
import statistics

import torch
from torch.utils.data import DataLoader, TensorDataset

import dps_fast
from dps_fast import metrics
from dps_fast.datasets import WithIndex
from dps_fast.train.data import load_digits
from dps_fast.train.noise import inject_noise


def run(method: str, epochs: int, optimizer: str, seed: int, rate: float) -> tuple[float, float, float]:
    data = load_digits()
    y_noisy, _ = inject_noise(data.y_train, 10, "sym", rate, 12345)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    loader = DataLoader(WithIndex(TensorDataset(data.x_train, y_noisy)), batch_size=64, shuffle=True,
                        generator=torch.Generator().manual_seed(seed))
    crit = None if method == "ce" else dps_fast.DPSLoss(y_noisy, 10, tau_e=1.0 if method == "fixed" else "auto")
    opt = (torch.optim.Adam(model.parameters(), lr=1e-3) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9))
    for _ in range(epochs):
        for x, y, index in loader:
            logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits, y) if crit is None else crit(logits, index)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        probs = torch.softmax(model(data.x_test), 1)
    return (100 * metrics.accuracy(probs, data.y_test), 100 * metrics.ece(probs, data.y_test),
            100 * float(probs.max(1).values.mean()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=["ce", "fixed", "auto"], required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    p.add_argument("--noise-rate", type=float, default=0.3)
    p.add_argument("--seeds", default="0,1,2")
    a = p.parse_args()
    torch.set_num_threads(1)
    rows = [run(a.method, a.epochs, a.optimizer, int(s), a.noise_rate) for s in a.seeds.split(",")]
    for s, (acc, ece, conf) in zip(a.seeds.split(","), rows):
        print(f"seed {s}: acc {acc:.2f} ECE {ece:.2f} confidence {conf:.2f}")
    mean = [statistics.mean(r[i] for r in rows) for i in range(3)]
    sd = [statistics.stdev(r[i] for r in rows) if len(rows) > 1 else 0.0 for i in range(3)]
    print(f"| {a.method} | {a.optimizer} | {a.epochs} | {mean[0]:.1f} ± {sd[0]:.1f} | {mean[1]:.1f} ± {sd[1]:.1f} | "
          f"{mean[2]:.1f} ± {sd[2]:.1f} |")


if __name__ == "__main__":
    main()
