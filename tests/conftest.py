import os
import sys
from pathlib import Path

import pytest

# The tower catalogue (tests/towers/catalogue.py) is importable as `catalogue` from every folder.
sys.path.insert(0, str(Path(__file__).parent / "towers"))

# Tests that start process groups of their own (vLLM engines, tensor-parallel ranks): under
# pytest-xdist they run one after another on one worker, never two groups at once (each group
# sizes itself for the machine's two cores).
PROCESS_GROUPS = "processes"


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # two workers on two cores: with torch's default of one intra-op thread per core each,
        # their OpenMP threads spin against each other (a tower sweep ran 3x slower)
        import torch

        torch.set_num_threads(1)
    config.addinivalue_line(
        "markers", "processes: starts a group of processes (vLLM engines, TP ranks); under "
        "pytest-xdist these tests share one worker")


def _shared_fixture_scope(item: pytest.Item, root: str) -> str | None:
    """The widest scope a fixture of ``item`` shares with other tests, as a group name: the
    directory of a session fixture's conftest (not the root's, which every worker pays for
    anyway), or the module of a module / class fixture."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return None
    module = None
    for name in item.fixturenames:
        for fixturedef in info.name2fixturedefs.get(name, ()):
            if fixturedef.scope in ("session", "package") and fixturedef.baseid not in ("", root):
                return fixturedef.baseid
            if fixturedef.scope in ("module", "class"):
                module = item.nodeid.split("::")[0]
    return module


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems(config, items):
    """Groups for ``--dist loadgroup``: the tests that share an expensive fixture (or keep
    module-level results for a later test: an explicit ``xdist_group``) run on one worker,
    so a two-worker run builds each fixture once; every other test is scheduled alone."""
    root = Path(os.path.relpath(Path(__file__).parent, config.rootpath)).as_posix()  # ours
    for item in items:
        if item.get_closest_marker("xdist_group"):
            continue
        if item.get_closest_marker("processes"):
            group = PROCESS_GROUPS
        else:
            group = _shared_fixture_scope(item, root)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))
    result = yield  # xdist's worker turns the marks into "@group" node-id suffixes here
    if getattr(config.option, "loadgroup", False):  # set on xdist workers only
        lost = [i.nodeid for i in items if i.get_closest_marker("xdist_group")
                and "@" not in i.nodeid.rpartition("]")[2]]
        if lost:
            raise pytest.UsageError(
                f"pytest-xdist dropped the xdist_group of {len(lost)} tests (e.g. {lost[0]}): "
                "this pytest / pytest-xdist pair does not group (see tools/requirements.txt); "
                "run with -n 0, or with the pinned versions (bash tools/setup.sh)")
    return result


@pytest.fixture(scope="session")
def vllm_rt():
    """vLLM's model-parallel state and a current VllmConfig for the whole session.

    Importing vLLM and building the config take seconds: paid once here.
    """
    from fxpass.vllm_context import vllm_runtime

    with vllm_runtime():
        yield
