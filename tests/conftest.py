import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fedilora  # noqa: F401  (the torchvision shim before anything imports torchvision)


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    # generated benchmark data goes to a per-session directory, never to the user's cache
    os.environ["FEDILORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(autouse=True)
def _threads():
    import torch

    torch.set_num_threads(2)
