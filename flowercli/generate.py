"""Prompts in, PNG files out, with the EMA generator of a checkpoint (or the packaged model).

The checkpoint records which encoder made its training vectors (and how they were pooled), so a
new prompt is embedded the same way without the user saying so. Every image has its own seed:
image k of `--seed S` uses seed S + k, so `-n 4` gives the first four images of `-n 16`, and
`--seeds 0-15,42` names the seeds outright. An image depends only on its prompt, its seed and the
truncation, never on which other images are made with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from flowercli.checkpoint import load_checkpoint, resolve_run_checkpoint
from flowercli.config import GenerateConfig
from flowercli.device import resolve_device
from flowercli.errors import CheckpointError, EncoderError, FlowerError, InputError
from flowercli.fsutil import check_writable_dir, write_error_text
from flowercli.models import Generator
from flowercli.report import Reporter
from flowercli.runconfig import config_from_dict

MAX_IMAGES = 10_000  # per call; a typo like -n 1000000 should not fill the disk
PACKAGED = Path(__file__).parent / "pretrained" / "generator.safetensors"


@dataclass
class LoadedGenerator:
    G: Generator
    meta: dict[str, Any]  # split, embeddings, data_dir, encoder (+ whatever the checkpoint says)
    checkpoint: Path
    device: torch.device
    # Conditioning augmentation at generation: False uses each caption's mean condition; True samples
    # it (as in training, and StackGAN at test time) from the image's seed, for more variety per caption.
    sample_condition: bool = False
    # The truncation trick: every noise vector drawn for an image is scaled by this (0 < psi <= 1;
    # 1 = off). Both are N(0, I) draws, so scaling pulls them toward their mean: z, and with a sampled
    # condition its noise too (the condition moves toward the caption's mean, which it is at psi -> 0).
    truncation: float = 1.0
    _encoder: Any = field(default=None, repr=False)

    @property
    def image_size(self) -> int:
        return self.G.cfg.image_size

    @property
    def encoder_info(self) -> dict[str, Any]:
        return self.meta["encoder_info"]

    def text_encoder(self):
        """The encoder that made the training vectors, loaded on first use."""
        if self._encoder is None:
            from flowercli.textencoder import TextEncoder

            info = self.encoder_info
            try:
                self._encoder = TextEncoder.load(info["encoder"], pooling=info.get("pooling", "mean"),
                                                 max_length=int(info.get("max_length", 128)), device=str(self.device))
            except EncoderError as e:
                # The loader's advice (--encoder ...) is for `embed`; here the checkpoint fixes the encoder.
                why = str(e).split(";")[0]
                raise EncoderError(f"cannot embed the prompt with the encoder checkpoint {self.checkpoint} was "
                                   f"trained with ({why}); make {info['encoder']} available again (the same "
                                   "folder or Hugging Face id) or use another --checkpoint") from None
        return self._encoder

    def noise(self, seeds: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(z, eps) for each seed: z first, then the condition noise, from one generator per image."""
        cfg, zs, eps = self.G.cfg, [], []
        for s in seeds:
            g = torch.Generator().manual_seed(int(s))
            zs.append(torch.randn(cfg.noise_dim, generator=g))
            if cfg.cond_aug:
                eps.append(torch.randn(cfg.cond_dim, generator=g))
        if not zs:
            return torch.zeros(0, cfg.noise_dim), None
        z, e = torch.stack(zs), torch.stack(eps) if eps and self.sample_condition else None
        if self.truncation != 1.0:  # per image after its draw: the batch it is in changes nothing
            z, e = z * self.truncation, None if e is None else e * self.truncation
        return z, e

    @torch.inference_mode()
    def images_from_vectors(self, vectors: np.ndarray, seeds: list[int], batch_size: int = 64) -> np.ndarray:
        """Raw encoder vectors (n, D) and one seed per image -> uint8 (n, H, W, 3)."""
        from flowercli.images import to_uint8

        raw = torch.as_tensor(np.asarray(vectors, dtype=np.float32))
        if raw.ndim != 2 or raw.shape[1] != self.G.cfg.text_dim:
            raise InputError(f"text vectors of shape {tuple(raw.shape)} do not fit this generator "
                             f"({self.G.cfg.text_dim}-d, from {self.encoder_info.get('encoder')})")
        out = []
        for i in range(0, len(raw), batch_size):
            z, eps = self.noise(seeds[i: i + batch_size])
            t = self.G.normalise_text(raw[i: i + batch_size].to(self.device))
            out.append(to_uint8(self.G(z.to(self.device), t, None if eps is None else eps.to(self.device))[0]))
        return np.concatenate(out) if out else np.zeros((0, self.image_size, self.image_size, 3), np.uint8)

    def embed(self, prompts: list[str], report: Reporter = Reporter()) -> np.ndarray:
        enc = self.text_encoder()
        if enc.dim != self.G.cfg.text_dim:
            # The checkpoint names an encoder that is not the one its generator was trained with
            # (a replaced model folder, an edited file): fail before making meaningless images.
            raise EncoderError(f"encoder {self.encoder_info.get('encoder')} gives {enc.dim}-d vectors but checkpoint "
                               f"{self.checkpoint} was trained on {self.G.cfg.text_dim}-d ones; use the encoder the "
                               "run was trained with (see its config.json) or another --checkpoint")
        tokens = enc.tokenize(prompts)
        vectors = enc.encode_tokens(tokens)
        if self.encoder_info.get("normalised"):  # embedded with --normalise: new prompts the same way
            vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        for p, t in zip(prompts, tokens.truncated):
            if t:
                report.warn(f"prompt longer than the encoder's {enc.max_length} tokens was truncated: {p[:60]!r}...")
        return vectors

    def images_from_prompts(self, prompts: list[str], seeds: list[int], report: Reporter = Reporter()) -> np.ndarray:
        return self.images_from_vectors(self.embed(prompts, report), seeds)


