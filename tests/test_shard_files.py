"""save_bank / load_bank files (dps_fast/banks/shard_files.py): a save is one verifiable unit,
and a load that fails for any reason leaves the live bank bit-identical.

Real two-rank saves are made once (one spawn of two gloo ranks); each test tampers with a
copy and loads it in this process through a one-rank gloo group, into a sharded bank (which
reads both files of a two-rank save) and a replicated one."""
import json
import os
import shutil
import tempfile

import pytest
import torch
import torch.distributed as dist

from dps_fast import distributed as D
from dps_fast.banks import shard_files as SF
from _shard_workers import C, N, worker_saves
from _ranks import spawn_ranks

MODES = ["sharded", "replicated"]


@pytest.fixture(scope="module")
def saves():
    """Folders a, b, n15, c5 saved at two ranks, their full banks, and the two-rank load outcome."""
    tmp = tempfile.mkdtemp()
    os.makedirs(os.path.join(tmp, "store"))
    spawn_ranks(worker_saves, 2, 2, os.path.join(tmp, "store"), tmp)
    out = {"dir": tmp, "fulls": torch.load(os.path.join(tmp, "fulls.pt"), weights_only=True),
           "agree": [torch.load(os.path.join(tmp, f"agree{r}.pt"), weights_only=True) for r in range(2)]}
    yield out
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def group():
    """A one-rank gloo group in this process (distributed banks need one)."""
    tmp = tempfile.mkdtemp()
    dist.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()
    shutil.rmtree(tmp, ignore_errors=True)


def _copy(saves, tmp_path, name="a"):
    dst = str(tmp_path / name)
    shutil.copytree(os.path.join(saves["dir"], name), dst)
    return dst


def _fresh(mode, n=N, c=C, dtype=torch.float32):
    return D.DistributedDPSLoss(torch.arange(n) % c, c, mode=mode, bank_dtype=dtype)


def _manifest(folder):
    with open(SF.manifest_path(folder)) as f:
        return json.load(f)


def _write_manifest(folder, doc):
    with open(SF.manifest_path(folder), "w") as f:
        json.dump(doc, f)


