import pytest
import torch


@pytest.fixture(autouse=True)
def single_torch_thread():
    # The CI/dev machine is shared and small; OpenMP threads spinning against other
    # processes make tiny ops 100x slower, so these small tests run single-threaded.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
