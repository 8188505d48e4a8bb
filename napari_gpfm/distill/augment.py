"""DINOv2-style multi-crop augmentation driven by an explicit ``torch.Generator``.

Every random draw goes through the generator passed in, so a sample's crops are a pure function
of its seed (see :mod:`napari_gpfm.distill.data`) and resumed runs see the same pixels.
Two global crops (random-resized, bicubic) and ``local_number`` smaller local crops; each gets a
horizontal flip, colour jitter (random order), grayscale and Gaussian blur with their own
probabilities; the second global crop may also be solarized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from .config import Config

FLIP_P = 0.5
BLUR_KERNEL = 9
SOLARIZE_THRESHOLD = 128
CROP_ASPECT = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
UINT8_MAX = 255.0


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _coin(g: torch.Generator, p: float) -> bool:
    return p > 0 and float(torch.rand((), generator=g)) < p


def random_resized_crop_box(
    g: torch.Generator, height: int, width: int, scale: tuple[float, float]
) -> tuple[int, int, int, int]:
    """(top, left, h, w) covering a random ``scale`` share of the area, aspect in 3/4..4/3."""
    area = height * width
    log_low, log_high = math.log(CROP_ASPECT[0]), math.log(CROP_ASPECT[1])
    for _ in range(CROP_ATTEMPTS):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, log_low, log_high))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=g))
            left = int(torch.randint(0, width - w + 1, (), generator=g))
            return top, left, h, w
    side = min(height, width)  # fallback: the central square
    return (height - side) // 2, (width - side) // 2, side, side


@dataclass(frozen=True)
class CropStyle:
    """Probabilities that differ between the three kinds of crop."""

    size: int
    scale: tuple[float, float]
    blur_p: float
    solarize_p: float = 0.0


class MultiCropAugmentation:
    """uint8 CHW image -> ``{"global": [2 × (3,G,G)], "local": [n × (3,L,L)]}`` float tensors."""

    def __init__(self, cfg: Config, patch_size: int) -> None:
        crops = cfg["crops"]
        for key in ("global_size", "local_size"):
            if crops[key] % patch_size:
                raise ValueError(f"crops.{key}={crops[key]} is not divisible by patch {patch_size}")
        g_scale, l_scale = tuple(crops["global_scale"]), tuple(crops["local_scale"])
        blur = crops["blur_p"]
        self.global_styles = (
            CropStyle(crops["global_size"], g_scale, blur["global1"]),
            CropStyle(crops["global_size"], g_scale, blur["global2"], crops["solarize_p"]),
        )
        self.local_style = CropStyle(crops["local_size"], l_scale, blur["local"])
        self.local_number = int(crops["local_number"])
        self.jitter = dict(crops["jitter"])
        self.grayscale_p = float(crops["grayscale_p"])
        self.blur_sigma = tuple(crops["blur_sigma"])
        self.mean, self.std = list(crops["mean"]), list(crops["std"])

    def __call__(self, image: torch.Tensor, g: torch.Generator) -> dict[str, list[torch.Tensor]]:
        return {
            "global": [self._crop(image, style, g) for style in self.global_styles],
            "local": [self._crop(image, self.local_style, g) for _ in range(self.local_number)],
        }

    def _crop(self, image: torch.Tensor, style: CropStyle, g: torch.Generator) -> torch.Tensor:
        top, left, h, w = random_resized_crop_box(g, image.shape[-2], image.shape[-1], style.scale)
        x = TF.resized_crop(
            image, top, left, h, w, [style.size, style.size],
            interpolation=InterpolationMode.BICUBIC, antialias=True,
        )
        if _coin(g, FLIP_P):
            x = TF.horizontal_flip(x)
        if _coin(g, self.jitter["p"]):
            x = self._color_jitter(x, g)
        if _coin(g, self.grayscale_p):
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if _coin(g, style.blur_p):
            sigma = _uniform(g, *self.blur_sigma)
            x = TF.gaussian_blur(x, [BLUR_KERNEL, BLUR_KERNEL], [sigma, sigma])
        if _coin(g, style.solarize_p):
            x = TF.solarize(x, SOLARIZE_THRESHOLD)
        return TF.normalize(x.float() / UINT8_MAX, self.mean, self.std)

    def _color_jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Brightness, contrast, saturation and hue in a random order (as torchvision does)."""
        j = self.jitter

        def factor(key: str) -> float:
            return _uniform(g, 1 - j[key], 1 + j[key])

        ops = (
            lambda t: TF.adjust_brightness(t, factor("brightness")),
            lambda t: TF.adjust_contrast(t, factor("contrast")),
            lambda t: TF.adjust_saturation(t, factor("saturation")),
            lambda t: TF.adjust_hue(t, _uniform(g, -j["hue"], j["hue"])),
        )
        for index in torch.randperm(len(ops), generator=g).tolist():
            x = ops[index](x)
        return x
