import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_sd15():
    from vfeedback.models import load_model

    return load_model("sd15", "tiny:sd15")


@pytest.fixture(scope="session")
def tiny_sdxl():
    from vfeedback.models import load_model

    return load_model("sdxl", "tiny:sdxl")


@pytest.fixture
def fresh_sd15():
    """A private tiny SD1.5 (tests that add adapters must not touch the shared one)."""
    from vfeedback.models import load_model

    return load_model("sd15", "tiny:sd15")
