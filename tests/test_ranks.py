"""tests/_ranks.py: leaving by os._exit must not hide a rank that failed."""
import pytest
import torch.multiprocessing as mp

from _ranks import failing_worker, spawn_ranks


def test_a_failing_rank_still_fails_the_spawn():
    with pytest.raises(mp.ProcessRaisedException, match="rank 1 failed on purpose"):
        spawn_ranks(failing_worker, 2, 1)


def test_finished_ranks_exit_cleanly():
    spawn_ranks(failing_worker, 2, -1)
