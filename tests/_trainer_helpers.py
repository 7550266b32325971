"""Shared by the dps-train tests: run main() in-process and read its one-line errors."""
import pytest
import torch

from dps_fast.train import cli as Tr


@pytest.fixture(autouse=True)
def keep_threads():
    """--threads sets torch's global thread count; give the next tests theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def cli(capsys, *argv):
    """(exit code, stdout, stderr) of ``dps-train argv`` run in this process."""
    code = Tr.main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def error_of(capsys, *argv) -> str:
    """The one error line of a refused command (exit 2, no traceback), without its prefix."""
    code, out, err = cli(capsys, *argv)
    assert code == 2, (code, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dps-train: error: "), err
    return lines[0][len("dps-train: error: "):]
