"""Label-noise injection (docs/method.md §7), seeded separately from training."""
from __future__ import annotations

import torch

# Fixed asymmetric flip maps: source class -> noisy class.
ASYM_MAPS = {
    "fashion-mnist": {0: 6, 6: 0, 2: 4, 4: 2, 5: 7, 7: 5},  # T-shirt<->Shirt, Pullover<->Coat, Sandal<->Sneaker
    "digits": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    "mnist": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
}
KINDS = ("none", "sym", "sym-exclusive", "asym")


def asym_map_for(dataset: str) -> dict:
    key = "mnist" if dataset in ("mnist", "mnist-5k") else dataset
    if key not in ASYM_MAPS:
        raise ValueError(f"no asymmetric noise map for dataset {dataset!r} (have {sorted(ASYM_MAPS)})")
    return ASYM_MAPS[key]


def inject_noise(labels: torch.Tensor, num_classes: int, kind: str, rate: float, seed: int,
                 dataset: str | None = None) -> tuple[torch.Tensor, dict]:
    """Returns (noisy labels, info). ``sym``: round(rate*N) samples get a label drawn
    uniformly from all classes (possibly the true one); ``sym-exclusive``: the new
    label always differs; ``asym``: round(rate*n_c) samples of each mapped source
    class c are flipped by the dataset's fixed map. ``info`` reports the realised
    fraction of wrong labels."""
    if kind not in KINDS:
        raise ValueError(f"noise must be one of {KINDS}, got {kind!r}")
    if not (0.0 <= rate <= 1.0):
        raise ValueError(f"noise rate must lie in [0, 1], got {rate}")
    labels = labels.to(torch.int64).cpu()
    noisy = labels.clone()
    g = torch.Generator().manual_seed(seed)
    n = labels.numel()
    if kind in ("sym", "sym-exclusive") and rate > 0:
        k = int(round(rate * n))
        chosen = torch.randperm(n, generator=g)[:k]
        if kind == "sym":
            noisy[chosen] = torch.randint(0, num_classes, (k,), generator=g)
        else:
            if num_classes < 2:
                raise ValueError("sym-exclusive noise needs at least 2 classes")
            shift = torch.randint(1, num_classes, (k,), generator=g)
            noisy[chosen] = (labels[chosen] + shift) % num_classes
    elif kind == "asym" and rate > 0:
        mapping = asym_map_for(dataset or "")
        for src, dst in sorted(mapping.items()):
            members = (labels == src).nonzero().flatten()
            k = int(round(rate * members.numel()))
            chosen = members[torch.randperm(members.numel(), generator=g)[:k]]
            noisy[chosen] = dst
    info = {"kind": kind, "rate": rate, "seed": seed, "realised": float((noisy != labels).double().mean()) if n else 0.0}
    return noisy, info
