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


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    """accelerate keeps mixed precision (and the rest of an Accelerator's set-up) in process-wide
    singletons, and a new Accelerator with another setting is refused (vfeedback says so with a
    RunError). One test's trainer (TRL's GRPO trainer, a dry run with another precision) must not
    decide a later test's setting: reset after each test, as accelerate's own test suite does
    (a private call, in tests only; the process group is kept)."""
    import sys

    yield
    if "accelerate" in sys.modules:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
