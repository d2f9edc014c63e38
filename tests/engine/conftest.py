import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Run each engine test on one intra-op thread, then restore the setting.

    The engine tests are many small ops; on a loaded 2-core machine OpenMP's thread barriers
    made them up to 100x slower (each op waited for a time slice), and one thread loses little
    even on the large table-model batches.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
