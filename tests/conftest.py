import sys
from pathlib import Path

import pytest

# The tower catalogue (tests/towers/catalogue.py) is importable as `catalogue` from every folder.
sys.path.insert(0, str(Path(__file__).parent / "towers"))


@pytest.fixture(scope="session")
def vllm_rt():
    """vLLM's model-parallel state and a current VllmConfig for the whole session.

    Importing vLLM and building the config take seconds: paid once here.
    """
    from fxpass.vllm_context import vllm_runtime

    with vllm_runtime():
        yield
