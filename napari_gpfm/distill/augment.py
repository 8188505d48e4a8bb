"""DINOv2-style multi-crop augmentation driven by an explicit ``torch.Generator``.

Every random draw goes through the generator passed in, so a sample's crops are a pure function
of its seed (see :mod:`napari_gpfm.distill.data`) and resumed runs see the same pixels.
Two global crops (random-resized, bicubic) and ``local_number`` smaller local crops; each gets a
horizontal flip, colour jitter (random order), grayscale and Gaussian blur with their own
probabilities; the second global crop may also be solarized.

Optional stain augmentation (``crops.hed``, off unless ``p > 0``): HED jitter in colour
deconvolution space (Ruifrok & Johnston stain vectors, as ``skimage.color.rgb2hed``), each
stain's optical density scaled by ``U(1 - alpha, 1 + alpha)`` and shifted by
``U(-beta, beta)`` (Tellez et al. 2018), applied to a crop before the colour jitter. A config
without the ``crops.hed`` section draws exactly the random numbers it drew before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
#: Optical density floor of ``skimage.color.separate_stains`` (log(1e-6)).
OD_FLOOR = 1e-6
LOG_ADJUST = math.log(OD_FLOOR)
HED_OFF = {"p": 0.0, "alpha": 0.0, "beta": 0.0}


def _stain_matrices() -> tuple[torch.Tensor, torch.Tensor]:
    """(hed_from_rgb, rgb_from_hed) as float32 tensors (scikit-image's H&E-DAB vectors)."""
    from skimage.color import hed_from_rgb, rgb_from_hed

    return (torch.as_tensor(hed_from_rgb, dtype=torch.float32),
            torch.as_tensor(rgb_from_hed, dtype=torch.float32))


def rgb_to_hed(image: torch.Tensor, clip: bool = True) -> torch.Tensor:
    """uint8 (3, H, W) RGB -> float (3, H, W) H, E, DAB densities (``skimage.color.rgb2hed``;
    ``clip=False`` keeps its negative densities, so that :func:`hed_to_rgb` inverts it)."""
    hed_from_rgb, _ = _stain_matrices()
    rgb = (image.float() / UINT8_MAX).clamp_min(OD_FLOOR)
    od = torch.log(rgb) / LOG_ADJUST
    stains = torch.einsum("chw,cd->dhw", od, hed_from_rgb)
    return stains.clamp_min(0) if clip else stains


def hed_to_rgb(stains: torch.Tensor) -> torch.Tensor:
    """float (3, H, W) H, E, DAB -> uint8 (3, H, W) RGB (``skimage.color.hed2rgb``, rounded)."""
    _, rgb_from_hed = _stain_matrices()
    log_rgb = torch.einsum("dhw,dc->chw", stains * LOG_ADJUST, rgb_from_hed)
    rgb = torch.exp(log_rgb).clamp(0, 1)
    return (rgb * UINT8_MAX).round().to(torch.uint8)


def hed_jitter(image: torch.Tensor, scale: Sequence[float], shift: Sequence[float]) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, H, W) with each stain density ``s * scale + shift``
    (scale 1 and shift 0 give the image back)."""
    stains = rgb_to_hed(image, clip=False)
    a = torch.as_tensor(scale, dtype=torch.float32).view(3, 1, 1)
    b = torch.as_tensor(shift, dtype=torch.float32).view(3, 1, 1)
    return hed_to_rgb(stains * a + b)


def random_hed_jitter(
    image: torch.Tensor, g: torch.Generator, alpha: float, beta: float
) -> torch.Tensor:
    """:func:`hed_jitter` with scale ``U(1 - alpha, 1 + alpha)`` and shift ``U(-beta, beta)``
    per stain, drawn from ``g``."""
    scale = [_uniform(g, 1 - alpha, 1 + alpha) for _ in range(3)]
    shift = [_uniform(g, -beta, beta) for _ in range(3)]
    return hed_jitter(image, scale, shift)


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
        self.hed = {**HED_OFF, **dict(crops.get("hed") or {})}

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
        if _coin(g, self.hed["p"]):
            x = random_hed_jitter(x, g, self.hed["alpha"], self.hed["beta"])
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