def load_generator(checkpoint: Path | None = None, device: str = "cpu", runs_dir: Path = Path("runs"),
                   sample_condition: bool | None = None) -> LoadedGenerator:
    """The checkpoint's EMA generator (a file or a run folder; None: the newest run's, else the packaged
    model). `sample_condition` None: the run's model.sample_condition."""
    dev = resolve_device(device)
    _, path = resolve_run_checkpoint(None, checkpoint, runs_dir, fallback=PACKAGED)
    state = load_checkpoint(path, map_location="cpu")
    try:
        mcfg = config_from_dict(state["config"]).model
        G = Generator(mcfg)
        G.load_state_dict({k: v.float() for k, v in state["G_ema"].items()})
    except (TypeError, KeyError, RuntimeError) as e:
        why = " ".join(str(e).split())[:240]  # torch's message spans lines; the keys are on the second
        raise CheckpointError(f"checkpoint {path} does not match this flowercli's generator ({why}); "
                              "use a checkpoint written by this version of flowercli train") from None
    G.to(dev).eval()
    if sample_condition is None:
        sample_condition = mcfg.sample_condition and mcfg.cond_aug  # the run's intended default
    elif sample_condition and not mcfg.cond_aug:
        raise InputError(f"--sample-condition needs a generator trained with conditioning augmentation "
                         f"(model.cond_aug); {path} was trained without, so its condition has nothing to sample")
    data = state.get("data", {})
    meta = {"split": data.get("split"), "embeddings": data.get("embeddings"), "data_dir": data.get("data_dir"),
            "classes": data.get("classes"), "encoder": state["encoder"].get("encoder"),
            "encoder_info": state["encoder"],
            "step": state.get("step"), "recipe": state["config"].get("recipe"), "extra": state.get("meta", {})}
    return LoadedGenerator(G=G, meta=meta, checkpoint=path, device=dev, sample_condition=sample_condition)


def check_prompts(prompts: list[str]) -> list[str]:
    cleaned = []
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise InputError("a prompt is empty; describe the flower, e.g. \"this flower has yellow petals\"")
        cleaned.append(" ".join(p.split()))
    return cleaned


def parse_seeds(text: str) -> list[int]:
    """Seeds from text such as "0-15,42" (-> 0, 1, ..., 15, 42): seeds and inclusive ranges A-B, as StyleGAN's
    generate.py takes them. Seeds are non-negative; one given twice (its file would be written twice)
    and lists of more than MAX_IMAGES are errors (InputError), checked before any list is built."""
    seeds: list[int] = []
    for part in str(text).split(","):
        item = part.strip()
        lo, sep, hi = item.partition("-")
        try:
            if not item or any(not x.strip().isdigit() for x in ((lo, hi) if sep else (lo,))):
                raise ValueError
            a, b = (int(lo), int(hi)) if sep else (int(lo), int(lo))
        except ValueError:
            raise InputError(f"--seeds: {item!r} is not a seed or a range; give non-negative integers and "
                             "ranges separated by commas, e.g. 0-15,42") from None
        if a > b:
            raise InputError(f"--seeds: the range {item!r} runs backwards; write it as {b}-{a}")
        if b >= 2**63:
            raise InputError(f"--seeds: {b} is too large for a seed (at most {2**63 - 1})")
        if len(seeds) + (b - a + 1) > MAX_IMAGES:
            raise InputError(f"--seeds {text!r} asks for more than {MAX_IMAGES} images per prompt")
        seeds += range(a, b + 1)
    if len(set(seeds)) != len(seeds):
        twice = next(x for i, x in enumerate(seeds) if x in seeds[:i])
        raise InputError(f"--seeds: seed {twice} is given twice (each seed is one image file)")
    return seeds


