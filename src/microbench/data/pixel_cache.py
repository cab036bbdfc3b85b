"""Decode once per copy: a cache of decoded images at the model's input geometry.

Decoding μ-Bench's PNGs (3.57 GB, up to ~2k pixels) costs far more than encoding them on a GPU, and every model of a
leaderboard, every probe, study, specialist and merge method would pay it again. :class:`PixelCache` keeps each
image as ``uint8`` after the transform's *geometric* part (resize, crop, mode conversion) in one memory-mapped file
per (copy, geometry), and applies the rest (to float in [0, 1], normalisation) on read, so a cached image gives the
same tensor as the transform, bit for bit (``tests/test_pixel_cache.py``).

- Key: the copy's content fingerprint (image bytes included: :func:`microbench.data.loading.dataset_fingerprint`),
  the geometric steps' ``repr`` and the output shape; any change is another folder.
- Layout: ``<root>/<key>/pixels.u8`` (``rows × C × H × W``, a sparse file: only decoded images take disk), a
  per-slot checksum (``crc.u64``: CRC-32 of the slot's bytes, with a flag bit; a slot whose bytes do not match is
  decoded again) and ``meta.json``. One slot per row of the copy, read and written by row index, so ranks of a DDP
  run and DataLoader workers write disjoint slots of one layout; each process maps the files itself.
- Only transforms it can split are cached: a torchvision ``Compose`` (v1 or v2, open_clip's included) whose float
  conversion (``ToTensor``, ``MaybeToTensor`` or ``ToDtype(scale=True)``) follows fixed-size geometric steps and is
  followed only by ``Normalize``. Anything else (a transformers image processor, random augmentation, a transform
  whose output size depends on the image) decodes as before, said once in the log.
"""

from __future__ import annotations

import logging
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from microbench.results.io import cache_key, write_atomic, write_json

log = logging.getLogger(__name__)

