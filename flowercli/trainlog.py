"""A training run's record as it goes: rank 0's log.jsonl lines, their TensorBoard copy, the
progress display's losses and img/s, and a periodic debug echo.

Kept apart from train.py so that the loop reads top to bottom; `train()` makes one `TrainLog`
per session and writes a line through it at every `log_every` step.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flowercli.report import Reporter, Task

if TYPE_CHECKING:  # annotations only: importing this module needs neither torch nor the quick eval
    import torch

    from flowercli.quickeval import Scores
    from flowercli.tblog import TensorBoardLog


class TrainLog:
    """Rank 0's log.jsonl lines (and their TensorBoard copy), the progress display, and every 30 s
    (and at the end) a debug echo.

    `time` is wall-clock time since this process started training; img/s counts the training alone:
    the quick evals, sample grids and checkpoints run `paused()`, so the rate does not dip at each.
    """

    def __init__(self, path: Path, task: Task, report: Reporter, step0: int, steps_per_epoch: int,
                 total_steps: int, images_per_step: int, tb: TensorBoardLog | None = None):
        self.path, self.task, self.report, self.tb = path, task, report, tb
        self.step0, self.steps_per_epoch, self.total_steps = step0, steps_per_epoch, total_steps
        self.images_per_step = images_per_step
        self.t0 = self.t_echo = time.time()
        self.paused_seconds = 0.0

    def seconds(self) -> float:
        return time.time() - self.t0

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside is not training time (it still counts in `seconds`, on the same clock)."""
        t = time.time()
        try:
            yield
        finally:
            self.paused_seconds += time.time() - t

    def images_per_second(self, step: int) -> float:
        """Training throughput since this process started training (a resumed run counts from its
        resume), without the time spent `paused()`."""
        return (step - self.step0) * self.images_per_step / max(self.seconds() - self.paused_seconds, 1e-9)

    def write(self, step: int, stats: dict[str, torch.Tensor], scores: Scores | None = None) -> None:
        rate = self.images_per_second(step)
        values = {k: round(v.item(), 5) for k, v in stats.items()}
        record = {"step": step, "epoch": step / self.steps_per_epoch, **values, "img_per_s": round(rate, 1),
                  "time": round(self.seconds(), 2), **(scores.fields if scores else {})}
        write_jsonl(self.path, record)
        if self.tb:
            self.tb.record(step, record)
        self.task.update(loss_d=values["loss_d"], loss_g=values["loss_g"], img_s=round(rate, 1))
        if time.time() - self.t_echo > 30 or step == self.total_steps:
            self.report.debug(json.dumps(record))
            self.t_echo = time.time()


def write_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
