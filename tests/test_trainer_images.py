"""dps-train on a user's own images (issue 28): ImageFolder and CIFAR readers streamed through
DataLoader workers, torchvision models, presets, and every bad input as one error line.

The data are written by the tests: a 3-class ImageFolder tree of 20x24 PNG and JPEG files
(plus one corrupt JPEG) and tiny CIFAR-10 / CIFAR-100 pickle batches. Runs use resnet18 at
16x16 with 2 workers, one thread, a few batches.
"""
import json
import os
import pathlib
import pickle
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dps_fast.train import loop as Lp
from dps_fast.train import presets as Ps
from dps_fast.train.checks import importable
from dps_fast.train.timing import StepClock

from _trainer_helpers import cli, error_of, keep_threads  # noqa: F401 (keep_threads: autouse fixture)

ROOT = pathlib.Path(__file__).resolve().parents[1]
TV_SITE = ROOT / "build" / "torchvision-site"
TV_PIN = "torchvision==0.28.0"  # the release for torch 2.13


def _side_torchvision() -> bool:
    """torchvision from build/torchvision-site, installed there on first use (not into the venv:
    see requirements-examples.txt) and imported through dps_fast.train.vision; once imported
    it stays in sys.modules, so the path is needed only for that import."""
    if not (TV_SITE / "torchvision").exists():
        r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(TV_SITE),
                            TV_PIN], capture_output=True, timeout=600)
        if r.returncode != 0:
            return False
    sys.path.insert(0, str(TV_SITE))
    try:
        from dps_fast.train.vision import import_torchvision

        import_torchvision("tests/test_trainer_images.py")
    finally:
        sys.path.remove(str(TV_SITE))
    return True


@pytest.fixture(scope="module", autouse=True)
def torchvision_ready():
    if not importable("PIL"):
        pytest.skip("needs pillow (requirements-examples.txt)")
    if not importable("torchvision") and not _side_torchvision():
        pytest.skip(f"needs torchvision: pip install {TV_PIN} failed")

CLASSES = ("cat", "dog", "emu")
RUN = ["--model", "torchvision:resnet18", "--workers", "2", "--threads", "1", "--batch-size", "6",
       "--eval-batch", "16", "--no-plots", "--no-progress", "--lr", "0.01"]


def write_folder(root, train_per_class=4, val_per_class=2, corrupt=True):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("val", val_per_class)):
        for c, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for k in range(n):
                img = (rng.random((20, 24, 3)) * 80 + 80 * c).astype(np.uint8)
                Image.fromarray(img).save(d / f"{k}.{'png' if k % 2 else 'jpg'}")
    if corrupt:
        (root / "train" / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    return root


def write_cifar(root, kind):
    rng = np.random.default_rng(1)
    root.mkdir(parents=True)
    c, key = (10, b"labels") if kind == "cifar10" else (100, b"fine_labels")
    names = [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"] if kind == "cifar10" else ["train", "test"]
    for name in names:
        n = 30 if name == "train" else 6
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: rng.integers(0, c, n).tolist()}
        if kind == "cifar100":
            batch[b"coarse_labels"] = [0] * n
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imgs") / "folder")


@pytest.fixture(scope="module")
def clean_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("imgs") / "clean", corrupt=False)


def final_of(out, method="dps"):
    return json.loads((out / method / "final.json").read_text())


