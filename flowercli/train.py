"""Training: the whole loop, top to bottom, in `train()`; one step in `run_step()`.

A step is a D update, a G update (the terms of both in losses.Objective) and the EMA update.
Randomness is derived from (seed, step, rank) at every step rather than carried in one stream, so
a run resumed from any checkpoint continues exactly as if it had never stopped (on CPU, bit for bit).
Data parallel runs start under torchrun; each rank trains on its slice of every batch and the
gradients are averaged across ranks (distributed.py).

The helpers live beside the code they share: devices and precision in device.py, the config in
runconfig.py, the data and batches in traindata.py, seeds in rng.py, the run lock in fsutil.py;
the quick FID and best.pt (`eval_every`) in quickeval.py, TensorBoard (`tensorboard`) in tblog.py,
the log.jsonl lines, img/s and the progress display in trainlog.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowercli import __version__
from flowercli.checkpoint import list_checkpoints, load_latest, save_checkpoint
from flowercli.config import DataLayout, ModelConfig, TrainConfig
from flowercli.device import (
    StepOptions,
    adam_flags,
    autocast,
    resolve_adam,
    resolve_device,
    resolve_precision,
    resolve_threads,
    torch_threads,
)
from flowercli.distributed import all_reduce_grads, barrier, join_world, leave_world, max_over_ranks, world_and_rank
from flowercli.errors import CheckpointError, DataError, FlowerError, InputError, Interrupted
from flowercli.fsutil import StopFlag, atomic_write, nearest_existing, run_lock
from flowercli.losses import Objective, ema_decay, ema_update
from flowercli.models import Discriminator, Generator, count_parameters, recalibrate_batchnorm
from flowercli.quickeval import QuickEval, reconcile_best
from flowercli.quickeval import check_config as check_quick_eval
from flowercli.report import Reporter
from flowercli.rng import rng_states, set_rng_states, step_generator
from flowercli.runconfig import (
    check_fresh_start,
    config_differences,
    config_from_dict,
    config_to_dict,
    data_differences,
    validate_config,
)
from flowercli.tblog import check_available as check_tensorboard
from flowercli.tblog import tensorboard_log
from flowercli.traindata import (
    SAMPLE_PROMPTS,
    Batch,
    TrainData,
    calibration_batches,
    epoch_order,
    find_embeddings,
    load_train_data,
    make_batch,
)
from flowercli.trainlog import TrainLog

SAMPLE_NOISE = 8  # columns of the sample grid (its rows: traindata.SAMPLE_PROMPTS)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    epoch: int
    checkpoint: Path | None
    seconds: float
    images_per_second: float
    is_main: bool = True  # False on the other ranks of a distributed run: they report nothing


def train(cfg: TrainConfig, report: Reporter = Reporter()) -> TrainResult:
    """Train the run `cfg` describes; with cfg.resume, continue it from its newest checkpoint."""
    # Set-up: torchrun sets WORLD_SIZE and RANK; a plain run is a world of one.
    world, rank = world_and_rank()
    is_main = rank == 0
    device, owns_group = join_world(resolve_device(cfg.device), world, rank)
    autocast_dtype = resolve_precision(cfg.precision, device)
    adam, threads = resolve_adam(cfg.adam, device), resolve_threads(cfg.threads)
    cfg = _named_and_checked(cfg)
    assert cfg.run is not None and cfg.embeddings is not None  # _named_and_checked fills both in
    run_dir, emb_path = Path(cfg.runs_dir) / cfg.run, cfg.embeddings
    ckpt_dir = run_dir / "checkpoints"
    created = _make_run_dir(run_dir)
    try:
        with run_lock(run_dir) if is_main else contextlib.nullcontext(), StopFlag() as stop, torch_threads(threads):
            # Resume: the newest readable checkpoint, with a config and data that agree on everything frozen.
            cfg, state = _resume_or_start(cfg, run_dir, ckpt_dir, is_main, report)
            data = load_train_data(cfg, emb_path, report)  # the resume keeps the embeddings file
            if state is not None:
                _check_same_data(state, data, emb_path)
            cfg = replace(cfg, model=replace(cfg.model, text_dim=data.vectors.shape[-1], n_classes=len(data.classes)))

            # Models and optimisers. Same seed on every rank, so the replicas start identical.
            torch.manual_seed(cfg.seed)
            nets = build_nets(cfg.model, cfg, device, cfg.channels_last, adam)
            for m in (nets.G, nets.G_ema):
                m.text_mean.copy_(data.text_mean)
                m.text_std.copy_(data.text_std)
            step = 0 if state is None else _restore(nets, state, adam, run_dir, report)
            if is_main and state is not None:
                reconcile_best(run_dir, step, report)  # a best.pt of a step being trained again is replaced
            n_train = len(data.labels)
            steps_per_epoch, total_steps = _schedule(cfg, n_train, world)
            # BatchNorm in D mixes statistics across a batch: real, mismatched and fake must then go
            # through D separately. Without it one concatenated forward computes the same thing faster.
            opts = StepOptions(device, autocast_dtype, cfg.channels_last, one_d_forward=cfg.model.spectral_norm,
                               world=world)
            if is_main:
                _write_run_files(run_dir, cfg, data, nets, world=world, device=device, autocast_dtype=autocast_dtype,
                                 adam=adam, threads=threads)
                report.info(f"Training {run_dir}: {n_train} images, {len(data.classes)} classes, split {data.split}, "
                            f"{steps_per_epoch} steps/epoch, device {device}, precision {autocast_dtype or 'fp32'}, "
                            f"{threads} threads")
            # Rank 0's quick FID (eval_every): set up here, so missing data or a missing FID network
            # stops the run before its first step.
            quick = QuickEval(cfg, data, run_dir, device, step, report) if is_main and cfg.eval_every else None

            # The loop: each rank takes its slice of the epoch's order; rank 0 logs, samples and saves.
            last_ckpt = None
            order_epoch, order = -1, torch.empty(0, dtype=torch.int64)  # replaced at the first step
            nets.G.train()
            nets.D.train()
            with report.task(f"Training {cfg.run}", total=total_steps) as task, tensorboard_log(
                    run_dir, is_main and cfg.tensorboard, {"G": nets.opt_G, "D": nets.opt_D}, step) as tb:
                log = TrainLog(run_dir / "log.jsonl", task, report, step, steps_per_epoch, total_steps,
                               images_per_step=cfg.batch_size * world, tb=tb)
                task.advance(step)
                while step < total_steps:
                    epoch, i = divmod(step, steps_per_epoch)
                    if epoch != order_epoch:
                        order_epoch, order = epoch, epoch_order(cfg.seed, epoch, n_train)
                    start = (i * world + rank) * cfg.batch_size
                    stats = run_step(nets, data, order[start: start + cfg.batch_size], step, cfg, opts, rank)
                    step += 1
                    task.advance()
                    stop_now = max_over_ranks(stop.signum, world, device)  # in step with the other ranks

                    # Quick FID (rank 0, not when asked to stop), samples, checkpoints (one at a new best
                    # quick FID too, which best.pt then points at), logging.
                    end_of_epoch = step % steps_per_epoch == 0
                    due = quick is not None and quick.due(step, total_steps) and not stop_now
                    with log.paused():
                        scores = quick.measure(nets.G_ema, step) if due and quick is not None else None
                    if is_main and end_of_epoch and ((step // steps_per_epoch) % cfg.sample_every == 0
                                                     or step == total_steps):
                        with log.paused():
                            grid = _save_samples(nets.G_ema, data, cfg, device, run_dir, step // steps_per_epoch)
                            if tb:
                                tb.samples(grid, step)
                    # The step's log line comes before its checkpoint: a run never holds a checkpoint of a
                    # step its log does not record (a full disk while logging keeps the previous checkpoint).
                    if is_main and (step % cfg.log_every == 0 or step == total_steps or scores):
                        log.write(step, stats, scores)
                    if is_main and (end_of_epoch or step % cfg.checkpoint_every == 0 or step == total_steps
                                    or stop_now or (scores and scores.is_best)):
                        with log.paused():
                            saved = _checkpoint_state(nets, data, cfg, device, step, step // steps_per_epoch)
                            last_ckpt = save_checkpoint(saved, ckpt_dir, cfg.keep)
                    if scores and quick is not None:  # scores come from `quick` alone
                        quick.keep_best(scores, last_ckpt)
                    if stop_now:
                        raise Interrupted(f"stopped by {signal.Signals(stop_now).name} at step {step}; checkpoint "
                                          f"saved, continue with --resume --run {cfg.run}", stop_now)

            # The end.
            seconds, rate = log.seconds(), log.images_per_second(step)
            if is_main:
                report.info(f"Done: {step} steps in {seconds:.0f} s ({rate:.0f} img/s); checkpoint {last_ckpt}")
        if owns_group:
            barrier()  # no rank leaves while rank 0 still writes its checkpoint
        return TrainResult(run_dir, step, step // steps_per_epoch, last_ckpt, seconds, rate, is_main)
    except OSError as e:  # a full disk or a vanished folder while writing the log, config or samples
        from flowercli.fsutil import os_error_text

        _discard_if_empty(is_main, created, ckpt_dir)
        raise FlowerError(f"I/O error while training in {run_dir}: {os_error_text(e)}; checkpoints written so far "
                          "are intact, continue with --resume") from None
    except BaseException:
        _discard_if_empty(is_main, created, ckpt_dir)
        raise
    finally:
        if owns_group:
            leave_world()


# ---------------------------------------------------------------------------------------------
# What train() does at each stage, in the order it does it


def _named_and_checked(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with its run name and embeddings file filled in, refused if impossible (nothing written yet)."""
    from flowercli.data import check_data_dir

    layout = DataLayout(cfg.data_dir)
    check_data_dir(layout.root)
    run_name = cfg.run or time.strftime("run-%Y%m%d-%H%M%S")
    emb_path = Path(cfg.embeddings) if cfg.embeddings else find_embeddings(layout)
    if not emb_path.is_file():
        raise DataError(f"embeddings file {emb_path} does not exist; run `flowercli embed` first")
    cfg = replace(cfg, run=run_name, embeddings=emb_path)
    validate_config(cfg)
    check_quick_eval(cfg)
    if cfg.tensorboard:
        check_tensorboard()  # before anything is written
    # --resume on a run without a checkpoint starts it (see _resume_or_start): no check here.
    return cfg


