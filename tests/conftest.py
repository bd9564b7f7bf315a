"""Shared test fixtures."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module: tiny matrices gain nothing from more threads, and on a shared 2-core box
    (CI, notebooks running beside the tests) spin-waiting threads made CPU tests many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
