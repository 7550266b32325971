"""The trainer: data readers on tiny fixtures, methods, noise injection, checkpoints, kill-and-resume."""
import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from dps_fast.train import data as Dt
from dps_fast.train import methods as Me
from dps_fast.train import noise as No
from dps_fast.train import cli as Tr


def _write_idx(path, arr):
    codes = {np.uint8: 0x08}
    with gzip.open(path, "wb") as f:
        f.write(bytes([0, 0, codes[arr.dtype.type], arr.ndim]))
        f.write(struct.pack(">" + "I" * arr.ndim, *arr.shape))
        f.write(arr.tobytes())


@pytest.fixture
def tiny_fashion(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(str(tmp_path / f"{prefix}-images-idx3-ubyte.gz"), rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(str(tmp_path / f"{prefix}-labels-idx1-ubyte.gz"), (np.arange(n) % 10).astype(np.uint8))
    return str(tmp_path)


def test_idx_reader_and_fashion_loader(tiny_fashion):
    ds = Dt.load_fashion_mnist(tiny_fashion)
    assert ds.x_train.shape == (40, 1, 28, 28) and ds.x_test.shape == (20, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and 0.0 <= float(ds.x_train.min()) and float(ds.x_train.max()) <= 1.0
    assert torch.equal(ds.y_train, torch.arange(40) % 10) and ds.flip
    raw = Dt.read_idx(os.path.join(tiny_fashion, "train-labels-idx1-ubyte.gz"))
    assert raw.shape == (40,)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        Dt.load_fashion_mnist(str(tmp_path))


def test_bad_idx_file(tmp_path):
    p = tmp_path / "bad.gz"
    with gzip.open(p, "wb") as f:
        f.write(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        Dt.read_idx(str(p))


def test_digits_split_and_npz(tmp_path):
    ds = Dt.load_digits()
    assert ds.x_train.shape == (1437, 1, 8, 8) and ds.x_test.shape == (360, 1, 8, 8)
    # stratified: every class in the test split
    assert set(ds.y_test.tolist()) == set(range(10))
    p = tmp_path / "mine.npz"
    np.savez(p, x=np.random.rand(50, 6, 6).astype(np.float32), y=np.arange(50) % 5)
    nd = Dt.load_dataset(f"npz:{p}")
    assert nd.num_classes == 5 and nd.x_train.shape[1:] == (1, 6, 6) and len(nd.y_test) == 10
    with pytest.raises(ValueError, match="unknown dataset"):
        Dt.load_dataset("cifar10")


def test_mnist_5k_reader():
    ds = Dt.load_mnist_5k()
    assert ds.x_test.shape == (5000, 1, 28, 28) and int(ds.y_test.max()) == 9


def test_loader_and_augment():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    out = Dt.augment(x, pad=1, flip=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    ld = Dt.Loader(torch.zeros(10, 1, 2, 2), torch.arange(10), 4, "cpu")
    batches = list(ld.epoch(torch.Generator().manual_seed(0)))
    assert [len(b[2]) for b in batches] == [4, 4, 2]
    assert sorted(torch.cat([b[2] for b in batches]).tolist()) == list(range(10))


@pytest.mark.parametrize("kind", ["sym", "sym-exclusive", "asym"])
def test_noise_rates(kind):
    y = torch.arange(10_000) % 10
    noisy, info = No.inject_noise(y, 10, kind, 0.4, seed=3, dataset="fashion-mnist")
    wrong = float((noisy != y).double().mean())
    assert info["realised"] == pytest.approx(wrong)
    if kind == "sym":
        assert wrong == pytest.approx(0.4 * 0.9, abs=0.02)  # may redraw the true label
    elif kind == "sym-exclusive":
        assert wrong == pytest.approx(0.4, abs=1e-9)
    else:
        assert wrong == pytest.approx(0.4 * 0.6, abs=1e-9)  # 6 of 10 classes are mapped
        flipped = noisy != y
        assert torch.all(noisy[flipped & (y == 0)] == 6) and torch.all(noisy[flipped & (y == 5)] == 7)
    again, _ = No.inject_noise(y, 10, kind, 0.4, seed=3, dataset="fashion-mnist")
    assert torch.equal(noisy, again)
    with pytest.raises(ValueError):
        No.inject_noise(y, 10, "bogus", 0.4, 0)


@pytest.mark.parametrize("name", Me.METHODS)
def test_each_method_loss(name):
    torch.manual_seed(0)
    n, c, b = 30, 5, 8
    labels = torch.randint(0, c, (n,))
    m = Me.build_method(name, labels, c, epochs=4, cfg={}, device="cpu")
    idx = torch.randperm(n)[:b]
    shape = (m.views, b, c) if m.views > 1 else (b, c)
    z = torch.randn(*shape, requires_grad=True)
    feats = torch.nn.functional.normalize(torch.randn(2, b, 6), dim=-1).requires_grad_(True) \
        if m.needs_features else None
    for epoch in range(2):
        m.start_epoch(epoch)
        loss = m.loss(z, idx, labels[idx], feats)
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        assert torch.isfinite(z.grad).all()
        m.end_epoch()
    st = m.state_dict()
    m2 = Me.build_method(name, labels, c, epochs=4, cfg={}, device="cpu")
    m2.load_state_dict(st)
    for k, v in st.items():
        assert torch.equal(v, m2.state_dict()[k])
    if name == "ce":
        torch.testing.assert_close(m.loss(z[:], idx, labels[idx]),
                                   torch.nn.functional.cross_entropy(z, labels[idx]))


def _train_cmd(out, epochs=6, extra=()):
    return [sys.executable, "-m", "dps_fast.train", "--dataset", "digits", "--model", "mlp", "--width", "64",
            "--method", "dps", "--epochs", str(epochs), "--batch-size", "32", "--out", str(out), "--threads", "1",
            "--no-plots", "--noise", "sym", "--noise-rate", "0.2", *extra]


def test_checkpoint_roundtrip_and_outputs(tmp_path):
    r = subprocess.run(_train_cmd(tmp_path, epochs=2, extra=("--plots",)), capture_output=True, text=True,
                       cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    d = tmp_path / "dps"
    ck = torch.load(d / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 1 and set(ck) >= {"model", "optimizer", "scheduler", "method", "data_rng", "torch_rng",
                                             "noisy_labels", "history"}
    assert "alpha" in ck["method"]
    final = json.loads((d / "final.json").read_text())
    assert final["noise"]["kind"] == "sym" and 0.1 < final["noise"]["realised"] < 0.25
    assert (d / "metrics.csv").read_text().count("\n") == 3
    assert (d / "reliability.png").exists() and (d / "curves.png").exists()
    assert (d / "noisy_labels.pt").exists()
    assert "ECE" in r.stdout and "15 bins" in r.stdout


def test_kill_and_resume_is_bit_identical(tmp_path):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    epochs = 20
    r = subprocess.run(_train_cmd(ref, epochs), capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen(_train_cmd(cut, epochs), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         cwd=str(tmp_path))
    ckpt = cut / "dps" / "checkpoint.pt"
    deadline = time.time() + 120
    killed_at = None
    while time.time() < deadline and p.poll() is None:
        if ckpt.exists():
            try:
                ep = torch.load(ckpt, weights_only=True)["epoch"]
            except Exception:
                ep = -1
            if ep >= 1:
                p.send_signal(signal.SIGKILL)
                killed_at = ep
                break
        time.sleep(0.05)
    p.wait()
    assert killed_at is not None and killed_at < epochs - 1, "the run finished before it could be killed"
    assert not (cut / "dps" / "final.json").exists()
    r2 = subprocess.run(_train_cmd(cut, epochs, extra=("--resume",)), capture_output=True, text=True, cwd=str(tmp_path))
    assert r2.returncode == 0, r2.stderr
    assert "resumed from" in r2.stdout
    a = json.loads((ref / "dps" / "final.json").read_text())
    b = json.loads((cut / "dps" / "final.json").read_text())
    assert a["model_sha"] == b["model_sha"]
    assert a["final"] == b["final"]
    ha = [{k: v for k, v in h.items() if k not in ("epoch_s", "img_per_s")} for h in a["history"]]
    hb = [{k: v for k, v in h.items() if k not in ("epoch_s", "img_per_s")} for h in b["history"]]
    assert ha == hb
    ba = torch.load(ref / "dps" / "checkpoint.pt", weights_only=True)["method"]["alpha"]
    bb = torch.load(cut / "dps" / "checkpoint.pt", weights_only=True)["method"]["alpha"]
    assert torch.equal(ba, bb)


def test_compare_table(tmp_path):
    r = subprocess.run([sys.executable, "-m", "dps_fast.train", "--demo", "--epochs", "2", "--out", str(tmp_path),
                        "--no-plots", "--threads", "1"], capture_output=True, text=True, cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "| ce |" in r.stdout and "| dps |" in r.stdout and "ECE % (15 bins)" in r.stdout
    assert json.loads((tmp_path / "compare.json").read_text())["results"][1]["method"] == "dps"
    assert "overhead" in r.stdout


def test_ddp_trainer_sharded_bank_and_resume_at_other_world(tmp_path):
    base = [sys.executable, "-m", "dps_fast.train", "--dataset", "digits", "--model", "mlp", "--width", "32",
            "--method", "dps", "--batch-size", "64", "--out", str(tmp_path), "--threads", "1", "--no-plots",
            "--epochs", "3", "--bank", "sharded", "--tau-e-adapt", "2"]
    r = subprocess.run(base + ["--nproc", "2", "--stop-after", "2"], capture_output=True,
                       text=True, cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    bank = tmp_path / "dps" / "bank"
    assert os.listdir(bank) == ["epoch-0002"]  # one folder per checkpoint; the older ones are gone
    assert sorted(os.listdir(bank / "epoch-0002")) == ["bank-index.json", "bank-rank0-of-2.safetensors",
                                                         "bank-rank1-of-2.safetensors"]
    st = torch.load(tmp_path / "dps" / "checkpoint.pt", weights_only=True)
    assert st["bank_dir"] == "bank/epoch-0002"
    assert st["method_scalars"]["adapted_epoch"] == 1 and st["method_scalars"]["tau_e"] < 1.0  # the sharded bank's
    r = subprocess.run(base + ["--nproc", "3", "--resume"], capture_output=True, text=True, cwd=str(tmp_path),
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    final = json.loads((tmp_path / "dps" / "final.json").read_text())
    assert len(final["history"]) == 3 and [s["world"] for s in final["segments"]] == [2, 3]
    assert final["history"][1]["tau_e"] == pytest.approx(st["method_scalars"]["tau_e"])
    assert 0.1 <= final["history"][2]["tau_e"] < 1.0
    assert os.listdir(bank) == ["epoch-0003"]
    assert "bank-rank2-of-3.safetensors" in os.listdir(bank / "epoch-0003")


def test_host_bank_trainer_and_nproc_misuse(tmp_path):
    base = [sys.executable, "-m", "dps_fast.train", "--dataset", "digits", "--model", "mlp", "--width", "32",
            "--batch-size", "64", "--out", str(tmp_path), "--threads", "1", "--no-plots", "--epochs", "1"]
    r = subprocess.run(base + ["--method", "dps", "--bank", "host"], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run(base + ["--method", "pskd", "--nproc", "2"], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("dps-train: error: --nproc > 1 supports ce, ls, dps and dps+con")
    r = subprocess.run(base + ["--method", "dps", "--bank", "sharded"], capture_output=True, text=True,
                       cwd=str(tmp_path), timeout=300)
    assert r.returncode == 2 and r.stderr == "dps-train: error: --bank sharded needs --nproc > 1\n"


def test_ddp_top_k_bank_checkpoints_and_resumes_bit_for_bit(tmp_path):
    """--top-k under --nproc 2 (a sharded top-k bank, tau_e auto by default): a run paused after
    one epoch and resumed equals the run that was not paused; the bank is saved in top-k form."""
    base = [sys.executable, "-m", "dps_fast.train", "--dataset", "digits", "--model", "mlp", "--width", "16",
            "--method", "dps", "--batch-size", "64", "--threads", "1", "--no-plots", "--no-progress",
            "--epochs", "2", "--bank", "sharded", "--top-k", "3", "--nproc", "2"]
    run = lambda *extra: subprocess.run(base + list(extra), capture_output=True, text=True,  # noqa: E731
                                        cwd=str(tmp_path), timeout=300)
    r = run("--out", str(tmp_path / "whole"))
    assert r.returncode == 0, r.stdout + r.stderr
    assert run("--out", str(tmp_path / "parts"), "--stop-after", "1").returncode == 0
    saved = json.loads((tmp_path / "parts" / "dps" / "bank" / "epoch-0001" / "bank-index.json").read_text())
    assert (saved["layout"], saved["k"]) == ("topk", 3)
    r = run("--out", str(tmp_path / "parts"), "--resume")
    assert r.returncode == 0, r.stdout + r.stderr
    whole, parts = (json.loads((tmp_path / d / "dps" / "final.json").read_text()) for d in ("whole", "parts"))
    strip = lambda h: [{k: v for k, v in e.items() if k not in ("epoch_s", "img_per_s")} for e in h]  # noqa: E731
    assert whole["final"] == parts["final"] and strip(whole["history"]) == strip(parts["history"])
    assert 0 < whole["history"][-1]["topk_mean_tv_bound"] and whole["history"][-1]["tau_e"] < 1.0
