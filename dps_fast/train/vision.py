"""torchvision and timm models for dps-train, imported only when asked for.

Neither package is a requirement of dps_fast: ``--model torchvision:NAME`` and
``--model timm:NAME`` import them here, and a missing one is a one-line error that
names the install command. Every model is wrapped as the trainer's own models are:
``embed(x) -> [B, D]``, ``head`` (the final linear layer), ``feature_dim``.
"""
from __future__ import annotations

import glob
import importlib.util
import os

import torch
from torch import nn

from .errors import UsageError

TORCHVISION_HINT = "pip install torchvision (the release made for your torch, e.g. torchvision==0.28.0 for torch 2.13)"
TIMM_HINT = "pip install timm"
_OPS_DECLARED = False


def _declare_detection_ops(package_dir: str) -> None:
    """torchvision's import registers fake kernels for its C++ detection ops (nms, qnms)
    and fails when its C++ library cannot load, e.g. PyPI's x86-64 wheel (a CUDA build)
    beside a CPU-only torch. Classification models and transforms are pure Python, so
    when that library does not load we declare the two op schemas ourselves (no kernel:
    detection ops stay unusable, as they would anyway)."""
    global _OPS_DECLARED
    if _OPS_DECLARED:
        return
    libs = glob.glob(os.path.join(package_dir, "_C*.so")) + glob.glob(os.path.join(package_dir, "_C*.pyd"))
    try:
        torch.ops.load_library(libs[0])
        _OPS_DECLARED = True
        return
    except (IndexError, OSError):
        pass
    if not hasattr(torch.ops.torchvision, "nms"):
        lib = torch.library.Library("torchvision", "DEF")
        lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _declare_detection_ops.lib = lib  # keep the registration alive
    _OPS_DECLARED = True


def import_torchvision(why: str):
    """The torchvision module, or a UsageError naming the install command."""
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        raise UsageError(f"{why} needs the package torchvision, which is not installed ({TORCHVISION_HINT})")
    _declare_detection_ops(os.path.dirname(spec.origin))
    try:
        import torchvision
    except Exception as e:  # a torchvision built for another torch
        raise UsageError(f"{why}: torchvision does not import ({type(e).__name__}: {str(e).splitlines()[0]}); "
                         f"{TORCHVISION_HINT}") from e
    return torchvision


def import_timm(why: str):
    try:
        import timm
    except ImportError as e:
        raise UsageError(f"{why} needs the package timm, which is not installed ({TIMM_HINT})") from e
    return timm


class WrappedNet(nn.Module):
    """A foreign classifier split into ``body`` (features) and ``head`` (final linear layer)."""

    def __init__(self, body: nn.Module, head: nn.Module, feature_dim: int):
        super().__init__()
        self.body, self.head, self.feature_dim = body, head, feature_dim

    def embed(self, x):
        return self.body(x).flatten(1)

    def forward(self, x):
        return self.head(self.embed(x))


def _split_last_linear(model: nn.Module, num_classes: int) -> WrappedNet:
    """Replaces the model's last nn.Linear (fc, classifier, heads.head, ...) by Identity and
    makes it the head. A model without one (squeezenet's conv classifier) keeps its whole
    output as features and an identity head."""
    last = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            last = name
    if last is None:
        return WrappedNet(model, nn.Identity(), num_classes)
    parent_name, _, attr = last.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    head = getattr(parent, attr)
    setattr(parent, attr, nn.Identity())
    return WrappedNet(model, head, head.in_features)


def cifar_stem(model: nn.Module, name: str) -> None:
    """The CIFAR ResNet stem for 32x32 inputs: a 3x3 stride-1 first convolution, no max-pool
    (He et al. 2016, section 4.2; the usual CIFAR ResNet-50 of the PS-KD and DPS papers)."""
    conv, pool = getattr(model, "conv1", None), getattr(model, "maxpool", None)
    if not isinstance(conv, nn.Conv2d) or pool is None:
        raise UsageError(f"--cifar-stem replaces conv1 and maxpool, which {name} does not have (the ResNet family "
                         f"has them); leave --cifar-stem out")
    model.conv1 = nn.Conv2d(conv.in_channels, conv.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()


def check_torchvision_name(name: str):
    """The torchvision module, after checking that it has a classification model ``name``."""
    tv = import_torchvision(f"--model torchvision:{name}")
    names = tv.models.list_models(module=tv.models)
    if name not in names:
        close = [n for n in names if name.lower()[:4] in n][:6]
        raise UsageError(f"--model torchvision:{name}: torchvision {tv.__version__} has no classification model "
                         f"{name!r}" + (f" (close: {', '.join(close)})" if close else "")
                         + "; see torchvision.models.list_models()")
    return tv


def build_torchvision(name: str, num_classes: int, cifar: bool) -> WrappedNet:
    tv = check_torchvision_name(name)
    kw = {"aux_logits": False, "init_weights": True} if name in ("inception_v3", "googlenet") else {}
    model = tv.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    if cifar:
        cifar_stem(model, f"torchvision:{name}")
    return _split_last_linear(model, num_classes)


def build_timm(name: str, num_classes: int, cifar: bool) -> WrappedNet:
    timm = import_timm(f"--model timm:{name}")
    if cifar:
        raise UsageError("--cifar-stem is for torchvision ResNets; timm models take their own stem options")
    try:
        model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    except RuntimeError as e:  # timm's 'Unknown model'
        raise UsageError(f"--model timm:{name}: {str(e).splitlines()[0]}; see timm.list_models()") from e
    head = model.get_classifier()
    dim = model.num_features
    model.reset_classifier(0)
    return WrappedNet(model, head if isinstance(head, nn.Module) else nn.Identity(), dim)


def build_foreign(spec: str, num_classes: int, cifar: bool) -> WrappedNet:
    """``torchvision:NAME`` or ``timm:NAME``."""
    lib, _, name = spec.partition(":")
    if not name:
        raise UsageError(f"--model {spec}: give the model name after the colon, e.g. {lib}:resnet18")
    return (build_torchvision if lib == "torchvision" else build_timm)(name, num_classes, cifar)