def check_truncation(psi: float) -> float:
    if not 0.0 < psi <= 1.0:  # also refuses NaN
        raise InputError(f"--truncation must be above 0 and at most 1 (1 = off), got {psi}")
    return float(psi)


def generate(cfg: GenerateConfig, report: Reporter = Reporter()) -> list[dict[str, Any]]:
    """Write one PNG per (prompt, seed) and a grid.png into cfg.out; return one record per image."""
    from flowercli.images import make_grid, save_png

    if cfg.n < 1 or cfg.n > MAX_IMAGES:
        raise InputError(f"-n must be between 1 and {MAX_IMAGES}, got {cfg.n}")
    check_truncation(cfg.truncation)
    if cfg.seeds is not None and not cfg.seeds:
        raise InputError("--seeds is empty; give seeds such as 0-15,42")
    if cfg.seeds is not None and cfg.interpolate is not None:
        raise InputError("--interpolate walks with one noise vector (--seed); it takes no --seeds")
    # The images of one prompt: the listed seeds, else n from seed on.
    per_prompt = list(cfg.seeds) if cfg.seeds is not None else [cfg.seed + k for k in range(cfg.n)]
    if cfg.interpolate is None and not cfg.prompts:
        raise InputError("give at least one prompt, e.g. flowercli generate \"this flower has yellow petals\"")
    if cfg.interpolate is not None and not 2 <= cfg.steps <= 1000:
        raise InputError(f"--steps must be between 2 and 1000, got {cfg.steps}")
    out = Path(cfg.out)
    # Checked now but created only when the images exist: a failure in between leaves no empty folder.
    check_writable_dir(out, f"output folder {out}", "pick another --out")

    run_dir, path = resolve_run_checkpoint(None, cfg.checkpoint, cfg.runs_dir, fallback=PACKAGED)
    if run_dir is None:  # neither named nor trained: the packaged model
        report.info(f"Using the packaged pretrained generator ({path.name}); pass --checkpoint to use your own")
    gen = load_generator(path, cfg.device, sample_condition=cfg.sample_condition)
    gen.truncation = cfg.truncation
    report.debug(f"checkpoint {path}, encoder {gen.encoder_info.get('encoder')}, "
                 f"condition {'sampled per image' if gen.sample_condition else 'mean'}")

    records: list[dict[str, Any]] = []
    if cfg.interpolate is not None:
        a, b = check_prompts(list(cfg.interpolate))
        va, vb = gen.embed([a, b], report)
        w = np.linspace(0.0, 1.0, cfg.steps, dtype=np.float32)[:, None]
        vectors = (1 - w) * va[None] + w * vb[None]
        images = gen.images_from_vectors(vectors, [cfg.seed] * cfg.steps)  # same noise: only the text moves
        names = [f"interp{k:03d}.png" for k in range(cfg.steps)]
        prompts = [f"{1 - float(x):.3f} * {a!r} + {float(x):.3f} * {b!r}" for x in w[:, 0]]
        seeds = [cfg.seed] * cfg.steps
        ncol = cfg.steps
    else:
        prompts_clean = check_prompts(list(cfg.prompts))
        vectors = gen.embed(prompts_clean, report)
        k = len(per_prompt)
        seeds = per_prompt * len(prompts_clean)
        prompts = [p for p in prompts_clean for _ in range(k)]
        images = gen.images_from_vectors(np.repeat(vectors, k, axis=0), seeds)
        many = len(prompts_clean) > 1
        names = [(f"p{j:03d}-" if many else "") + f"seed{s:04d}.png"
                 for j in range(len(prompts_clean)) for s in per_prompt]
        ncol = min(k, 8) if not many else k
    grid = out / "grid.png"
    made = [p for p in (out, *out.parents) if not p.exists()]  # folders this call creates
    written: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        for img, name, prompt, seed in zip(images, names, prompts, seeds):
            save_png(img, out / name)
            written.append(out / name)
            records.append({"path": str(out / name), "prompt": prompt, "seed": seed, "truncation": gen.truncation,
                            "checkpoint": str(path)})
        save_png(make_grid(images, ncol=ncol), grid)
    except BaseException as e:
        # All or nothing: a half set of images (disk full, Ctrl-C) is removed with the folders it needed.
        for p in written:
            p.unlink(missing_ok=True)
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break
        if isinstance(e, OSError):
            raise FlowerError(f"cannot write images to {out}: {write_error_text(e)}; nothing was kept, "
                              "pick another --out") from None
        raise
    report.debug(f"grid {grid}")
    return records


def write_records_json(records: list[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
