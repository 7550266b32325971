"""The paper's protocols as dps-train presets: a named set of flags, nothing hidden.

``dps-train --preset NAME`` puts the preset's flags before the command's own, so any
flag given on the command line wins; ``dps-train --preset NAME --dry-run`` prints the
flags and the full command without training.

Which values come from where (arXiv 2512.24162, *Deep Probabilistic Supervision for
Image Classification*, "the paper"; its code is not public):

| preset | value | source |
|---|---|---|
| all | methods compared: ce, ls, pskd, dps, dps+con | paper: DPS against cross-entropy, label smoothing and self-distillation (PS-KD); DPS+con for label noise |
| all | DPS prior c = 100, eps = 0.01, gamma = 0.95; tau_e = 1 (DPS as published) | assumption: dps_fast's defaults for c, eps and gamma (docs/method.md §10); the paper's fixed tau_e = 1, not dps_fast's default `auto` |
| cifar100-resnet50 | CIFAR-100, ResNet-50 | paper (ECE -40% against self-distillation baselines) |
| cifar100-resnet50 | CIFAR stem (3x3 conv, no max-pool) | assumption: the usual CIFAR ResNet-50 (PS-KD's code) |
| cifar100-resnet50 | 300 epochs, batch 128, SGD momentum 0.9 (Nesterov), lr 0.1, weight decay 5e-4 | assumption: PS-KD's CIFAR-100 protocol (Kim et al. 2021) |
| all | cosine learning-rate schedule to 0 | assumption: dps-train has only cosine (PS-KD steps lr / 10 at 150 and 225 of 300 epochs) |
| cifar100-resnet50, cifar10-noise-sym40 | 4-pixel padding crop + flip | assumption: the standard CIFAR augmentation |
| cifar10-noise-sym40 | CIFAR-10, 40% symmetric noise, dps+con | paper: state-of-the-art robustness of DPS+con under label noise |
| cifar10-noise-sym40 | sym-exclusive noise (a flipped label always differs), so 40% of the labels are wrong | assumption: the paper's exact noise model is not restated here |
| cifar10-noise-sym40 | ResNet-18, 200 epochs, batch 128, lr 0.02, weight decay 5e-4 | assumption: the common label-noise protocol (e.g. DivideMix-style PreAct ResNet-18 runs) |
| imagenet-resnet50 | ImageNet, 224 px, random-resized crop + flip; eval resize 256 + centre crop 224 | assumption: the standard torchvision ImageNet recipe |
| imagenet-resnet50 | ResNet-50 | assumption: the paper's ImageNet headline is DenseNet-264 (+2.0% accuracy); use --model timm:densenet264d for it |
| imagenet-resnet50 | 90 epochs, batch 256, lr 0.1, weight decay 1e-4, bf16 autocast, channels-last | assumption: PS-KD's ImageNet protocol; the speed flags do not change the method |
"""
from __future__ import annotations

import shlex

COMPARE = "ce,ls,pskd,dps,dps+con"

PRESETS = {
    "cifar100-resnet50": [
        "--dataset", "cifar100:data/cifar-100-python", "--model", "torchvision:resnet50", "--cifar-stem",
        "--compare", COMPARE, "--epochs", "300", "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.1",
        "--momentum", "0.9", "--weight-decay", "5e-4", "--augment", "--workers", "8", "--tau-e", "1"],
    "cifar10-noise-sym40": [
        "--dataset", "cifar10:data/cifar-10-batches-py", "--model", "torchvision:resnet18", "--cifar-stem",
        "--compare", "ce,dps,dps+con", "--noise", "sym-exclusive", "--noise-rate", "0.4", "--epochs", "200",
        "--batch-size", "128", "--optimizer", "sgd", "--lr", "0.02", "--momentum", "0.9", "--weight-decay", "5e-4",
        "--augment", "--workers", "8", "--label-issues", "--tau-e", "1"],
    "imagenet-resnet50": [
        "--dataset", "imagefolder:data/imagenet", "--model", "torchvision:resnet50", "--image-size", "224",
        "--compare", COMPARE, "--epochs", "90", "--batch-size", "256", "--optimizer", "sgd", "--lr", "0.1",
        "--momentum", "0.9", "--weight-decay", "1e-4", "--augment", "--workers", "16", "--amp", "bf16",
        "--channels-last", "--eval-batch", "256", "--bank-dtype", "bfloat16", "--tau-e", "1"],
}


def preset_name(argv: list) -> str | None:
    """The value of --preset in argv (argparse checks it later), or None."""
    for k, a in enumerate(argv):
        if a == "--preset" and k + 1 < len(argv):
            return argv[k + 1]
        if a.startswith("--preset="):
            return a.split("=", 1)[1]
    return None


def expand(argv: list) -> list:
    """argv with the preset's flags in front (an unknown name is left to argparse's choices)."""
    name = preset_name(argv)
    return PRESETS.get(name, []) + argv if name else argv


def _groups(tokens: list) -> list:
    """tokens as [flag, its values...] groups (a value is a token after a flag that is not one)."""
    out = []
    for t in tokens:
        if t.startswith("--") or not out:
            out.append([t])
        else:
            out[-1].append(t)
    return out


def merged(preset: list, given: list) -> list:
    """The command's flags: the preset's, each replaced in place by the same flag given on the
    command line (which wins), then the other given flags."""
    given_groups = _groups(given)
    by_flag = {g[0].split("=", 1)[0]: g for g in given_groups}
    out, used = [], set()
    for g in _groups(preset):
        flag = g[0].split("=", 1)[0]
        out += by_flag.get(flag, g)
        used.add(flag)
    for g in given_groups:
        if g[0].split("=", 1)[0] not in used:
            out += g
    return out


def dry_run_text(name: str | None, argv: list) -> str:
    shown, skip = [], False  # the command without --dry-run and --preset: the flags themselves
    for a in argv:
        if skip or a == "--dry-run" or a.startswith("--preset="):
            skip = False
            continue
        skip = a == "--preset"
        if not skip:
            shown.append(a)
    head = f"preset {name}: " + shlex.join(PRESETS[name]) + "\n" if name in PRESETS else ""
    return head + "command: " + shlex.join(["dps-train", *merged(PRESETS.get(name, []), shown)])