def _rewrite_header(path, edit):
    """Applies ``edit`` to a shard's parsed header and writes it back, rows unchanged."""
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    edit(head)
    new = json.dumps(head).encode()
    new += b" " * (-len(new) % 8)
    open(path, "wb").write(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _expect_failure(mode, folder, exc, *needles):
    """load_bank raises ``exc`` naming each needle, and the bank stays bit-identical."""
    crit = _fresh(mode)
    crit(torch.randn(3, C), torch.arange(3))  # a live bank that is not the prior
    before = crit.bank.clone()
    with pytest.raises(exc) as info:
        D.load_bank(crit, folder)
    for needle in needles:
        assert needle in str(info.value), (needle, str(info.value))
    assert torch.equal(crit.bank, before), "a failed load wrote rows"
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------ what a save writes
@pytest.mark.parametrize("mode", MODES)
def test_save_writes_shards_then_a_manifest_with_ids_and_checksums(group, saves, tmp_path, mode):
    crit = _fresh(mode)
    crit(torch.randn(5, C), torch.arange(5))
    folder = str(tmp_path / "s")
    D.save_bank(crit, folder)
    assert sorted(os.listdir(folder)) == [SF.INDEX, "bank-rank0-of-1.safetensors"]  # no temporary files
    doc = _manifest(folder)
    assert (doc["world"], doc["num_samples"], doc["num_classes"], doc["dtype"]) == (1, N, C, "F32")
    [entry] = doc["shards"]
    path = SF.shard_path(folder, 0, 1)
    assert entry["rows"] == N and entry["bytes"] == os.path.getsize(path)
    assert doc["save_id"] in open(path, "rb").read(4096).decode(errors="replace")
    loaded = _fresh(mode)
    D.load_bank(loaded, folder)
    assert torch.equal(loaded.bank, crit.bank)


def test_two_rank_saves_reload_and_each_save_has_its_own_id(group, saves):
    a, b = (_manifest(os.path.join(saves["dir"], k)) for k in "ab")
    assert a["world"] == 2 and a["save_id"] != b["save_id"]
    assert [s["rows"] for s in a["shards"]] == [9, 8]
    assert torch.equal(D.read_full_bank(os.path.join(saves["dir"], "a")), saves["fulls"]["a"])


@pytest.mark.parametrize("mode", MODES)
def test_a_stale_shard_of_another_world_is_no_part_of_the_save(group, saves, tmp_path, mode):
    """The manifest alone says which files make the save; a new save commits, then drops the rest."""
    folder = _copy(saves, tmp_path)
    other = _copy(saves, tmp_path, "b")
    shutil.copy(SF.shard_path(other, 1, 2), SF.shard_path(folder, 0, 1))  # a file the manifest does not name
    crit = _fresh(mode)
    D.load_bank(crit, folder)
    assert torch.equal(crit.full_bank(), saves["fulls"]["a"])
    crit(torch.randn(2, C), torch.arange(2))
    D.save_bank(crit, folder)
    assert sorted(os.listdir(folder)) == [SF.INDEX, "bank-rank0-of-1.safetensors"]
    assert _manifest(folder)["save_id"] != _manifest(os.path.join(saves["dir"], "a"))["save_id"]
    assert torch.equal(D.read_full_bank(folder), crit.full_bank())


# ------------------------------------------------------------------ every failure leaves the bank as it was
@pytest.mark.parametrize("mode", MODES)
def test_truncated_later_file_writes_no_row(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    path = SF.shard_path(folder, 1, 2)
    os.truncate(path, os.path.getsize(path) - 4)
    _expect_failure(mode, folder, ValueError, path, "truncated")


@pytest.mark.parametrize("mode", MODES)
def test_extra_trailing_bytes(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    path = SF.shard_path(folder, 1, 2)
    with open(path, "ab") as f:
        f.write(b"\0" * 8)
    _expect_failure(mode, folder, ValueError, path, "8 trailing bytes")


@pytest.mark.parametrize("mode", MODES)
def test_shard_of_a_save_with_fewer_rows(group, saves, tmp_path, mode):
    folder, small = _copy(saves, tmp_path), _copy(saves, tmp_path, "n15")
    path = SF.shard_path(folder, 1, 2)
    shutil.copy(SF.shard_path(small, 1, 2), path)  # 7 rows where the manifest says 8
    _expect_failure(mode, folder, ValueError, path, "[8, 4]")


@pytest.mark.parametrize("mode", MODES)
def test_shard_with_another_number_of_classes(group, saves, tmp_path, mode):
    folder, wide = _copy(saves, tmp_path), _copy(saves, tmp_path, "c5")
    path = SF.shard_path(folder, 1, 2)
    shutil.copy(SF.shard_path(wide, 1, 2), path)
    _expect_failure(mode, folder, ValueError, path, "[8, 4]")


@pytest.mark.parametrize("mode", MODES)
def test_save_of_another_bank_shape(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path, "n15")
    _expect_failure(mode, folder, ValueError, SF.manifest_path(folder), "15 x 4", "17 x 4")


@pytest.mark.parametrize("mode", MODES)
def test_unknown_dtype(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    path = SF.shard_path(folder, 1, 2)
    _rewrite_header(path, lambda h: h["bank"].update(dtype="I32"))
    _expect_failure(mode, folder, ValueError, path, "unknown dtype 'I32'")


@pytest.mark.parametrize("mode", MODES)
def test_wrong_data_offsets(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    path = SF.shard_path(folder, 1, 2)
    _rewrite_header(path, lambda h: h["bank"].update(data_offsets=[16, 16 + 8 * 4 * 4]))
    _expect_failure(mode, folder, ValueError, path, "data_offsets")


@pytest.mark.parametrize("mode", MODES)
def test_shards_of_two_saves_mixed(group, saves, tmp_path, mode):
    """A save interrupted after rank 1 replaced its file: same shapes, another save id."""
    folder, other = _copy(saves, tmp_path), _copy(saves, tmp_path, "b")
    path = SF.shard_path(folder, 1, 2)
    shutil.copy(SF.shard_path(other, 1, 2), path)
    _expect_failure(mode, folder, ValueError, path, _manifest(other)["save_id"], "interrupted")


@pytest.mark.parametrize("mode", MODES)
def test_manifest_of_one_save_shards_of_another(group, saves, tmp_path, mode):
    """Every shard replaced but the manifest not: the new save never committed."""
    folder, other = _copy(saves, tmp_path), _copy(saves, tmp_path, "b")
    shutil.copy(SF.manifest_path(other), SF.manifest_path(folder))
    _expect_failure(mode, folder, ValueError, SF.shard_path(folder, 0, 2), "interrupted")


@pytest.mark.parametrize("mode", MODES)
def test_missing_manifest(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    os.remove(SF.manifest_path(folder))
    _expect_failure(mode, folder, FileNotFoundError, SF.manifest_path(folder))


@pytest.mark.parametrize("mode", MODES)
def test_missing_shard(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    os.remove(SF.shard_path(folder, 1, 2))
    _expect_failure(mode, folder, FileNotFoundError, SF.shard_path(folder, 1, 2), _manifest(folder)["save_id"])


@pytest.mark.parametrize("mode", MODES)
def test_corrupted_bytes_fail_the_checksum(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    path = SF.shard_path(folder, 1, 2)
    raw = bytearray(open(path, "rb").read())
    raw[-5] ^= 0x01  # a low mantissa bit: the value stays finite and positive
    open(path, "wb").write(bytes(raw))
    _expect_failure(mode, folder, ValueError, path, "checksum")


@pytest.mark.parametrize("mode", MODES)
def test_manifest_rows_disagree_with_the_layout(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    doc = _manifest(folder)
    doc["shards"][0]["rows"], doc["shards"][1]["rows"] = 10, 7
    _write_manifest(folder, doc)
    _expect_failure(mode, folder, ValueError, SF.manifest_path(folder), "lists 10 rows")


@pytest.mark.parametrize("mode", MODES)
def test_manifest_of_another_world(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    doc = _manifest(folder)
    doc["world"] = 3
    _write_manifest(folder, doc)
    _expect_failure(mode, folder, ValueError, SF.manifest_path(folder), "world 3")


@pytest.mark.parametrize("mode", MODES)
def test_damaged_header(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    path = SF.shard_path(folder, 1, 2)
    raw = bytearray(open(path, "rb").read())
    raw[0:8] = (2 ** 40).to_bytes(8, "little")
    open(path, "wb").write(bytes(raw))
    _expect_failure(mode, folder, ValueError, path, "header length")


@pytest.mark.parametrize("mode", MODES)
def test_a_save_that_would_round_into_the_bank_dtype(group, saves, tmp_path, mode):
    folder = _copy(saves, tmp_path)
    crit = _fresh(mode, dtype=torch.bfloat16)
    before = crit.bank.clone()
    with pytest.raises(ValueError, match="F32 rows, this bank is torch.bfloat16"):
        D.load_bank(crit, folder)
    assert torch.equal(crit.bank, before)


def test_every_rank_reaches_the_same_verdict(saves):
    """Two ranks load a save whose rank-1 file is corrupted: rank 0 reads only file 0, yet
    both raise rank 1's error and neither wrote a row."""
    for res in saves["agree"]:
        assert res["outcome"].startswith("ValueError") and "checksum" in res["outcome"], res
        assert res["outcome"].endswith("(rank 1)"), res
        assert res["unchanged"]
        missing = res["missing"]  # the error keeps its type on the rank that did not fail
        assert missing["outcome"].startswith("FileNotFoundError") and "bank-rank1-of-2" in missing["outcome"], res
        assert missing["outcome"].endswith("(rank 1)") and missing["unchanged"], res


@pytest.mark.parametrize("mode", MODES)
def test_a_save_interrupted_before_its_manifest_does_not_load(group, saves, tmp_path, mode, monkeypatch):
    """The shard was replaced, the manifest (the commit) not: the load is an error, not the new rows
    under the old save's manifest."""
    folder = str(tmp_path / "s")
    D.save_bank(_fresh(mode), folder)

    def crash(*args, **kw):
        raise OSError("no space left on device")

    monkeypatch.setattr(SF, "write_manifest", crash)
    crit = _fresh(mode)
    crit(torch.randn(4, C), torch.arange(4))
    with pytest.raises(OSError, match="no space left"):
        D.save_bank(crit, folder)
    monkeypatch.undo()
    _expect_failure(mode, folder, ValueError, SF.shard_path(folder, 0, 1), "interrupted")


@pytest.mark.parametrize("mode", MODES)
def test_verification_and_copy_stream_in_small_chunks(group, saves, tmp_path, mode, monkeypatch):
    """With a one-row buffer, a two-rank save still re-shards exactly, and damage in a late
    chunk of a late file is still found before any row is written."""
    monkeypatch.setattr(SF, "CHUNK_BYTES", 4 * C)
    crit = _fresh(mode)
    D.load_bank(crit, os.path.join(saves["dir"], "a"))
    assert torch.equal(crit.full_bank(), saves["fulls"]["a"])
    folder = _copy(saves, tmp_path)
    path = SF.shard_path(folder, 1, 2)
    raw = bytearray(open(path, "rb").read())
    raw[-2] ^= 0xFF  # a byte of the last value, in the last one-row chunk
    open(path, "wb").write(bytes(raw))
    _expect_failure(mode, folder, ValueError, path, "checksum")
