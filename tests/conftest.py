import pytest


@pytest.fixture(scope="session")
def vllm_rt():
    """vLLM's model-parallel state and a current VllmConfig for the whole session.

    Importing vLLM and building the config take seconds: paid once here.
    """
    from fxpass.runtime import vllm_runtime

    with vllm_runtime():
        yield
