"""Training augmentation for image-level methods: random resized crop, horizontal flip, colour jitter.

:class:`TrainAugmentation` replaces :class:`~datamodules.images.ImageTransform` for the training split (the
``train_augmentation`` argument of :class:`~datamodules.images.ImageBenchmark`) and returns what it returns:
a float tensor in ``[0, 1]`` (the backbone normalises) and the map back to original pixels. Every training
image gets the same ``image_size`` x ``image_size`` shape, so training batches have a fixed size.

The operations are ``torchvision.transforms.v2.functional`` kernels; their random parameters are drawn as
``torchvision.transforms.v2.RandomResizedCrop`` / ``ColorJitter`` draw them, but from an optional
``torch.Generator`` (default: torch's global generator, which the DataLoader seeds in every worker), so a test
or a caller can make the augmentation reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypedDict

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF


class AugmentationSettings(TypedDict, total=False):
    """The arguments of :class:`TrainAugmentation`, typed, so that a command line or a sweep setting one of them
    (``--data.init_args.train_augmentation.image_size=96``) gets a number, not a string."""

    image_size: int
    scale: Sequence[float]
    ratio: Sequence[float]
    flip_probability: float
    brightness: float
    contrast: float
    saturation: float
    hue: float


class TrainAugmentation:
    """PIL image -> ``(pixels [3, image_size, image_size] float in [0, 1], to_original [4])``.

    Steps, in order: a random crop of ``scale`` of the image's area and aspect ratio in ``ratio`` (log-uniform)
    resized to ``image_size`` (bilinear, antialiased; after 10 failed draws the central crop, as torchvision),
    a horizontal flip with probability ``flip_probability``, then brightness, contrast, saturation and hue
    jitter in a random order (``torchvision`` ``ColorJitter`` semantics: a factor drawn uniformly in
    ``[1 - v, 1 + v]``, hue in ``[-v, v]``; 0 disables one).

    ``to_original`` holds ``(scale_x, scale_y, offset_x, offset_y)`` as for ``ImageTransform``: original pixel =
    transformed pixel * scale + offset; a flip makes ``scale_x`` negative.

    Defaults: ``scale=(0.25, 1)`` keeps at least a quarter of the image, milder than ImageNet's 0.08, since a
    landmark or product must stay recognisable in the crop; mild colour jitter (0.2), no hue change (a
    landmark's colours are part of what identifies it).
    """

    def __init__(
        self,
        image_size: int = 224,
        scale: Sequence[float] = (0.25, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        flip_probability: float = 0.5,
        brightness: float = 0.2,
        contrast: float = 0.2,
        saturation: float = 0.2,
        hue: float = 0.0,
    ):
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"train_augmentation: image_size must be a positive integer, got {image_size!r}")
        scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"train_augmentation: scale must be [min, max] with 0 < min <= max <= 1, got {scale}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"train_augmentation: ratio must be [min, max] with 0 < min <= max, got {ratio}")
        if not 0 <= flip_probability <= 1:
            raise ValueError(f"train_augmentation: flip_probability must be in [0, 1], got {flip_probability}")
        self.image_size, self.scale, self.ratio = image_size, scale, ratio
        self.flip_probability = float(flip_probability)
        # torchvision validates the jitter strengths and turns them into factor ranges (None = disabled).
        jitter = v2.ColorJitter(brightness=brightness, contrast=contrast, saturation=saturation, hue=hue)
        self.jitter_ranges = {
            "brightness": jitter.brightness,
            "contrast": jitter.contrast,
            "saturation": jitter.saturation,
            "hue": jitter.hue,
        }

    #: Every image gets the same shape (the datamodules then batch without grouping by shape).
    keeps_aspect_ratio = False

    def output_size(self, width: int, height: int) -> tuple[int, int]:
        return self.image_size, self.image_size

    def crop_box(self, width: int, height: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
        """``(top, left, crop height, crop width)`` of a random resized crop of a ``width`` x ``height`` image."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = area * _uniform(*self.scale, generator)
            aspect_ratio = math.exp(_uniform(*log_ratio, generator))
            crop_w = int(round(math.sqrt(target_area * aspect_ratio)))
            crop_h = int(round(math.sqrt(target_area / aspect_ratio)))
            if 0 < crop_w <= width and 0 < crop_h <= height:
                top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
                left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
                return top, left, crop_h, crop_w
        # Central crop with the aspect ratio clamped to ``ratio`` (torchvision's fallback).
        in_ratio = width / height
        if in_ratio < self.ratio[0]:
            crop_w, crop_h = width, int(round(width / self.ratio[0]))
        elif in_ratio > self.ratio[1]:
            crop_w, crop_h = int(round(height * self.ratio[1])), height
        else:
            crop_w, crop_h = width, height
        return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w

    def __call__(self, image: Image.Image, generator: torch.Generator | None = None):
        width, height = image.size
        top, left, crop_h, crop_w = self.crop_box(width, height, generator)
        size = [self.image_size, self.image_size]
        # On the PIL image: only the crop is resized, without converting the full-size image to a tensor first.
        image = TF.resized_crop(image, top, left, crop_h, crop_w, size, interpolation=v2.InterpolationMode.BILINEAR)
        scale_x, scale_y = crop_w / self.image_size, crop_h / self.image_size
        offset_x, offset_y = float(left), float(top)
        if _uniform(0.0, 1.0, generator) < self.flip_probability:
            image = TF.horizontal_flip(image)
            scale_x, offset_x = -scale_x, offset_x + crop_w  # x' = image_size - x mirrors the crop
        pixels = TF.to_dtype(TF.to_image(image), torch.float32, scale=True)
        pixels = self.color_jitter(pixels, generator)
        return pixels, torch.tensor([scale_x, scale_y, offset_x, offset_y], dtype=torch.float32)

    def color_jitter(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Brightness, contrast, saturation and hue jitter of float pixels in ``[0, 1]``, in a random order."""
        adjust = {
            "brightness": TF.adjust_brightness,
            "contrast": TF.adjust_contrast,
            "saturation": TF.adjust_saturation,
            "hue": TF.adjust_hue,
        }
        names = list(adjust)
        # Draw the order and every factor, enabled or not, so the draws do not depend on which are enabled.
        order = torch.randperm(len(names), generator=generator).tolist()
        factors = {name: torch.rand((), generator=generator).item() for name in names}
        for position in order:
            name = names[position]
            bounds = self.jitter_ranges[name]
            if bounds is not None:
                pixels = adjust[name](pixels, bounds[0] + factors[name] * (bounds[1] - bounds[0]))
        return pixels


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()
