"""`flowercli report`'s PNG: losses, quick FID, img/s and the newest sample grid of a run, drawn
with matplotlib (the `plots` extra) on its Agg canvas: no display, and no change to the caller's
pyplot backend.

Apart from `runreport.py`, which reads the run and makes the summary with the standard library
only, so that the summary and `--json` work where matplotlib is not installed; `make_report`
imports this module only to draw.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowercli.errors import FlowerError
from flowercli.runreport import RunData, _num, curve, duration, sessions

if TYPE_CHECKING:  # matplotlib is optional (the plots extra): imported where the PNG is drawn
    from matplotlib.axes import Axes


def plots_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_report(run: RunData, summary: dict[str, Any], out: Path) -> Path:
    """Draw losses, quick FID, img/s and the newest sample grid into one PNG at `out` (atomically)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from flowercli.fsutil import atomic_write, write_error_text

    points = curve(run.log.records)
    steps = np.array([r["step"] for r in points], dtype=float)
    # Where training restarted (a resume): marked on every curve, since a jump there is expected.
    restarts = [s[0]["step"] for s in sessions(run.log.records)[1:]]
    main_terms = [k for k in ("loss_d", "loss_g") if k in summary["losses"]]
    other_terms = [k for k in summary["losses"] if k not in main_terms]
    panels = ["losses"] + (["terms"] if other_terms else []) + ["fid", "rate"]

    fig = Figure(figsize=(14, 2.3 * len(panels) + 1.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(len(panels), 2, width_ratios=[1.25, 1])
    axes: dict[str, Axes] = {}
    for i, name in enumerate(panels):
        axes[name] = fig.add_subplot(grid[i, 0], sharex=axes[panels[0]] if i else None)

    def series(ax, key, **kw):
        ys = np.array([_num(r.get(key), math.nan) for r in points], dtype=float)
        ok = ~np.isnan(ys)
        if not ok.any():
            return
        xs, ys = steps[ok], ys[ok]
        if len(ys) > 60:  # noisy at a line per log interval: faint raw values under a running mean
            w = max(2, len(ys) // 40)
            raw = ax.plot(xs, ys, alpha=0.25, lw=0.8, color=kw.get("color"))[0]
            kw = {**kw, "color": raw.get_color()}  # the mean in the colour of its raw values
            ys = np.convolve(ys, np.ones(w) / w, mode="valid")
            xs = xs[w - 1:]
        ax.plot(xs, ys, label=key, lw=1.4, **kw)

    def mark_restarts(ax):
        for j, x in enumerate(restarts):
            ax.axvline(x, color="0.5", ls=":", lw=1, label="resumed" if j == 0 else None)

    def empty(ax, text):
        ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4", fontsize=11)
        ax.set_yticks([])  # no values: a 0..1 scale would read as data

    ax = axes["losses"]
    for key, colour in zip(main_terms, ("tab:red", "tab:blue")):
        series(ax, key, color=colour)
    ax.set_ylabel("loss")
    ax.set_title("losses (D and G)", loc="left", fontsize=10)
    if not main_terms:
        empty(ax, "no losses logged yet")
    if "terms" in axes:
        ax = axes["terms"]
        for key in other_terms:
            series(ax, key)
        ax.set_ylabel("value")
        ax.set_title("other logged terms", loc="left", fontsize=10)
    ax = axes["fid"]
    fid = summary["quick_fid"]
    if fid["n"]:
        series(ax, "quick_fid", color="tab:green", marker="o", ms=3)
        b = fid["best"]
        if b and b["step"] is not None and b["value"] is not None:
            ax.plot([b["step"]], [b["value"]], "*", ms=12, color="gold", mec="k", label=f"best {b['value']:.2f}")
    else:
        empty(ax, "no quick FID logged")
    ax.set_ylabel("quick FID")
    ax.set_title("quick FID (lower is better)", loc="left", fontsize=10)
    ax = axes["rate"]
    series(ax, "img_per_s", color="tab:purple")
    if summary["img_per_s"]["latest"] is None:
        empty(ax, "no speed logged yet")
    ax.set_ylabel("img/s")
    ax.set_title("training speed (images per second)", loc="left", fontsize=10)
    ax.set_xlabel("step")
    for name in panels:
        ax = axes[name]
        mark_restarts(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="best")
        if name != panels[-1]:
            ax.tick_params(labelbottom=False)

    _sample_panel(fig.add_subplot(grid[:, 1]), run)
    fig.suptitle(_headline(summary), fontsize=12, x=0.01, ha="left")
    out = Path(out)
    try:
        atomic_write(out, lambda f: fig.savefig(f, format="png"))
    except OSError as e:
        raise FlowerError(f"could not write {out}: {write_error_text(e)}; choose another --out") from None
    return out


def _sample_panel(ax, run: RunData) -> None:
    """The newest sample grid, its rows labelled with the prompts they were drawn for."""
    ax.set_xticks([])
    ax.set_yticks([])
    if not run.samples:
        ax.text(0.5, 0.5, "no sample grid yet", ha="center", va="center", transform=ax.transAxes, color="0.4")
        ax.set_title("newest samples", fontsize=10)
        return
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    path = run.samples[-1]
    try:
        with Image.open(path) as im:
            img = np.asarray(im.convert("RGB"))
    except (OSError, UnidentifiedImageError):  # a grid being written right now, or damaged
        ax.text(0.5, 0.5, f"{path.name} is unreadable", ha="center", va="center", transform=ax.transAxes)
        return
    ax.imshow(img, interpolation="nearest")
    ax.set_title(f"newest samples: {path.name} (rows: prompts, columns: seeds)", fontsize=10)
    try:
        prompts = [p for p in (path.parent / "prompts.txt").read_text().splitlines() if p.strip()]
    except (OSError, UnicodeDecodeError):
        prompts = []
    if prompts:
        rows = len(prompts)
        ax.set_yticks([(i + 0.5) * img.shape[0] / rows for i in range(rows)])
        ax.set_yticklabels([p if len(p) <= 42 else p[:41] + "…" for p in prompts], fontsize=7)


def _headline(s: dict[str, Any]) -> str:
    parts = [s["name"]]
    if s["step"] is not None:
        parts.append(f"step {s['step']:,}" + (f", epoch {s['epoch']:.2f}" if s["epoch"] is not None else ""))
    if s["time"]["wall_s"] is not None:
        parts.append(f"{duration(s['time']['wall_s'])} wall clock")
    if s["captions"]["archive"]:
        parts.append(f"captions {s['captions']['archive']}")
    return " | ".join(parts)
