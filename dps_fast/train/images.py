"""Streamed image data for dps-train: ImageFolder trees and CIFAR pickle batches.

- ``imagefolder:ROOT``: torchvision's layout, ``ROOT/train/<class>/*`` and
  ``ROOT/val/<class>/*`` (class = folder name, sorted). Decoded with Pillow in
  DataLoader workers; training: random-resized crop to ``--image-size`` and flip;
  evaluation: resize to 8/7 of it and centre crop (the ImageNet 256/224 ratio);
  ImageNet mean and std.
- ``cifar10:DIR`` / ``cifar100:DIR``: the Python-pickle batches as distributed
  (``data_batch_1..5`` + ``test_batch``; ``train`` + ``test`` with the fine labels),
  in DIR or its ``cifar-10-batches-py`` / ``cifar-100-python`` folder. Training: 4-pixel
  zero-padding random crop and flip; the data set's mean and std.

Every item is ``(x, y, index)``: the DPS bank needs the sample's index. The random
augmentation of a sample is seeded by (epoch seed, index), not by the worker that
happens to decode it, so a resumed run sees the same pixels as the uninterrupted one.
Both readers check their input before training (see ``check_files``).
"""
from __future__ import annotations

import hashlib
import os
import pickle
import signal
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import MissingDataError, UsageError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_STATS = {"cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
               "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))}
CIFAR_FILES = {"cifar10": (tuple(f"data_batch_{k}" for k in range(1, 6)), ("test_batch",), b"labels",
                           "cifar-10-batches-py"),
               "cifar100": (("train",), ("test",), b"fine_labels", "cifar-100-python")}
STREAMED_PREFIXES = ("imagefolder:", "cifar10:", "cifar100:")
MAX_VIEWS = 4  # per-view seeds (4 * sample seed + view) never meet another sample's


def is_streamed(dataset: str) -> bool:
    return dataset.startswith(STREAMED_PREFIXES)


@dataclass
class ImageSet(torch.utils.data.Dataset):
    """One split: a file list (ImageFolder) or a uint8 array [N, H, W, 3] (CIFAR), labels,
    and how to turn an item into a tensor. Items are keyed (index, seed); seed 0 = no
    augmentation (evaluation)."""
    labels: torch.Tensor
    files: list | None = None
    pixels: np.ndarray | None = None
    transform: object = None
    views: int = 1

    def __len__(self):
        return len(self.labels)

    def subset(self, keep: torch.Tensor) -> "ImageSet":
        k = keep.tolist()
        return ImageSet(self.labels[keep], [self.files[i] for i in k] if self.files is not None else None,
                        self.pixels[keep.numpy()] if self.pixels is not None else None, self.transform, self.views)

    def _image(self, i: int):
        if self.files is None:
            return self.pixels[i]
        from PIL import Image

        with Image.open(self.files[i]) as im:
            return im.convert("RGB")

    def __getitem__(self, key):
        i, seed = key
        img = self._image(i)
        xs = []
        for v in range(self.views if seed else 1):
            with torch.random.fork_rng(devices=[]):  # torchvision's transforms draw from the global RNG
                torch.manual_seed(MAX_VIEWS * seed + v if seed else 0)
                xs.append(self.transform(img, bool(seed)))
        return (xs[0] if len(xs) == 1 else torch.stack(xs)), int(self.labels[i]), i


@dataclass
class StreamSet:
    """A streamed data set: its splits and what the trainer needs to know about it."""
    name: str
    train: ImageSet
    test: ImageSet
    num_classes: int
    image_shape: tuple
    fingerprint: str
    classes: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


# ------------------------------------------------------------------ transforms
class FolderTransform:
    """Random-resized crop + flip (training) or resize + centre crop (evaluation), then
    normalise. A class, not a lambda, so that DataLoader workers can unpickle it."""

    def __init__(self, size: int):
        from .vision import import_torchvision

        T = import_torchvision("--dataset imagefolder:ROOT").transforms
        norm = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), *norm])
        self.eval = T.Compose([T.Resize(int(round(size * 8 / 7))), T.CenterCrop(size), *norm])

    def __call__(self, img, augment: bool):
        return (self.train if augment else self.eval)(img)


class CifarTransform:
    """4-pixel zero-padding random crop and flip (training), then normalise; on tensors,
    so that CIFAR needs no torchvision."""

    def __init__(self, mean, std, pad: int = 4):
        self.mean, self.std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
        self.pad = pad

    def __call__(self, img: np.ndarray, augment: bool):
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255)
        if augment:
            h, w = x.shape[1:]
            xp = torch.nn.functional.pad(x, (self.pad,) * 4)
            top, left = torch.randint(0, 2 * self.pad + 1, (2,)).tolist()
            x = xp[:, top:top + h, left:left + w]
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
        return (x - self.mean) / self.std


