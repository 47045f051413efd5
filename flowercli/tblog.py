"""`train --tensorboard`: the run's numbers and sample grids as TensorBoard events in <run>/tensorboard/.

A view for `tensorboard --logdir runs`; log.jsonl stays the record. Each log line's losses and
terms go under train/, its img/s under speed/, the quick FID and recall under quick/, the two
learning rates under lr/, and each sample grid as the image "samples", all at the line's step.
Written through torch.utils.tensorboard, which needs the `tensorboard` package (the extra of the
same name); only rank 0 writes. A resumed run purges what an earlier session logged after the
step it resumes from, so the curves show the run that went on.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowercli.errors import FlowerError

INSTALL_HINT = "pip install 'flowercli[tensorboard]'"
FOLDER = "tensorboard"
# Log fields that are no curve of their own (the step is the x axis; best is a marker of quick_fid).
_SKIP = frozenset({"step", "epoch", "time", "quick_n", "best"})
_TAGS = {"img_per_s": "speed/img_per_s", "quick_fid": "quick/fid", "quick_recall": "quick/recall",
         "quick_eval_seconds": "quick/eval_seconds"}


def check_available() -> None:
    """Refuse --tensorboard, before training starts, where the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise FlowerError(f"--tensorboard needs the tensorboard package: {INSTALL_HINT}") from None


class TensorBoardLog:
    """One SummaryWriter on <run>/tensorboard/ and the optimisers whose learning rates it records."""

    def __init__(self, folder: Path, optimizers: Mapping[str, torch.optim.Optimizer], step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: events an earlier session wrote after `step` belong to steps this run retrains.
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if step else None)
        self.optimizers = optimizers

    def record(self, step: int, record: Mapping[str, Any]) -> None:
        """One log.jsonl line: every number in it, and the learning rates at that step."""
        for key, value in record.items():
            if key not in _SKIP and isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(_TAGS.get(key, f"train/{key}"), value, step)
        for name, opt in self.optimizers.items():
            self.writer.add_scalar(f"lr/{name}", opt.param_groups[0]["lr"], step)

    def samples(self, grid: np.ndarray, step: int) -> None:
        """A sample grid, uint8 (H, W, 3)."""
        self.writer.add_image("samples", grid, step, dataformats="HWC")
        self.writer.flush()  # once an epoch: the newest numbers show without waiting for the writer's timer

    def close(self) -> None:
        self.writer.close()


@contextlib.contextmanager
def tensorboard_log(run_dir: Path, enabled: bool, optimizers: Mapping[str, torch.optim.Optimizer],
                    step: int) -> Iterator[TensorBoardLog | None]:
    """A TensorBoardLog on <run_dir>/tensorboard/ while the block runs, closed after; None when not `enabled`."""
    if not enabled:
        yield None
        return
    log = TensorBoardLog(run_dir / FOLDER, optimizers, step)
    try:
        yield log
    finally:
        log.close()
