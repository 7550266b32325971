"""dps_fast.datasets.WithIndex, and the README quick start (copied verbatim, so it cannot rot)."""
import os
import re

import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset, Subset, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from dps_fast.datasets import WithIndex

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def test_tuple_samples_get_their_index_through_a_shuffling_loader():
    x, y = torch.arange(50.0)[:, None] * 10, torch.arange(50) % 3
    loader = DataLoader(WithIndex(TensorDataset(x, y)), batch_size=8, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    seen = []
    for xb, yb, index in loader:
        assert index.dtype == torch.int64
        assert torch.equal(xb[:, 0], index.float() * 10) and torch.equal(yb, index % 3)
        seen += index.tolist()
    assert sorted(seen) == list(range(50)) and seen != list(range(50))


def test_dict_and_plain_samples():
    class Dicts(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return {"pixel_values": torch.full((2,), float(i)), "labels": i}

    batch = next(iter(DataLoader(WithIndex(Dicts()), batch_size=4)))
    assert torch.equal(batch["index"], torch.arange(4)) and torch.equal(batch["labels"], torch.arange(4))
    assert WithIndex(torch.arange(5) * 2)[3] == (torch.tensor(6), 3)  # a tensor "dataset": (sample, index)
    assert WithIndex(Dicts(), key="idx")[1]["idx"] == 1
    with pytest.raises(KeyError, match="already has a key 'labels'"):
        WithIndex(Dicts(), key="labels")[0]


def test_negative_and_out_of_range_indices():
    ds = WithIndex(TensorDataset(torch.arange(5)))
    assert ds[-1] == (torch.tensor(4), 4) and len(ds) == 5
    with pytest.raises(IndexError, match="index 5 out of range for a dataset of 5 samples"):
        ds[5]


def test_iterable_datasets_are_refused():
    class Stream(IterableDataset):
        def __iter__(self):
            return iter(range(3))

    with pytest.raises(TypeError, match="needs a map-style dataset"):
        WithIndex(Stream())


def test_subset_and_distributed_sampler_keep_positions():
    ds = WithIndex(TensorDataset(torch.arange(10) * 100))
    assert Subset(ds, [7, 2])[0] == (torch.tensor(700), 7)  # positions in the wrapped (training) set
    for rank in range(3):
        sampler = DistributedSampler(ds, num_replicas=3, rank=rank, shuffle=True, seed=1)
        for x, index in DataLoader(ds, batch_size=4, sampler=sampler):
            assert torch.equal(x, index * 100)


def test_readme_quick_start_runs_as_written():
    text = open(README).read()
    api = text[text.index("\n## Quick start\n"):]
    block = re.search(r"```python\n(.*?)```", api, re.S)[1]
    assert "WithIndex" in block and "crit.train()" in block and "crit.eval()" in block
    assert "MI" not in block.replace("mutual_information", "")  # the read-out's key is spelled out
    scope = {}
    exec(compile(block, "README.md (quick start)", "exec"), scope)
    readouts, crit = scope["readouts"], scope["crit"]
    assert set(readouts) == {"mean", "alpha0", "entropy", "expected_entropy", "mutual_information", "label_error"}
    assert scope["suspects"].shape == (5,) and 0 <= float(scope["acc"]) <= 1
    # three epochs of 512 samples: every row saw exactly three evidences (docs/method.md)
    g = crit.gamma
    mass = g ** 3 * (100 + 9 * 1e-2) + (1 - g ** 3) / (1 - g)
    torch.testing.assert_close(readouts["alpha0"], torch.full((512,), mass), rtol=1e-5, atol=1e-5)