# ------------------------------------------------------------------ ImageFolder
def _list_split(root: str, split: str, classes: list | None) -> tuple[list, list, list]:
    """(files, labels, class names) of ROOT/split/<class>/*, sorted; files of other types are ignored."""
    top = os.path.join(root, split)
    if not os.path.isdir(top):
        other = "val" if split == "train" else "train"
        raise MissingDataError(f"imagefolder:{root}: no {split}/ folder (the layout is ROOT/train/<class>/* and "
                               f"ROOT/val/<class>/*{'' if os.path.isdir(os.path.join(root, other)) else '; it has neither'})")
    found = sorted(d.name for d in os.scandir(top) if d.is_dir())
    if not found:
        raise UsageError(f"imagefolder:{root}: {top}/ has no class folders (the layout is {split}/<class>/<image>)")
    if classes is None:
        classes = found
    stray = sorted(set(found) - set(classes))
    if stray:
        raise UsageError(f"imagefolder:{root}: {split}/ has classes that train/ lacks: {', '.join(stray[:5])}")
    files, labels = [], []
    for k, c in enumerate(classes):
        folder = os.path.join(top, c)
        for dirpath, _, names in sorted(os.walk(folder)) if os.path.isdir(folder) else []:
            for n in sorted(names):
                if n.lower().endswith(IMAGE_EXTENSIONS):
                    files.append(os.path.join(dirpath, n))
                    labels.append(k)
    return files, labels, classes


def _probe(path: str, full: bool) -> str | None:
    """None when Pillow reads the image (whole, with ``full``), else why not."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            if full:
                im.load()
            else:
                im.verify()
        return None
    except Exception as e:  # Pillow raises many types for bad files
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class _ProbeSet(torch.utils.data.Dataset):
    def __init__(self, files, full):
        self.files, self.full = files, full

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return i, _probe(self.files[i], self.full) or ""


def _as_list(batch):
    return batch


def check_files(files: list, workers: int, full: bool) -> list:
    """[(path, why)] of the images Pillow cannot read, probed in ``workers`` processes."""
    if not files:
        return []
    loader = torch.utils.data.DataLoader(_ProbeSet(files, full), batch_size=64, num_workers=workers,
                                         collate_fn=_as_list, worker_init_fn=quiet_worker)
    return [(files[i], why) for batch in loader for i, why in batch if why]


def _drop_bad(src: str, files: list, labels: list, bad: list, policy: str) -> tuple[list, list]:
    if bad and policy == "refuse":
        shown = "; ".join(f"{p} ({why})" for p, why in bad[:3])
        raise UsageError(f"{src}: {len(bad)} image(s) cannot be read: {shown}{' ...' if len(bad) > 3 else ''}; "
                         f"fix or remove them, or pass --bad-images skip to train without them")
    gone = {p for p, _ in bad}
    keep = [k for k, p in enumerate(files) if p not in gone]
    return [files[k] for k in keep], [labels[k] for k in keep]


def _file_list_digest(root: str, files: list, labels: list) -> str:
    """Fingerprint of a file list: relative paths, sizes and labels (not the pixels: hashing
    an ImageNet would take longer than an epoch)."""
    h = hashlib.sha256()
    for p, y in zip(files, labels):
        h.update(f"{os.path.relpath(p, root)}\0{os.path.getsize(p)}\0{y}\n".encode())
    return h.hexdigest()


def load_imagefolder(root: str, size: int, workers: int, policy: str, check: str) -> StreamSet:
    src = f"imagefolder:{root}"
    if not os.path.isdir(root):
        raise MissingDataError(f"{src}: no such folder")
    tr_files, tr_labels, classes = _list_split(root, "train", None)
    te_files, te_labels, _ = _list_split(root, "val", classes)
    bad = check_files(tr_files + te_files, workers, full=check == "full") if check != "off" else []
    tr_files, tr_labels = _drop_bad(src, tr_files, tr_labels, bad, policy)
    te_files, te_labels = _drop_bad(src, te_files, te_labels, bad, policy)
    empty = [c for k, c in enumerate(classes) if k not in set(tr_labels)]
    if empty or len(classes) < 2 or not te_files:
        why = (f"class(es) {', '.join(empty[:5])} have no readable training image" if empty else
               "a classifier needs at least 2 classes" if len(classes) < 2 else "val/ has no readable image")
        raise UsageError(f"{src}: {why}")
    tf = FolderTransform(size)
    fp = _file_list_digest(root, tr_files, tr_labels) + _file_list_digest(root, te_files, te_labels)
    return StreamSet(src, ImageSet(torch.tensor(tr_labels), tr_files, transform=tf),
                     ImageSet(torch.tensor(te_labels), te_files, transform=tf), len(classes), (3, size, size),
                     fp, classes, bad)


# ------------------------------------------------------------------ CIFAR
def _cifar_dir(kind: str, root: str) -> str:
    train_names = CIFAR_FILES[kind][0]
    for d in (root, os.path.join(root, CIFAR_FILES[kind][3])):
        if os.path.exists(os.path.join(d, train_names[0])):
            return d
    raise MissingDataError(f"{kind}:{root}: no {train_names[0]} there or in {CIFAR_FILES[kind][3]}/ (the Python "
                           f"version of {kind.upper()}, as distributed, unpacked)")


def _read_batch(path: str, label_key: bytes, src: str) -> tuple[np.ndarray, np.ndarray]:
    """(pixels [N, 32, 32, 3] uint8, labels [N]) of one pickle batch. The batches are Python
    pickles, the format CIFAR is distributed in: read only files you trust."""
    if not os.path.exists(path):
        raise MissingDataError(f"{src}: {os.path.basename(path)} is missing from {os.path.dirname(path)}")
    try:
        with open(path, "rb") as f:
            d = pickle.load(f, encoding="bytes")
        data, labels = np.asarray(d[b"data"], dtype=np.uint8), np.asarray(d[label_key], dtype=np.int64)
    except Exception as e:  # truncated, not a pickle, or not a CIFAR batch
        raise UsageError(f"{src}: {path} is not a readable CIFAR batch ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from e
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise UsageError(f"{src}: {path} holds data {data.shape} and {len(labels)} labels; a CIFAR batch holds "
                         f"[N, 3072] pixels and N labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def load_cifar(kind: str, root: str) -> StreamSet:
    src = f"{kind}:{root}"
    d = _cifar_dir(kind, root)
    train_names, test_names, key, _ = CIFAR_FILES[kind]
    h = hashlib.sha256()
    parts = {}
    for split, names in (("train", train_names), ("test", test_names)):
        got = [_read_batch(os.path.join(d, n), key, src) for n in names]
        x, y = np.concatenate([g[0] for g in got]), np.concatenate([g[1] for g in got])
        h.update(x.tobytes())
        h.update(y.tobytes())
        parts[split] = (x, y)
    c = 10 if kind == "cifar10" else 100
    for split, (_, y) in parts.items():
        if y.min() < 0 or y.max() >= c:
            raise UsageError(f"{src}: {split} labels span {y.min()}..{y.max()}; {kind} has classes 0..{c - 1}")
    tf = CifarTransform(*CIFAR_STATS[kind])
    (xtr, ytr), (xte, yte) = parts["train"], parts["test"]
    return StreamSet(src, ImageSet(torch.from_numpy(ytr), pixels=xtr, transform=tf),
                     ImageSet(torch.from_numpy(yte), pixels=xte, transform=tf), c, (3, 32, 32), h.hexdigest())


def load_streamed(args) -> StreamSet:
    kind, _, path = args.dataset.partition(":")
    if not path:
        raise UsageError(f"--dataset {args.dataset}: give the folder after the colon, e.g. {kind}:/data/{kind}")
    if kind == "imagefolder":
        return load_imagefolder(path, args.image_size, args.workers, args.bad_images, args.check_images)
    return load_cifar(kind, path)


# ------------------------------------------------------------------ loading batches
def quiet_worker(_):
    """Ctrl-C / SIGTERM reach the whole process group; the main process stops the workers."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


