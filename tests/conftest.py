import os
import sys

import pytest
import torch

# Tiny models run fastest single-threaded on the 2-core CI machine.
torch.set_num_threads(1)
sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
