from torchvision.transforms._functional import *  # noqa: F401,F403
from torchvision.transforms._functional import __all__  # noqa: F401

from ..._stub import missing


def __getattr__(name: str):
    return missing(__name__, name)