class _Batches(torch.utils.data.Sampler):
    """The batch sampler: the lists of item keys the next iteration yields, set per epoch
    (it runs in the main process, so persistent workers see every new epoch's list)."""

    def __init__(self):
        self.lists = []

    def __iter__(self):
        return iter(self.lists)

    def __len__(self):
        return len(self.lists)


class StreamLoader:
    """Batches (x, y, index) of an ImageSet decoded in DataLoader workers (pinned memory on
    CUDA, persistent workers), with the in-memory ``Loader``'s interface."""

    def __init__(self, images: ImageSet, batch_size: int, device, workers: int, shuffle: bool = True):
        self.images, self.batch_size, self.shuffle = images, batch_size, shuffle
        self.device = torch.device(device)
        self.sampler = _Batches()
        self.dl = torch.utils.data.DataLoader(images, batch_sampler=self.sampler, num_workers=workers,
                                              pin_memory=self.device.type == "cuda",
                                              persistent_workers=workers > 0, worker_init_fn=quiet_worker,
                                              prefetch_factor=4 if workers > 0 else None)

    @property
    def y(self):
        return self.images.labels

    def __len__(self):
        return -(-len(self.images) // self.batch_size)

    def order(self, generator=None) -> torch.Tensor:
        n = len(self.images)
        return torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)

    def index_batches(self, index_lists: list, seed: int):
        """(x, y, index) for each list of sample indices; ``seed`` 0 = no augmentation."""
        self.sampler.lists = [[(int(i), seed + int(i) if seed else 0) for i in idx] for idx in index_lists]
        nb = self.device.type == "cuda"
        for x, y, idx in self.dl:
            yield x.to(self.device, non_blocking=nb), y.to(self.device, non_blocking=nb), idx.to(self.device)

    def batches(self, order: torch.Tensor, start: int = 0, seed: int = 0):
        lists = [order[k * self.batch_size:(k + 1) * self.batch_size] for k in range(start, len(self))]
        return self.index_batches(lists, seed)

    def epoch(self, generator=None):
        """One unaugmented pass (used by the loss timing): the first view of each item."""
        for x, y, idx in self.batches(self.order(generator)):
            yield (x[:, 0] if x.dim() == 5 else x), y, idx


def draw_seed(gen: torch.Generator) -> int:
    """An epoch's augmentation seed (never 0, which means 'no augmentation')."""
    return int(torch.randint(1, 2 ** 40, (1,), generator=gen))
