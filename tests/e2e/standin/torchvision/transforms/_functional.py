"""The implemented functions, shared by transforms.functional and transforms.v2.functional."""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["InterpolationMode", "pil_to_tensor", "to_pil_image", "resize", "normalize", "pad",
           "crop", "center_crop", "grayscale_to_rgb", "to_dtype"]


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def pil_to_tensor(pic) -> torch.Tensor:
    arr = np.array(pic, copy=True)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def to_pil_image(pic, mode=None):
    from PIL import Image

    if isinstance(pic, torch.Tensor):
        pic = pic.detach().cpu()
        if pic.ndim == 3:
            pic = pic.permute(1, 2, 0)
        pic = pic.numpy()
    if pic.ndim == 3 and pic.shape[2] == 1:
        pic = pic[:, :, 0]
    return Image.fromarray(pic, mode=mode)


_MODES = {
    InterpolationMode.NEAREST: "nearest",
    InterpolationMode.NEAREST_EXACT: "nearest-exact",
    InterpolationMode.BILINEAR: "bilinear",
    InterpolationMode.BICUBIC: "bicubic",
    # Not in F.interpolate: the nearest smooth one stands in (tests only).
    InterpolationMode.BOX: "bilinear",
    InterpolationMode.HAMMING: "bilinear",
    InterpolationMode.LANCZOS: "bicubic",
}


def resize(image: torch.Tensor, size, interpolation=InterpolationMode.BILINEAR,
           max_size=None, antialias=True) -> torch.Tensor:
    if isinstance(interpolation, int):  # a PIL resample constant
        interpolation = InterpolationMode.BILINEAR
    if isinstance(size, int):
        h, w = image.shape[-2:]
        short, long_ = (h, w) if h <= w else (w, h)
        new_short, new_long = size, int(size * long_ / short)
        size = [new_short, new_long] if h <= w else [new_long, new_short]
    size = [int(s) for s in size]
    mode = _MODES[interpolation]
    shape = image.shape
    x = image.reshape(-1, *shape[-3:]) if image.ndim >= 3 else image[None, None]
    dtype = x.dtype
    xf = x.float()
    kwargs = {}
    if mode in ("bilinear", "bicubic"):
        kwargs = {"align_corners": False, "antialias": bool(antialias)}
    out = F.interpolate(xf, size=size, mode=mode, **kwargs)
    if not dtype.is_floating_point:
        out = out.round().clamp(torch.iinfo(dtype).min, torch.iinfo(dtype).max)
    out = out.to(dtype)
    return out.reshape(*shape[:-2], *size) if image.ndim >= 3 else out[0, 0]


def normalize(tensor: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              inplace: bool = False) -> torch.Tensor:
    if not inplace:
        tensor = tensor.clone()
    mean_t = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device).view(-1, 1, 1)
    return tensor.sub_(mean_t).div_(std_t)


def pad(image: torch.Tensor, padding, fill=0, padding_mode: str = "constant") -> torch.Tensor:
    if isinstance(padding, int):
        left = top = right = bottom = padding
    elif len(padding) == 1:
        left = top = right = bottom = padding[0]
    elif len(padding) == 2:
        left = right = padding[0]
        top = bottom = padding[1]
    else:
        left, top, right, bottom = padding
    pads = [left, right, top, bottom]
    if padding_mode == "constant":
        return F.pad(image, pads, mode="constant", value=fill if fill is not None else 0)
    mode = {"edge": "replicate", "reflect": "reflect", "symmetric": "reflect"}[padding_mode]
    dtype = image.dtype
    return F.pad(image.float(), pads, mode=mode).to(dtype)


def crop(image: torch.Tensor, top: int, left: int, height: int, width: int) -> torch.Tensor:
    h, w = image.shape[-2:]
    if top < 0 or left < 0 or top + height > h or left + width > w:
        image = pad(image, [max(-left, 0), max(-top, 0), max(left + width - w, 0),
                            max(top + height - h, 0)])
        top, left = max(top, 0), max(left, 0)
    return image[..., top:top + height, left:left + width]


def center_crop(image: torch.Tensor, output_size) -> torch.Tensor:
    if isinstance(output_size, int):
        output_size = [output_size, output_size]
    th, tw = output_size
    h, w = image.shape[-2:]
    return crop(image, int(round((h - th) / 2.0)), int(round((w - tw) / 2.0)), th, tw)


def grayscale_to_rgb(image: torch.Tensor) -> torch.Tensor:
    if image.shape[-3] == 3:
        return image
    return image.expand(*image.shape[:-3], 3, *image.shape[-2:]).clone()


def to_dtype(image: torch.Tensor, dtype=torch.float32, scale: bool = False) -> torch.Tensor:
    if scale and not image.dtype.is_floating_point and dtype.is_floating_point:
        return image.to(dtype) / torch.iinfo(image.dtype).max
    return image.to(dtype)
