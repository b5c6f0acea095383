from torchvision.transforms import functional, v2  # noqa: F401
from torchvision.transforms._functional import InterpolationMode  # noqa: F401

from .._stub import missing


def __getattr__(name: str):
    return missing(__name__, name)
