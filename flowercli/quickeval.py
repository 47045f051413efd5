"""`train --eval-every STEPS`: a quick FID of the EMA generator while it trains, and checkpoints/best.pt.

Every STEPS steps and at the last step, the EMA generator draws `quick_eval_n` images (default 512)
from the captions of the run's evaluated split, the side `flowercli eval` measures by default (for a
"classes" run the unseen test classes), in eval's fixed caption order with eval's noise seeds: the
measurement of `flowercli eval --n 512` on that step's checkpoint, without its other sections. FID
at 512 images reads higher than eval's at 2,048 (the estimate is biased by N); it is for comparing
the steps of a run, and runs with each other.

The real side is the split's images only (~1,155 for the test classes, not all 8,189): their
Inception features and statistics are computed once and cached under <data>/cache/eval/ by eval's
own code (metrics/real.py), keyed by the network, the image size and the split's files, so a cold
start pays for the split alone and a second run for nothing. Recall (k-NN, metrics/prdc.py) comes
from the same features. The Inception network is found the way eval finds it (`inception`, then
$FLOWERCLI_INCEPTION, the offline copy, the download) when training starts, so a missing one stops
the run before its first step, and loaded on the first quick eval, once.

None of it changes the training trajectory: the images come from a copy of G_ema whose BatchNorm
statistics are recomputed in the copy exactly as a checkpoint recomputes them (so the score belongs
to the weights the step's checkpoint holds), in eval mode, in fp32 as `flowercli generate` draws,
each from its own seeded torch.Generator. The global RNGs, the step's generators and G_ema itself
are never touched.

When a score is the lowest so far, checkpoints/best.pt becomes a hard link to that step's
checkpoint (the loop writes one at that step if it had none), so rotation (--keep) cannot delete it.
The step's log.jsonl line gets quick_fid, quick_recall, quick_eval_seconds, quick_n and, with a new
best, best{step, quick_fid, checkpoint}; a resumed run reads its best so far back from there, of the
steps up to the one it resumes from. A resume from an older checkpoint trains the later steps again,
so a best.pt of one of them is pointed back at the best before it, or removed when that checkpoint
is gone (`reconcile_best`).
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from flowercli.config import DataLayout, EvalConfig, TrainConfig
from flowercli.errors import CheckpointError, DataError, InputError
from flowercli.report import Reporter, Task
from flowercli.traindata import TrainData

if TYPE_CHECKING:  # both are imported where they are used
    from flowercli.metrics.features import InceptionExtractor
    from flowercli.models import Generator

# Eval's protocol settings (seed, Inception precision, batch size, k of recall): the quick FID is the
# same measurement on fewer images, so it takes them from the one place they are defined.
PROTOCOL = EvalConfig()
MIN_N = 4  # the recall's k-th neighbour (k = 3) needs k + 1 generated images
MAX_N = 50_000  # as eval's --n
BEST = "best.pt"


def check_config(cfg: TrainConfig) -> None:
    """Refuse quick-eval settings that cannot work, before anything is written."""
    if cfg.eval_every < 0:
        raise InputError(f"--eval-every must be 0 (off) or a number of steps, got {cfg.eval_every}")
    if not cfg.eval_every:
        return
    if not MIN_N <= cfg.quick_eval_n <= MAX_N:
        raise InputError(f"quick_eval_n must be between {MIN_N} and {MAX_N}, got {cfg.quick_eval_n}")
    if cfg.inception is not None and not Path(cfg.inception).is_file():
        raise InputError(f"inception {cfg.inception}: no such file (the FID network for --eval-every)")


@dataclass
class Scores:
    """One quick eval: what the step's log line gets (`fields`), and whether it is the best so far."""

    step: int
    fid: float
    recall: float
    seconds: float
    n: int
    is_best: bool = False
    best: dict[str, Any] | None = field(default=None)  # set by QuickEval.measure when is_best

    @property
    def fields(self) -> dict[str, Any]:
        out = {"quick_fid": self.fid, "quick_recall": self.recall, "quick_eval_seconds": round(self.seconds, 2),
               "quick_n": self.n}
        return {**out, "best": self.best} if self.best else out


class _Lines(Reporter):
    """Messages through to the training's reporter, without progress bars of their own inside its bar."""

    def __init__(self, inner: Reporter):
        self.inner = inner

    def info(self, message: str) -> None:
        self.inner.info(message)

    def debug(self, message: str) -> None:
        self.inner.debug(message)

    def warn(self, message: str) -> None:
        self.inner.warn(message)

    def task(self, description: str, total: int | None = None):
        from contextlib import nullcontext

        return nullcontext(Task())