# ---------------------------------------------------------------- one epoch of each reader
def test_imagefolder_epoch_skips_the_corrupt_file(folder, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(StepClock, "WARMUP_STEPS", 1)  # the ETA line after 2 steps instead of 200
    monkeypatch.setattr(StepClock, "ETA_STEPS", 2)
    code, out, err = cli(capsys, "--dataset", f"imagefolder:{folder}", "--image-size", "16", *RUN,
                         "--epochs", "1", "--bad-images", "skip", "--label-issues", "--out", str(tmp_path))
    assert code == 0, err
    assert f"note: skipped 1 unreadable image(s) (--bad-images skip): {folder}/train/cat/broken.jpg (" in out
    assert "12 train / 6 test images (3, 16, 16), 3 classes" in out
    assert "[dps] 1 epoch(s) x 2 steps of 6 images = 2 steps" in out
    assert re.search(r"\[dps\] [0-9.]+ ms/step \([0-9]+ img/s\) after 2 steps: epoch 1 ends in ~0s, the run in "
                     r"~0s \(training steps; evaluation adds to it\)", out), out
    assert re.search(r"\([0-9]+ img/s, loss <?[0-9.]+% of the step\)", out), out
    f = final_of(tmp_path)
    assert f["n_train"] == 12 and f["history"][0]["img_per_s"] > 0
    assert 0 <= f["timing"]["loss_share_pct_by_epoch"]["1"] <= 100
    head = (tmp_path / "dps" / "label_issues.csv").read_text().splitlines()[0]
    assert head == "index,given_label,suggested_label,score,rank,path"  # ImageFolder issues name their files


@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_epoch(kind, tmp_path, capsys):
    root = write_cifar(tmp_path / kind, kind)
    amp = ["--amp", "bf16", "--channels-last"] if kind == "cifar10" else []  # autocast on the CPU too
    code, out, err = cli(capsys, "--dataset", f"{kind}:{root}", *RUN, *amp, "--batch-size", "16", "--epochs", "1",
                         "--method", "dps",
                         "--out", str(tmp_path / "r"))
    assert code == 0, err
    n_train, n_test, c = (30, 6, 10) if kind == "cifar10" else (30, 6, 100)
    assert f"{n_train} train / {n_test} test images (3, 32, 32), {c} classes" in out
    assert final_of(tmp_path / "r")["final"]["accuracy"] >= 0


def test_cifar_stem_keeps_32x32_maps():
    """--cifar-stem: a 3x3 stride-1 first convolution and no max-pool (a run with it is as above,
    only slower on a CPU: the stem keeps 32x32 feature maps)."""
    from dps_fast.train.vision import build_foreign

    net = build_foreign("torchvision:resnet18", 100, cifar=True)
    conv = net.body.conv1
    assert conv.kernel_size == (3, 3) and conv.stride == (1, 1) and isinstance(net.body.maxpool, torch.nn.Identity)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 100) and net.feature_dim == 512


def test_cifar_reader_reads_the_distributed_layout(tmp_path):
    from dps_fast.train.images import load_cifar

    write_cifar(tmp_path / "cifar-100-python", "cifar100")
    ds = load_cifar("cifar100", str(tmp_path))  # the parent folder of the unpacked archive works too
    assert len(ds.train) == 30 and len(ds.test) == 6 and ds.num_classes == 100
    x, y, i = ds.train[(3, 0)]
    assert x.shape == (3, 32, 32) and i == 3 and y == int(ds.train.labels[3])


def test_augmentation_depends_on_the_sample_not_the_worker(clean_folder):
    """The same (index, seed) gives the same pixels whoever decodes it; seed 0 is the eval transform."""
    from dps_fast.train.images import load_imagefolder

    ds = load_imagefolder(str(clean_folder), 16, 0, "refuse", "header")
    a, b = ds.train[(5, 1234)][0], ds.train[(5, 1234)][0]
    assert torch.equal(a, b) and not torch.equal(a, ds.train[(5, 1235)][0])
    assert torch.equal(ds.test[(1, 0)][0], ds.test[(1, 0)][0])


# ---------------------------------------------------------------- resume with workers
def _interrupt_at_step(monkeypatch, step):
    real, calls = Lp.train_step, {"n": 0}

    def step_and_signal(*a, **k):
        calls["n"] += 1
        if calls["n"] == step:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
        return real(*a, **k)

    monkeypatch.setattr(Lp, "train_step", step_and_signal)


