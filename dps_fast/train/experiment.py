"""The data and model of one experiment, and its evaluation."""
from __future__ import annotations

import torch

from .. import metrics as M
from .data import load_dataset, resize_to, stratified_subset
from .models import build_model
from .noise import inject_noise


class ExperimentData:
    """The data of one experiment: split, subset, noise, standardisation, OOD set."""

    def __init__(self, args):
        ds = load_dataset(args.dataset, args.data_root, seed=0)
        x_tr, y_tr = ds.x_train, ds.y_train
        if args.train_subset and args.train_subset < len(y_tr):
            keep = stratified_subset(y_tr, args.train_subset, seed=0)
            x_tr, y_tr = x_tr[keep], y_tr[keep]
        self.clean_labels = y_tr
        self.noise_info = {"kind": "none", "rate": 0.0, "realised": 0.0}
        self.labels = y_tr
        if args.noise != "none" and args.noise_rate > 0:
            self.labels, self.noise_info = inject_noise(y_tr, ds.num_classes, args.noise, args.noise_rate,
                                                        args.noise_seed, dataset=args.dataset)
        mean, std = float(x_tr.mean()), float(x_tr.std())
        self.norm = lambda x: (x - mean) / std
        self.x_train, self.x_test, self.y_test = self.norm(x_tr), self.norm(ds.x_test), ds.y_test
        self.num_classes, self.flip, self.name = ds.num_classes, ds.flip, ds.name
        self.image_shape = tuple(x_tr.shape[1:])
        self.ood_name, self.x_ood = None, None
        ood = args.ood
        if ood == "auto":
            ood = "mnist-5k" if args.dataset == "fashion-mnist" else "none"
        if ood != "none":
            o = load_dataset(ood, None)
            self.ood_name = o.name
            self.x_ood = self.norm(resize_to(o.x_test, self.image_shape[-1]))


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
