import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

from common import copy_bandwidth, environment  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _bench_env():
    torch.manual_seed(0)
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["dps_fast"] = {"environment": environment(), "copy_gbps": copy_bandwidth()}
