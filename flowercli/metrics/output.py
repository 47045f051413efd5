"""What `flowercli eval` writes: report.json (NaN as null, keys sorted) and samples.png, each
written atomically (fsutil.atomic_write) so an interrupted run never leaves half a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np


def write_sheet(images: np.ndarray, captions: list[str], path: Path, ncol: int = 8, scale: int = 2) -> Path:
    """A PNG contact sheet: each image enlarged `scale` times with its caption wrapped beneath it."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from flowercli.fsutil import atomic_write

    n, h, w, _ = images.shape
    cell_w, img_h = w * scale, h * scale
    font = ImageFont.load_default()
    chars = max(8, cell_w // 6)
    wrapped = [textwrap.wrap(c, chars)[:6] for c in captions]
    line_h = 11
    text_h = line_h * max((len(lines) for lines in wrapped), default=1) + 4
    nrow = -(-n // ncol)
    pad = 4
    sheet = Image.new("RGB", (ncol * (cell_w + pad) + pad, nrow * (img_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        r, c = divmod(i, ncol)
        x, y = pad + c * (cell_w + pad), pad + r * (img_h + text_h + pad)
        sheet.paste(Image.fromarray(images[i]).resize((cell_w, img_h), Image.Resampling.NEAREST), (x, y))
        for k, line in enumerate(wrapped[i]):
            draw.text((x, y + img_h + 2 + k * line_h), line, fill=(0, 0, 0), font=font)
    atomic_write(Path(path), lambda f: sheet.save(f, format="PNG"))
    return Path(path)


def write_report(report: dict[str, Any], path: Path) -> Path:
    """report.json: indented, keys sorted, numpy scalars as numbers (NaN must be gone: json_ready)."""
    from flowercli.fsutil import atomic_write

    text = json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n"
    atomic_write(Path(path), lambda f: f.write(text.encode()))
    return Path(path)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    raise TypeError(type(x).__name__)


def json_ready(x):
    """NaN is not JSON: report missing numbers as null."""
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    if isinstance(x, (float, np.floating)):
        return None if not np.isfinite(x) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    return x