def _make_run_dir(run_dir: Path) -> Path | None:
    """Create the run folder; return the topmost folder this created (the runs dir too, if new), so
    that a run that fails before its first checkpoint can remove it all."""
    absolute = Path(os.path.abspath(run_dir))
    existing = nearest_existing(absolute)
    created = None if existing == absolute else existing / absolute.relative_to(existing).parts[0]
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from flowercli.fsutil import write_error_text

        raise FlowerError(f"cannot create run folder {run_dir}: {write_error_text(e)}; "
                          "choose another --runs-dir") from None
    return created


def _discard_if_empty(is_main: bool, created: Path | None, ckpt_dir: Path) -> None:
    # A run that failed before its first checkpoint leaves nothing behind to trip over later.
    if is_main and created is not None and not any(ckpt_dir.glob("step-*.pt")):
        shutil.rmtree(created, ignore_errors=True)


def _resume_or_start(cfg: TrainConfig, run_dir: Path, ckpt_dir: Path, is_main: bool,
                     report: Reporter) -> tuple[TrainConfig, dict[str, Any] | None]:
    """(config, the checkpoint to continue from or None). Runs under the run lock."""
    if cfg.resume and not list_checkpoints(ckpt_dir):
        # Start-or-continue: a job script, a cluster requeue or torchrun's restarts run one command
        # line for the first start and every restart, so --resume with nothing to resume starts the
        # run. Checked under the lock; every rank sees the same folder (rank 0 writes no checkpoint
        # before the first step, which needs all ranks).
        check_fresh_start(cfg, run_dir)
        if is_main:
            report.warn(f"run {run_dir} has no checkpoint yet: starting it from step 0")
        cfg = replace(cfg, resume=False)
    if not cfg.resume:
        if ckpt_dir.is_dir() and any(ckpt_dir.glob("step-*.pt")):
            raise FlowerError(f"run {run_dir} already has checkpoints; add --resume to continue it or pick "
                              "another --run")
        return cfg, None
    state = load_latest(ckpt_dir, warn=report.warn)
    if state is None:
        raise CheckpointError(f"--resume: run {run_dir} has no readable checkpoint; start it without --resume")
    diffs = config_differences(config_from_dict(state["config"]), cfg)
    if diffs:
        raise CheckpointError(f"--resume: {'; '.join(diffs)} (run's vs now); resume with the run's settings "
                              "or start a new --run")
    return cfg, state


