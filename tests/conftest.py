"""Shared test set-up: the scripts live at the repo root, tests run on the CPU with few threads."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU-only, even on a GPU machine

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny tensors (`pytestmark = pytest.mark.usefixtures("one_thread")`): as fast
    on an idle machine and several times faster on a loaded, shared one, where OpenMP threads spin-wait on each small
    op's barrier. Restored after the module, for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinyFeatures(torch.nn.Module):
    """A fixed random conv feature extractor standing in for Inception in FID tests (no downloads)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 8, 8), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten())

    def forward(self, x):  # (N, 3, 299, 299) floats in [0, 255], as clean-fid feeds them
        return self.net(x / 255.0)