FLOAT_STEPS = ("ToTensor", "MaybeToTensor")  # PIL -> float CHW in [0, 1]
RANDOM_STEPS = ("Random", "ColorJitter", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix", "GaussianBlur")
FILLED = np.uint64(1 << 32)


@dataclass
class SplitTransform:
    """A transform as ``geometry`` (image → uint8 CHW tensor of ``shape``) and ``finish`` (uint8 → the model input)."""

    geometry: object
    finish: object
    shape: tuple[int, int, int]
    description: str

    def __call__(self, image) -> torch.Tensor:
        return self.finish(self.to_uint8(image))

    def to_uint8(self, image) -> torch.Tensor:
        out = self.geometry(image)
        if isinstance(out, torch.Tensor):
            return out.to(torch.uint8).contiguous()
        arr = np.asarray(out.convert("RGB") if hasattr(out, "convert") else out, dtype=np.uint8)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def split_transform(transform) -> tuple[SplitTransform | None, str]:
    """``(SplitTransform, "")`` for a transform the cache can split (see the module doc), else ``(None, why)``."""
    steps = getattr(transform, "transforms", None)
    if steps is None:
        return None, f"{type(transform).__name__} is not a torchvision Compose"
    names = [type(s).__name__ for s in steps]
    if any(n.startswith(RANDOM_STEPS) for n in names):
        return None, "the transform is random (augmentation)"
    at = next((i for i, (n, s) in enumerate(zip(names, steps, strict=True)) if n in FLOAT_STEPS or (
        n == "ToDtype" and getattr(s, "scale", False))), None)
    if at is None:
        return None, f"no float conversion step in {names}"
    rest = steps[at + 1:]
    if any(type(s).__name__ != "Normalize" for s in rest):
        return None, f"steps after the float conversion other than Normalize: {names[at + 1:]}"
    from torchvision.transforms import Compose

    geometry = Compose(list(steps[:at]))
    norms = list(rest)
    finish = Finish(steps[at] if names[at] == "ToDtype" else None, norms)
    from PIL import Image

    probe = SplitTransform(geometry, finish, (0, 0, 0), "")
    shapes = {tuple(probe.to_uint8(Image.new("RGB", size)).shape) for size in ((301, 257), (128, 512), (640, 96))}
    if len(shapes) != 1:
        return None, f"the output size depends on the image ({sorted(shapes)}): no crop to a fixed size"
    shape = shapes.pop()
    description = repr(geometry).replace("\n", " ") + f" -> uint8 {shape}; then " + (
        ", ".join(repr(n).replace("\n", " ") for n in norms) or "float / 255")
    return SplitTransform(geometry, finish, shape, description), ""


class Finish:
    """uint8 CHW (or NCHW) → the model input: to float in [0, 1] (``ToTensor``'s ÷ 255 in float32, or v2
    ``ToDtype``'s own arithmetic), then each ``Normalize``; on whatever device the tensor is (picklable, so a batch
    can carry it from a DataLoader worker and be finished on the GPU: :func:`microbench.data.datamodule.pixels_of`)."""

    def __init__(self, to_float, norms: list) -> None:
        self.to_float, self.norms = to_float, norms

    def __call__(self, u8: torch.Tensor) -> torch.Tensor:
        x = self.to_float(u8) if self.to_float is not None else u8.to(torch.float32).div(255)
        for n in self.norms:
            x = n(x)
        return x


class PixelCache:
    """The decoded images of one copy at one geometry (module doc); :meth:`get` / :meth:`put` by row index."""

    def __init__(self, root: str | os.PathLike, fingerprint: str, n_rows: int, split: SplitTransform) -> None:
        self.split, self.n_rows, self.shape = split, int(n_rows), tuple(split.shape)
        key = cache_key({"data": fingerprint, "geometry": split.description, "rows": n_rows})
        self.folder = Path(root) / key
        self.slot_bytes = int(np.prod(self.shape))
        self._pid, self._pixels, self._crc = None, None, None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            from microbench.data.loading import MicroBenchDataError

            raise MicroBenchDataError(f"data.pixel_cache={root}: cannot create {self.folder} ({err.strerror}); pass a "
                                      "writable folder, or data.pixel_cache=null to decode every time") from None
        if not (self.folder / "meta.json").is_file():
            write_json(self.folder / "meta.json", {"fingerprint": fingerprint, "geometry": split.description,
                                                   "shape": list(self.shape), "rows": self.n_rows})
        for name, size in (("pixels.u8", self.n_rows * self.slot_bytes), ("crc.u64", self.n_rows * 8)):
            path = self.folder / name
            if not path.is_file() or path.stat().st_size != size:
                write_atomic(path, lambda p, size=size: os.truncate(p, size))  # sparse: only written slots take disk

    @property
    def estimate_bytes(self) -> int:
        return self.n_rows * self.slot_bytes

    def _maps(self):
        if self._pid != os.getpid():  # each process (DDP rank, DataLoader worker) maps the files itself
            self._pixels = np.memmap(self.folder / "pixels.u8", dtype=np.uint8, mode="r+",
                                     shape=(self.n_rows, self.slot_bytes))
            self._crc = np.memmap(self.folder / "crc.u64", dtype=np.uint64, mode="r+", shape=(self.n_rows,))
            self._pid = os.getpid()
        return self._pixels, self._crc

    def filled(self) -> int:
        return int((self._maps()[1] & FILLED).astype(bool).sum())

    def get(self, row: int) -> torch.Tensor | None:
        """The cached uint8 image of ``row``, or None (not decoded yet, or its bytes fail their checksum)."""
        pixels, crc = self._maps()
        stamp = int(crc[row])
        if not stamp & int(FILLED):
            return None
        data = np.array(pixels[row])
        if zlib.crc32(data) != stamp & 0xFFFFFFFF:
            return None
        return torch.from_numpy(data).view(self.shape)

    def put(self, row: int, u8: torch.Tensor) -> None:
        if tuple(u8.shape) != self.shape:
            raise ValueError(f"pixel cache: image of shape {tuple(u8.shape)}, cache of {self.shape}")
        pixels, crc = self._maps()
        data = u8.numpy().reshape(-1)
        pixels[row] = data
        crc[row] = np.uint64(zlib.crc32(data)) | FILLED  # written after the pixels

    def flush(self) -> None:
        if self._pixels is not None and self._pid == os.getpid():
            self._pixels.flush()
            self._crc.flush()

    def __getstate__(self) -> dict:  # a DataLoader worker (spawn) maps the files itself
        return {k: (None if k in ("_pixels", "_crc", "_pid") else v) for k, v in self.__dict__.items()}


def describe_size(n_bytes: int) -> str:
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e9 else f"{n_bytes / 1e6:.1f} MB"