def _check_same_data(state: dict[str, Any], data: TrainData, emb_path: Path) -> None:
    diffs = data_differences(state["encoder"], data.encoder)
    if diffs:
        raise CheckpointError(f"--resume: the run was trained on other data than {emb_path}: {'; '.join(diffs)} "
                              "(run's vs now); resume with the embeddings it started on or start a new --run")


def _restore(nets: Nets, state: dict[str, Any], adam: str, run_dir: Path, report: Reporter) -> int:
    """Load a checkpoint's weights, optimiser moments and RNG states into `nets`; return its step."""
    for module, key in ((nets.G, "G"), (nets.D, "D"), (nets.G_ema, "G_ema")):
        module.load_state_dict(state[key])
    for opt, key in ((nets.opt_G, "opt_G"), (nets.opt_D, "opt_D")):
        opt.load_state_dict(state[key])
        set_adam_impl(opt, adam)
    set_rng_states(state["rng"])
    step = int(state["step"])
    report.info(f"Resuming {run_dir} from step {step} ({state['_path']})")
    return step


def _schedule(cfg: TrainConfig, n_train: int, world: int) -> tuple[int, int]:
    """(steps per epoch, total steps): every rank takes batch_size images of each step."""
    steps_per_epoch = n_train // (cfg.batch_size * world)
    if steps_per_epoch == 0:
        raise InputError(f"--batch-size {cfg.batch_size} is larger than the {n_train} training images; "
                         f"use --batch-size {n_train} or less")
    total_steps = steps_per_epoch * cfg.epochs
    return steps_per_epoch, min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps


