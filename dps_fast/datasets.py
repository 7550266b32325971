"""Sample indices for DPS: wrap any map-style dataset so that it also yields each sample's index.

DPS keeps one posterior row per training sample, so every batch must say which samples
it holds (docs/method.md, "What one training step computes"). With a standard dataset and ``DataLoader``::

    from torch.utils.data import DataLoader, TensorDataset
    from dps_fast.datasets import WithIndex

    train = WithIndex(TensorDataset(X, Y))          # items are (x, y, index)
    loader = DataLoader(train, batch_size=128, shuffle=True)
    for x, y, index in loader:                      # index: positions in the training set
        ...

The index is the position ``i`` in the wrapped dataset (``dataset[i]``), an int, which
the default collate function turns into an int64 tensor [B]. Shuffling, samplers
(``DistributedSampler`` included) and ``Subset`` of the wrapper all keep it right,
because the index travels with the sample.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch.utils.data import Dataset

__all__ = ["WithIndex"]


class WithIndex(Dataset):
    """``WithIndex(dataset)[i]`` is ``dataset[i]`` with ``i`` appended.

    - a tuple or list sample ``(x, y)`` becomes ``(x, y, i)``;
    - a dict sample (Hugging Face style) gets the key ``key`` (default ``"index"``);
      a dict that already has that key is an error, so an index is never silently replaced;
    - any other sample ``x`` becomes ``(x, i)``.

    ``dataset`` must be map-style (``__getitem__`` and ``__len__``): an iterable-style
    dataset has no stable positions. Negative ``i`` is normalised to ``i + len``, so
    the yielded index is always a valid bank row.
    """

    def __init__(self, dataset, key: str = "index"):
        if not (hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__")):
            raise TypeError(f"WithIndex needs a map-style dataset (with __getitem__ and __len__), "
                            f"got {type(dataset).__name__}; an iterable dataset has no stable sample positions")
        self.dataset, self.key = dataset, key

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i):
        n = len(self.dataset)
        i = int(i)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"index {i} out of range for a dataset of {n} samples")
        sample = self.dataset[i]
        if isinstance(sample, Mapping):
            if self.key in sample:
                raise KeyError(f"the sample already has a key {self.key!r}; pass WithIndex(..., key=...)")
            return {**sample, self.key: i}
        if isinstance(sample, Sequence) and not isinstance(sample, (str, bytes)):
            return (*sample, i)
        return (sample, i)

    def __repr__(self) -> str:
        return f"WithIndex({self.dataset!r})"