class QuickEval:
    """Rank 0's quick evaluator for one training process. Set-up checks everything the user can get
    wrong (data, network); the network and the real statistics load on the first `measure`."""

    def __init__(self, cfg: TrainConfig, data: TrainData, run_dir: Path, device: torch.device, step: int,
                 report: Reporter = Reporter()):
        from flowercli.embeddings import open_embeddings
        from flowercli.metrics.evaluate import split_masks
        from flowercli.metrics.features import find_inception

        self.cfg, self.data, self.device, self.report = cfg, data, device, _Lines(report)
        self.layout = DataLayout(cfg.data_dir)
        self.ckpt_dir = run_dir / "checkpoints"
        assert cfg.embeddings is not None  # train names the file before it builds the quick eval
        emb = open_embeddings(cfg.embeddings)
        self.mode, _, held = split_masks(emb, data.split)
        rows = np.flatnonzero(held)
        if len(rows) < MIN_N:
            raise DataError(f"--eval-every: the run's evaluated split has {len(rows)} images; the quick FID "
                            f"needs at least {MIN_N}")
        # Only what the quick eval reads, renumbered 0..n-1: eval's caption order depends on the
        # captions per image alone, so the same images are drawn as from the whole file.
        self.emb = SimpleNamespace(vectors=emb.vectors[rows], n_captions=np.asarray(emb.n_captions)[rows],
                                   image_ids=np.asarray(emb.image_ids, np.int64)[rows])
        find_inception(cfg.inception, self.layout.cache_dir, allow_download=PROTOCOL.allow_download,
                       reporter=self.report)
        self.extractor: InceptionExtractor | None = None
        self.real: np.ndarray | None = None
        self.stats: dict[str, Any] = {}
        self.best = best_from_log(run_dir / "log.jsonl", step) if (self.ckpt_dir / BEST).is_file() else None

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.cfg.eval_every == 0 or step == total_steps

    def measure(self, G_ema: Generator, step: int) -> Scores:
        """The quick FID and recall of G_ema's weights at `step`; G_ema is left exactly as it was."""
        from flowercli.generate import LoadedGenerator
        from flowercli.metrics.evaluate import SEED_OFFSETS
        from flowercli.metrics.fid import feature_stats, frechet_distance_fast
        from flowercli.metrics.generated import generated_side
        from flowercli.metrics.prdc import prdc
        from flowercli.models import recalibrate_batchnorm
        from flowercli.traindata import calibration_batches

        t = time.perf_counter()
        if self.extractor is None:
            self._load()
        assert self.real is not None  # _load sets it with the extractor
        G = copy.deepcopy(G_ema)
        recalibrate_batchnorm(G, calibration_batches(self.data, self.cfg, self.device))
        mcfg = self.cfg.model
        gen = LoadedGenerator(G=G.eval(), meta={"encoder_info": self.data.encoder}, checkpoint=Path(),
                              device=self.device, sample_condition=mcfg.sample_condition and mcfg.cond_aug)
        n = self.cfg.quick_eval_n
        _, feats, _, _ = generated_side(gen, self.extractor, self.emb, np.arange(len(self.emb.image_ids)), n,
                                        PROTOCOL.seed, PROTOCOL.seed + SEED_OFFSETS["main"], PROTOCOL.batch_size,
                                        f"{n} quick-eval images", self.report, {})
        mu, sigma = feature_stats(feats)
        s = self.stats
        fid = frechet_distance_fast(s["mu"], s["sigma"], mu, sigma, sqrt_sigma1=s["sqrt_sigma"])
        recall = prdc(self.real, feats, PROTOCOL.prdc_k)["recall"]
        # Rounded as logged, so that the best read back after a resume compares like with like.
        scores = Scores(step, round(fid, 5), round(recall, 5), time.perf_counter() - t, n)
        scores.is_best = math.isfinite(scores.fid) and (self.best is None or scores.fid < self.best["quick_fid"])
        if scores.is_best:  # named before the checkpoint exists: the step's log line is written first
            scores.best = {"step": step, "quick_fid": scores.fid, "checkpoint": f"checkpoints/step-{step:07d}.pt"}
        return scores

    def keep_best(self, scores: Scores, checkpoint: Path | None) -> None:
        """Point best.pt at `checkpoint` (this step's) when `scores` is the best so far."""
        if not scores.is_best:
            return
        from flowercli.checkpoint import link_checkpoint

        if checkpoint is None or checkpoint.name != f"step-{scores.step:07d}.pt":
            raise CheckpointError(f"no checkpoint of step {scores.step} to keep as {BEST}")  # the loop writes one
        try:
            link_checkpoint(checkpoint, BEST)
        except OSError as e:
            from flowercli.fsutil import write_error_text

            raise CheckpointError(f"could not point {self.ckpt_dir / BEST} at {checkpoint.name}: "
                                  f"{write_error_text(e)}; the checkpoints are intact") from None
        self.best = scores.best

    def _load(self) -> None:
        """The FID network, then the split's real features and statistics (each cached on disk)."""
        from flowercli.metrics.features import load_extractor
        from flowercli.metrics.real import real_cache_key, real_features, real_split_stats

        self.extractor = load_extractor(self.cfg.inception, self.layout.cache_dir, device=str(self.device),
                                        precision=PROTOCOL.precision, allow_download=PROTOCOL.allow_download,
                                        reporter=self.report)
        size, ids = self.cfg.model.image_size, self.emb.image_ids
        self.real, fingerprint = real_features(self.extractor, self.layout, ids, size, PROTOCOL.batch_size,
                                               self.report)
        key = {**real_cache_key(self.extractor, size, fingerprint, ids), "mode": self.mode}
        self.stats = real_split_stats(self.real, key, f"{self.mode}-{PROTOCOL.split}", self.layout.cache_dir,
                                      PROTOCOL.seed, self.report)