def _write_run_files(run_dir: Path, cfg: TrainConfig, data: TrainData, nets: Nets, *, world: int,
                     device: torch.device, autocast_dtype: torch.dtype | None, adam: str, threads: int) -> None:
    """config.json (what the run is and what it resolved to here) and samples/prompts.txt."""
    atomic_write(run_dir / "config.json", lambda f: f.write(json.dumps(
        {"flowercli_version": __version__, "config": config_to_dict(cfg), "encoder": data.encoder,
         "split": data.split, "classes": data.classes, "world_size": world,
         "device": str(device), "precision": str(autocast_dtype or "fp32"), "adam": adam, "threads": threads,
         "parameters": {"G": count_parameters(nets.G), "D": count_parameters(nets.D)}}, indent=2).encode()))
    (run_dir / "samples").mkdir(exist_ok=True)
    (run_dir / "samples" / "prompts.txt").write_text("\n".join(data.sample_captions) + "\n")


def _save_samples(G_ema: Generator, data: TrainData, cfg: TrainConfig, device: torch.device, run_dir: Path,
                  epoch: int) -> np.ndarray:
    """Write samples/epoch-NNNN.png; return the grid."""
    from flowercli.images import save_png

    recalibrate_batchnorm(G_ema, calibration_batches(data, cfg, device))
    grid = sample_grid(G_ema, data, cfg, device)
    save_png(grid, run_dir / "samples" / f"epoch-{epoch:04d}.png")
    return grid


@torch.no_grad()
def sample_grid(G_ema: Generator, data: TrainData, cfg: TrainConfig, device: torch.device) -> np.ndarray:
    """Fixed prompts (rows) x fixed noise (columns) from the EMA generator, as one uint8 image."""
    from flowercli.images import make_grid, to_uint8

    g = torch.Generator().manual_seed(1234)
    z = torch.randn(SAMPLE_NOISE, cfg.model.noise_dim, generator=g)
    text = data.sample_vectors.repeat_interleave(SAMPLE_NOISE, dim=0)
    G_ema.eval()
    imgs = G_ema(z.repeat(SAMPLE_PROMPTS, 1).to(device), text.to(device))[0]
    return make_grid(to_uint8(imgs), ncol=SAMPLE_NOISE)


def _checkpoint_state(nets: Nets, data: TrainData, cfg: TrainConfig, device: torch.device, step: int,
                      epoch: int) -> dict[str, Any]:
    """What a checkpoint holds (checkpoint.py's format)."""
    # G_ema's BatchNorm statistics are recomputed for its own weights before it is saved.
    recalibrate_batchnorm(nets.G_ema, calibration_batches(data, cfg, device))
    return {"config": config_to_dict(cfg), "step": step, "epoch": epoch, "G": nets.G.state_dict(),
            "D": nets.D.state_dict(), "G_ema": nets.G_ema.state_dict(), "opt_G": nets.opt_G.state_dict(),
            "opt_D": nets.opt_D.state_dict(), "rng": rng_states(), "encoder": data.encoder,
            "data": {"split": data.split, "classes": data.classes, "data_dir": str(cfg.data_dir),
                     "embeddings": str(cfg.embeddings)}}