def test_ctrl_c_and_resume_with_workers_is_bit_identical(clean_folder, tmp_path, capsys, monkeypatch):
    """The reference runs with --workers 0, the interrupted one with 2: the result is the same bits."""
    base = ["--dataset", f"imagefolder:{clean_folder}", "--image-size", "16", *RUN, "--epochs", "2",
            "--method", "dps+con"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    code, _, err = cli(capsys, *base, "--workers", "0", "--out", str(ref))
    assert code == 0, err
    _interrupt_at_step(monkeypatch, 3)  # epoch 2 (2 steps an epoch), batch 1
    code, _, err = cli(capsys, *base, "--out", str(cut))
    assert code == 130 and "interrupted after 1 batches into epoch 2 of 2" in err, err
    monkeypatch.undo()
    code, _, err = cli(capsys, *base, "--out", str(cut), "--resume")
    assert code == 0, err
    a, b = final_of(ref, "dps+con"), final_of(cut, "dps+con")
    assert a["model_sha"] == b["model_sha"] and a["final"] == b["final"]


def test_resume_sees_a_changed_file_list(clean_folder, tmp_path, capsys):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(clean_folder, root)
    argv = ["--dataset", f"imagefolder:{root}", "--image-size", "16", *RUN, "--workers", "0", "--epochs", "2",
            "--method", "ce", "--out", str(tmp_path / "r")]
    assert cli(capsys, *argv, "--stop-after", "1")[0] == 0
    shutil.copy(root / "train" / "dog" / "0.jpg", root / "train" / "dog" / "extra.jpg")
    assert error_of(capsys, *argv, "--resume").startswith("--resume: the data differ from those")


# ---------------------------------------------------------------- every bad input is one line
def test_bad_inputs_are_one_line_errors(folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "noval" / "train" / "a").mkdir(parents=True)
    (tmp_path / "noclass" / "train").mkdir(parents=True)
    (tmp_path / "noclass" / "val").mkdir()
    out = ["--out", str(tmp_path / "r")]
    img = lambda root: ["--dataset", f"imagefolder:{root}", "--image-size", "16", *RUN, *out]  # noqa: E731
    assert error_of(capsys, *img(tmp_path / "noval")) == (
        f"imagefolder:{tmp_path}/noval: no val/ folder (the layout is ROOT/train/<class>/* and ROOT/val/<class>/*)")
    assert error_of(capsys, *img(tmp_path / "noclass")) == (
        f"imagefolder:{tmp_path}/noclass: {tmp_path}/noclass/train/ has no class folders (the layout is "
        f"train/<class>/<image>)")
    msg = error_of(capsys, *img(folder))
    assert msg.startswith(f"imagefolder:{folder}: 1 image(s) cannot be read: {folder}/train/cat/broken.jpg (")
    assert msg.endswith("fix or remove them, or pass --bad-images skip to train without them")
    assert error_of(capsys, *img(folder), "--model", "torchvision:resnet19").startswith(
        "--model torchvision:resnet19: torchvision ")
    assert error_of(capsys, "--dataset", f"cifar10:{tmp_path}", *RUN, *out) == (
        f"cifar10:{tmp_path}: no data_batch_1 there or in cifar-10-batches-py/ (the Python version of CIFAR10, as "
        f"distributed, unpacked)")
    monkeypatch.setitem(sys.modules, "timm", None)  # timm absent, whether or not it is installed
    assert error_of(capsys, *img(folder), "--model", "timm:resnet18") == (
        "--model timm:resnet18 needs the package timm, which is not installed (pip install timm)")
    assert not (tmp_path / "r").exists()


def test_a_torn_cifar_batch_is_named(tmp_path, capsys):
    root = write_cifar(tmp_path / "c", "cifar10")
    (root / "data_batch_3").write_bytes((root / "data_batch_3").read_bytes()[:500])
    msg = error_of(capsys, "--dataset", f"cifar10:{root}", *RUN, "--out", str(tmp_path / "r"))
    assert msg.startswith(f"cifar10:{root}: {root}/data_batch_3 is not a readable CIFAR batch (")


# ---------------------------------------------------------------- presets
@pytest.mark.parametrize("name", sorted(Ps.PRESETS))
def test_preset_dry_run_prints_its_flags(name, capsys):
    code, out, _ = cli(capsys, "--preset", name, "--dry-run", "--epochs", "2", "--seed", "3")
    assert code == 0
    flags = " ".join(Ps.PRESETS[name])
    assert out.splitlines()[0] == f"preset {name}: {flags}"
    # a given flag replaces the preset's in place (it wins), others follow: each flag once
    want = " ".join(Ps.PRESETS[name]).replace(f"--epochs {Ps.PRESETS[name][Ps.PRESETS[name].index('--epochs') + 1]}",
                                              "--epochs 2")
    assert out.splitlines()[1] == f"command: dps-train {want} --seed 3"


def test_preset_flags_are_overridable():
    from dps_fast.train.cli import parse_args

    a = parse_args(["--preset", "cifar100-resnet50", "--epochs", "7"])
    assert a.epochs == 7 and a.model == "torchvision:resnet50" and a.cifar_stem and a.lr == 0.1


def test_method_doc_states_where_each_preset_value_comes_from():
    """docs/method.md §11 carries the presets' source table as presets.py states it."""
    table = Ps.__doc__[Ps.__doc__.index("| preset | value | source |"):].strip()
    method = (ROOT / "docs" / "method.md").read_text()
    assert table in method
    for name in Ps.PRESETS:
        assert name in table
