"""A batch of decoded images of any sizes cropped, resized, flipped and normalised in one GPU launch.

``data.decode=device`` resizes every image of a batch to the training size. torchvision resizes one
image per call; a call per image (~770 PyTorch ops a batch of 256) in the decode thread hands the GIL
back and forth with the training thread, and on an H200 ResNet-50 trained at 0.68–0.78 of its step's
rate, waiting for its batches (BENCHMARKS, session 34). NVIDIA DALI batches this work but is not a
dependency here, and torchvision has no batched resize for images of different sizes. So this module
hand-writes the one kernel: each output pixel is torch's antialiased bilinear resize
(``F.interpolate(mode="bilinear", antialias=True)``, the filter torchvision's transforms use on tensors)
of its image's box, in one Triton launch that reads the images where nvJPEG wrote them, through a table
of their addresses and strides.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from t240dist.data import FIT, DataInfo

_BLOCK = 256  # output pixels a program computes, for all three channels


def crop_resize(
    images: Sequence[torch.Tensor],
    boxes: Sequence[tuple[int, int, int, int]],
    flips: Sequence[bool],
    info: DataInfo,
) -> torch.Tensor:
    """Normalised float images (N, 3, S, S) from uint8 images (3, H, W) of any strides on one device.

    Image i's box (top, left, height, width) is resized to S × S (``info.image_size``); the box ``FIT``
    resizes the whole image so that its shorter side is ``info.resize`` and centre-crops it (padding with
    black where it is smaller), as torchvision's ``Resize`` and ``CenterCrop`` do. Flipped images are
    mirrored after the resize; ``info.mean`` and ``info.std`` normalise them. Queued on the current CUDA
    device's current stream (the decode thread's); runs on CPU tensors under ``TRITON_INTERPRET=1``.
    """
    device, size = images[0].device, info.image_size
    rows = [_row(*case, size, info.resize) for case in zip(images, boxes, flips, strict=True)]
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    out = torch.empty(len(rows), 3, size, size, device=device)
    grid = (triton.cdiv(size * size, _BLOCK), len(rows))
    _crop_resize[grid](table, out, size, *info.mean, *info.std, BLOCK=_BLOCK)
    return out  # the images stay referenced until here: the launch is queued after their writers


def _row(image: torch.Tensor, box: tuple[int, ...], flip: bool, size: int, resize: int) -> list[int]:
    """The kernel's row for an image: its address and strides, its box (top, left, height, width), the size
    the box is resized to, the output's offset in that, and the flip."""
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"crop_resize takes uint8 (3, H, W) images, not {image.dtype} {tuple(image.shape)}")
    at = [image.data_ptr(), *image.stride()]
    if box != FIT:
        return [*at, *box, size, size, 0, 0, int(flip)]
    height, width = image.shape[1:]
    fit_h, fit_w = fitted_size(height, width, resize)
    # torchvision's centre crop: its offset rounds half to even, as Python's round does
    top, left = round((fit_h - size) / 2.0), round((fit_w - size) / 2.0)
    return [*at, 0, 0, height, width, fit_h, fit_w, top, left, int(flip)]


def fitted_size(height: int, width: int, shorter: int) -> tuple[int, int]:
    """The size torchvision's ``Resize(shorter)`` gives an image: its shorter side ``shorter``, the longer
    scaled and truncated."""
    if width <= height:
        return int(shorter * height / width), shorter
    return shorter, int(shorter * width / height)


@triton.jit
def _span(at, size_in, size_out):
    """Torch's antialiased bilinear taps for output index ``at`` along one axis (``_compute_weights_span``):
    the first input index, the end, the filter's centre, its inverse width, and how many taps to visit."""
    scale = size_in.to(tl.float32) / size_out.to(tl.float32)
    support = tl.maximum(scale, 1.0)
    centre = scale * (at.to(tl.float32) + 0.5)
    first = tl.maximum((centre - support + 0.5).to(tl.int32), 0)  # truncated toward zero, as in torch
    end = tl.minimum((centre + support + 0.5).to(tl.int32), size_in)
    taps = tl.ceil(support).to(tl.int32) * 2 + 1
    return first, end, centre, 1.0 / support, taps


@triton.jit
def _tent(at, end, centre, inverse_width):
    """The triangle filter's weight of input index ``at`` (0 past ``end``)."""
    weight = tl.maximum(1.0 - tl.abs((at.to(tl.float32) - centre + 0.5) * inverse_width), 0.0)
    return tl.where(at < end, weight, 0.0)


@triton.jit
def _crop_resize(table, out, size, mean0, mean1, mean2, std0, std1, std2, BLOCK: tl.constexpr):
    n = tl.program_id(1).to(tl.int64)
    row = table + n * 13  # _row's 13 columns
    src = tl.load(row).to(tl.pointer_type(tl.uint8))
    plane, pitch, step = tl.load(row + 1), tl.load(row + 2), tl.load(row + 3)  # strides: channel, row, pixel
    top, left, box_h, box_w = tl.load(row + 4), tl.load(row + 5), tl.load(row + 6), tl.load(row + 7)
    fit_h, fit_w, off_y, off_x = tl.load(row + 8), tl.load(row + 9), tl.load(row + 10), tl.load(row + 11)
    flip = tl.load(row + 12)
    pixel = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = pixel < size * size
    out_x = pixel % size
    fy = pixel // size + off_y  # the pixel's place in the box resized to fit_h × fit_w
    fx = tl.where(flip != 0, size - 1 - out_x, out_x) + off_x
    inside = live & (fy >= 0) & (fy < fit_h) & (fx >= 0) & (fx < fit_w)
    y0, y_end, cy, iy, taps_y = _span(fy, box_h, fit_h)
    x0, x_end, cx, ix, taps_x = _span(fx, box_w, fit_w)
    red = tl.full([BLOCK], 0.0, tl.float32)
    green = tl.full([BLOCK], 0.0, tl.float32)
    blue = tl.full([BLOCK], 0.0, tl.float32)
    total = tl.full([BLOCK], 0.0, tl.float32)
    for ky in range(0, taps_y):
        y = y0 + ky
        wy = _tent(y, y_end, cy, iy)
        for kx in range(0, taps_x):
            x = x0 + kx
            take = inside & (y < y_end) & (x < x_end)
            weight = tl.where(take, wy * _tent(x, x_end, cx, ix), 0.0)
            at = (top + y) * pitch + (left + x) * step
            red += weight * tl.load(src + at, mask=take, other=0).to(tl.float32)
            green += weight * tl.load(src + plane + at, mask=take, other=0).to(tl.float32)
            blue += weight * tl.load(src + 2 * plane + at, mask=take, other=0).to(tl.float32)
            total += weight
    scale = 1.0 / (255.0 * tl.maximum(total, 1e-30))  # total 0: black where the centre crop pads
    at = out + n * 3 * size * size + pixel
    tl.store(at, (red * scale - mean0) / std0, mask=live)
    tl.store(at + size * size, (green * scale - mean1) / std1, mask=live)
    tl.store(at + 2 * size * size, (blue * scale - mean2) / std2, mask=live)