def best_from_log(path: Path, step: int) -> dict[str, Any] | None:
    """The newest `best` log.jsonl records at or before `step` (a resume from an older checkpoint
    retrains the steps after it), or None."""
    return _best_up_to(_logged_bests(path), step)


def _best_up_to(bests: list[dict[str, Any]], step: int) -> dict[str, Any] | None:
    return next((b for b in reversed(bests) if b["step"] <= step), None)


def _logged_bests(path: Path) -> list[dict[str, Any]]:
    """The `best` records of the run's log, oldest first, of the steps the run went on from.

    A resume appends: a line of step N supersedes every earlier line of step N or later, whose
    steps the resume trained again (as `flowercli report` keeps the later line of a step).
    """
    from flowercli.runreport import read_log

    kept: list[dict[str, Any]] = []
    for rec in read_log(path).records:
        while kept and kept[-1]["step"] >= rec["step"]:
            kept.pop()
        kept.append(rec)
    return [r["best"] for r in kept if isinstance(r.get("best"), dict)
            and isinstance(r["best"].get("quick_fid"), (int, float)) and isinstance(r["best"].get("step"), int)]


def reconcile_best(run_dir: Path, step: int, report: Reporter = Reporter()) -> None:
    """On resume from `step`: keep checkpoints/best.pt from pointing at a later step.

    A resume from an older checkpoint (the newer ones deleted or unreadable) trains the later steps
    again, so a best.pt of one of them describes weights the run will not have. It is pointed at
    the best step at or before `step` instead, or removed when that step's checkpoint is gone; the
    quick evals to come then measure against the same best (`best_from_log`).
    """
    from flowercli.checkpoint import link_checkpoint

    ckpt_dir = Path(run_dir) / "checkpoints"
    best_file = ckpt_dir / BEST
    bests = _logged_bests(Path(run_dir) / "log.jsonl")
    if not best_file.is_file() or not bests or bests[-1]["step"] <= step:
        return  # the log does not know what best.pt holds, or it holds a step that is kept
    later = bests[-1]["step"]
    kept = _best_up_to(bests, step)  # what best_from_log gives the quick evals to come
    source = ckpt_dir / f"step-{kept['step']:07d}.pt" if kept else None
    try:
        if source is not None and kept is not None and source.is_file():  # a source only with a kept best
            if os.path.samefile(source, best_file):
                return  # replaced by an earlier resume from here that logged nothing since
            link_checkpoint(source, BEST)
            report.warn(f"{best_file} held step {later}, after the resumed step {step}: it now holds step "
                        f"{kept['step']} (quick FID {kept['quick_fid']}), the best up to step {step}")
        else:
            best_file.unlink()
            why = "no quick eval up to it logged a best" if kept is None else \
                f"the checkpoint of its best before it (step {kept['step']}) is gone"
            report.warn(f"{best_file} held step {later}, after the resumed step {step}: removed, as {why}; "
                        "the next quick eval (--eval-every) makes a new one")
    except OSError as e:
        from flowercli.fsutil import write_error_text

        raise CheckpointError(f"could not replace {best_file} (step {later}, after the resumed step {step}): "
                              f"{write_error_text(e)}; remove it and resume again") from None