# ---------------------------------------------------------------------------------------------
# One training step: the loop above and bench/train_speed.py both run exactly this code.


@dataclass
class Nets:
    """What a step updates."""

    G: Generator
    D: Discriminator
    G_ema: Generator
    opt_G: torch.optim.Optimizer
    opt_D: torch.optim.Optimizer


def build_nets(mcfg: ModelConfig, cfg: TrainConfig, device: torch.device, channels_last: bool,
               adam: str = "forloop") -> Nets:
    """Fresh G, D, G_ema (= G) and their Adam optimisers, from the current global torch seed.

    `adam` picks the optimiser's implementation (forloop | foreach | fused): the same update,
    computed in a different order of float operations.
    """
    G, D = Generator(mcfg).to(device), Discriminator(mcfg).to(device)
    G_ema = Generator(mcfg).to(device)
    G_ema.load_state_dict(G.state_dict())
    G_ema.requires_grad_(False)
    if channels_last:
        # Module.to takes memory_format at run time; torch's overloads leave it out.
        G, D, G_ema = (m.to(memory_format=torch.channels_last) for m in (G, D, G_ema))  # type: ignore[call-overload]
    opt_G = torch.optim.Adam(G.parameters(), lr=cfg.lr_g, betas=(cfg.beta1, cfg.beta2), **adam_flags(adam))
    opt_D = torch.optim.Adam(D.parameters(), lr=cfg.lr_d, betas=(cfg.beta1, cfg.beta2), **adam_flags(adam))
    return Nets(G, D, G_ema, opt_G, opt_D)


def set_adam_impl(opt: torch.optim.Optimizer, adam: str) -> None:
    """A loaded optimiser state brings the saving run's implementation flags; use ours."""
    for group in opt.param_groups:
        group.update(adam_flags(adam))


def run_step(nets: Nets, data: TrainData, idx: torch.Tensor, step: int, cfg: TrainConfig, opts: StepOptions,
             rank: int = 0) -> dict[str, torch.Tensor]:
    """Everything the loop does for one step: draw the batch, update D and G, update the EMA."""
    g = step_generator(cfg.seed, step, rank, opts.device)
    gc = step_generator(cfg.seed, step, rank, torch.device("cpu"))
    batch = make_batch(data, idx, g, gc, cfg.model, opts)
    stats = train_step(nets, batch, g, cfg.model, opts)
    ema_update(nets.G_ema, nets.G, ema_decay(step, cfg.ema) if cfg.ema else 0.0)
    return stats


def train_step(nets: Nets, b: Batch, g: torch.Generator, mcfg: ModelConfig,
               opts: StepOptions) -> dict[str, torch.Tensor]:
    """One D update then one G update; returns detached scalars (loss_d, loss_g, ...). No host sync."""
    objective = Objective(mcfg, opts.one_d_forward)
    # D: (real image, caption) real; (other image, caption) and (G's image, caption) fake.
    nets.D.requires_grad_(True)
    with autocast(opts.device, opts.autocast_dtype):
        fake, mu, logvar = nets.G(b.z, b.text, b.eps)
        loss_d, d_stats = objective.d_loss(nets.D, b, fake, g)
    _update(nets.opt_D, nets.D, loss_d, opts.world)
    # G: make D call its images real (and of the caption's class).
    nets.D.requires_grad_(False)
    with autocast(opts.device, opts.autocast_dtype):
        loss_g, g_stats = objective.g_loss(nets.G, nets.D, b, fake, mu, logvar, g)
    _update(nets.opt_G, nets.G, loss_g, opts.world)
    return {"loss_d": loss_d.detach(), "loss_g": loss_g.detach(), **d_stats, **g_stats}


def _update(opt: torch.optim.Optimizer, module: torch.nn.Module, loss: torch.Tensor, world: int) -> None:
    """One optimiser step on `loss`, with the gradients averaged over ranks first."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    all_reduce_grads(module, world)
    opt.step()
