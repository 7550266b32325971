import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402
import torch  # noqa: E402

from common import copy_bandwidth, environment  # noqa: E402

# copy bandwidth measured at the start and at the end of the run (the VM is shared)
_COPY_GBPS = []


@pytest.fixture(scope="session", autouse=True)
def _bench_env():
    torch.manual_seed(0)
    _COPY_GBPS.append(copy_bandwidth())
    yield


def pytest_benchmark_update_json(config, benchmarks, output_json):
    _COPY_GBPS.append(copy_bandwidth())
    output_json["dps_fast"] = {"environment": environment(), "copy_gbps": statistics.median(_COPY_GBPS),
                               "copy_gbps_runs": list(_COPY_GBPS), "load_avg": os.getloadavg()}
