"""One checkpoint format, written atomically, loaded without unpickling code.

A checkpoint is a dict of state dicts and plain data (docs/ARCHITECTURE.md): schema_version,
flowercli_version, config, step, epoch, G, D, G_ema, opt_G, opt_D, rng, encoder, data.
It is written to a temporary file in the same folder, fsynced and `os.replace`d, so a kill at any
moment leaves either the old file or the new one; `torch.load(weights_only=True)` refuses pickles
that would run code.

An export (`export_generator`) is the same dict without D, the live G and the optimisers; as
`.safetensors` its tensors are the EMA generator's weights and every other entry is a JSON string
in the file's metadata (see `_safetensors_bytes`), so it loads without pickle at all.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from flowercli import __version__
from flowercli.errors import CheckpointError, InputError
from flowercli.fsutil import atomic_write, temp_name, write_error_text

SCHEMA_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")


def save_checkpoint(state: dict[str, Any], folder: Path, keep: int) -> Path:
    """Write `step-NNNNNNN.pt` and point `latest.pt` at it; prune to the newest `keep` step files."""
    state = {"schema_version": SCHEMA_VERSION, "flowercli_version": __version__, **state}
    path = folder / f"step-{state['step']:07d}.pt"
    try:
        atomic_write(path, lambda f: torch.save(state, f))
        _link_latest(path)
    except OSError as e:
        raise CheckpointError(f"could not write checkpoint {path}: {write_error_text(e)}; "
                              "the previous checkpoint is intact") from None
    for old in list_checkpoints(folder)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
    return path


# What an export may be written as: the output's suffix decides, and says so to anyone who sees the file.
EXPORT_FORMATS = {".safetensors": "safetensors", ".pt": "pt"}
# Non-tensor entries of an export, each stored as JSON in a .safetensors file's metadata.
_EXPORT_ENTRIES = ("schema_version", "flowercli_version", "config", "step", "epoch", "encoder", "data", "meta")


def export_format(dst: Path) -> str:
    """The export format named by the suffix of `dst`: "safetensors" or "pt" (anything else: InputError)."""
    fmt = EXPORT_FORMATS.get(Path(dst).suffix.lower())
    if fmt is None:
        raise InputError(f"cannot tell the export format from {Path(dst).name!r}: name the file *.safetensors "
                         "(weights and metadata, loads without pickle) or *.pt (a torch file)")
    return fmt


def export_generator(src: Path, dst: Path, meta: dict[str, Any] | None = None, half: bool = True) -> Path:
    """Write only what generation needs (the EMA generator, config, encoder, data) to `dst`.

    A training checkpoint also holds D, the live G and both optimisers' moments (~25x the EMA
    generator's size). The exported file is a checkpoint of the same schema, so `generate`,
    `eval` and `--checkpoint` read it unchanged; it cannot be resumed. With `half`, weights are
    stored as float16 (loaded back as float32); small tensors (biases, normalisation statistics,
    the text mean/std) stay float32: they cost nothing and are the ones rounding would hurt.
    `dst` ending in .safetensors gets that format, .pt a torch file (`export_format`). An export is
    made to be shared, so it carries file names, not the paths of this machine (`strip_paths`).
    `src` may itself be an export (converting .pt to .safetensors changes no weight).
    """
    fmt = export_format(dst)
    state = load_checkpoint(src)
    weights = {k: v.half() if half and v.is_floating_point() and v.numel() >= 1024 else v
               for k, v in state["G_ema"].items()}
    old_meta = state.get("meta", {})
    out: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "flowercli_version": __version__,
                            **{k: state[k] for k in ("config", "step", "epoch", "encoder", "data") if k in state},
                            "G_ema": weights,
                            "meta": {**old_meta, "exported_from": old_meta.get("exported_from") or Path(src).name,
                                     "dtype": "float16" if half else "float32", **(meta or {})}}
    out = strip_paths(out)
    dst = Path(dst)
    try:
        if fmt == "safetensors":
            data = _safetensors_bytes(out)
            atomic_write(dst, lambda f: f.write(data))
        else:
            atomic_write(dst, lambda f: torch.save(out, f))
    except OSError as e:
        raise CheckpointError(f"could not write {dst}: {write_error_text(e)}; choose another file or folder") from None
    return dst


# Entries that name files of the machine a checkpoint was made on, as (section, key) of the state.
_PATH_ENTRIES = (("config", "data_dir"), ("config", "runs_dir"), ("config", "embeddings"), ("data", "data_dir"),
                 ("data", "embeddings"), ("encoder", "path"), ("encoder", "encoder_path"))
_REPORT_PATHS = (("run", "checkpoint"), ("run", "data_dir"), ("run", "embeddings"), ("inception", "path"))


def strip_paths(state: dict[str, Any]) -> dict[str, Any]:
    """A copy of a checkpoint state whose recorded paths are reduced to file names.

    Data directories are dropped (`eval` then uses --data-dir or the default); embeddings keep
    their file name, which is how `eval` finds them under a data directory anyway. The encoder
    id is left as recorded: `generate` needs it to embed prompts (a local folder stays a path).
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}

    def reduce(section: dict[str, Any], key: str) -> None:
        value = section.get(key)
        if isinstance(value, str) and value and Path(value).is_absolute():
            if key in ("data_dir", "runs_dir"):
                section.pop(key)
            else:
                section[key] = Path(value).name

    for name, key in _PATH_ENTRIES:
        if isinstance(out.get(name), dict):
            reduce(out[name], key)
    report = (out.get("meta") or {}).get("eval")
    if isinstance(report, dict):
        report = {k: dict(v) if isinstance(v, dict) else v for k, v in report.items()}
        for name, key in _REPORT_PATHS:
            if isinstance(report.get(name), dict):
                reduce(report[name], key)
        out["meta"] = {**out["meta"], "eval": report}
    return out


def _safetensors_bytes(state: dict[str, Any]) -> bytes:
    """An export as .safetensors: the G_ema tensors, the other entries as JSON strings in the metadata.

    The format has no checksum of its own; `weights_sha256` (of the tensor bytes after the header)
    stands in for the CRC32s a torch zip carries, so bit rot is an error, not wrong numbers.
    """
    import json

    from safetensors.torch import save

    tensors = {k: v.detach().contiguous() for k, v in state["G_ema"].items()}
    metadata = {"format": "pt", **{k: json.dumps(state[k], sort_keys=True) for k in _EXPORT_ENTRIES if k in state}}
    first = save(tensors, metadata)
    # The tensor bytes do not depend on the metadata (offsets count from the end of the header).
    metadata["weights_sha256"] = hashlib.sha256(first[8 + int.from_bytes(first[:8], "little"):]).hexdigest()
    return _sorted_header(save(tensors, metadata))


def _sorted_header(data: bytes) -> bytes:
    """The same file with its header's keys in a fixed order: safetensors writes them in hash-map
    order, so the same export would differ in bytes from one run to the next."""
    import json

    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8: 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {**({"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}),
               **dict(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"]))}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the format pads the header with spaces to 8-byte alignment
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def _is_safetensors(head: bytes) -> bool:
    # 8 bytes of header length (the format allows at most 100 MB), then the JSON header itself.
    return len(head) >= 9 and 0 < int.from_bytes(head[:8], "little") <= 100_000_000 and head[8:9] == b"{"


def _load_safetensors(path: Path) -> dict[str, Any]:
    import json

    from safetensors.torch import load

    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8: 8 + n]) if len(data) >= 8 + n else {}
        metadata = header.get("__metadata__") or {}
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if len(data) < 8 + n + end:
            raise CheckpointError(f"checkpoint {path} is damaged or incomplete (truncated? {len(data):,} bytes, its "
                                  f"header describes {8 + n + end:,}); export it again or use another checkpoint")
        expected = metadata.get("weights_sha256")
        if expected and hashlib.sha256(data[8 + n:]).hexdigest() != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: its weights do not match the sha256 recorded in it "
                                  "(damaged on disk or in a copy); export it again")
        state: dict[str, Any] = {k: json.loads(metadata[k]) for k in _EXPORT_ENTRIES if k in metadata}
        state["G_ema"] = load(data)
    except CheckpointError:
        raise
    except Exception as e:  # a cut-off file, a header that is not JSON, tensors past the end
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or not a flowercli export: {reason}") from None
    return state


def _link_latest(path: Path) -> None:
    link_checkpoint(path, "latest.pt")


def link_checkpoint(path: Path, name: str) -> Path:
    """Make `name` in the checkpoint's folder the same file as `path` (latest.pt, best.pt).

    A hard link costs no second write, and outlives the step file when rotation deletes it; where
    links are refused, a copy. Either is made under a temporary name and renamed over `name`, so
    `name` is always a whole checkpoint.
    """
    dest = path.parent / name
    tmp = path.parent / temp_name(dest)
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(path, tmp)
        except OSError:
            import shutil

            shutil.copyfile(path, tmp)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)  # `name` itself still names the previous checkpoint
        raise
    return dest


def list_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoints in `folder`, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load and sanity-check one checkpoint; any problem is a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes): it was never written completely; "
                              "use an earlier checkpoint")
    with open(path, "rb") as f:
        head = f.read(9)
    if _is_safetensors(head):
        state = _load_safetensors(path)
        state["G_ema"] = {k: v.to(map_location) for k, v in state.get("G_ema", {}).items()}
    else:
        state = _load_torch(path, map_location)
    if not isinstance(state, dict) or "G_ema" not in state or "config" not in state:
        raise CheckpointError(f"{path} is not a flowercli checkpoint (no generator weights or config inside); "
                              "pass a file written by flowercli train")
    if state.get("schema_version") != SCHEMA_VERSION:
        raise CheckpointError(
            f"checkpoint {path} has schema version {state.get('schema_version')}, "
            f"this flowercli reads {SCHEMA_VERSION}; "
            "use the flowercli version that wrote it, or train again"
        )
    return state


def _load_torch(path: Path, map_location: str | torch.device) -> Any:
    _check_crc(path)
    try:
        with warnings.catch_warnings():  # torch's notes ("pickle protocol 5 ...") would break the one line
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, bytes that are no checkpoint at all
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = "it contains Python objects that are not plain weights (refused for safety)"
        raise CheckpointError(f"checkpoint {path} is corrupt or not a flowercli checkpoint: {reason[:200]}") from None
    return state


def _check_crc(path: Path) -> None:
    """torch.load does not check the zip's CRC32s: damaged weight bytes would load as wrong numbers.

    Reading the file once more costs ~0.3 s per 100 MB; files that are no zip at all are left to
    torch.load to report.
    """
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except Exception:
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"
        if is_zip:
            # It starts as a checkpoint does but its zip directory, written last, is missing or broken:
            # torch.load would only say "failed finding central directory".
            raise CheckpointError(f"checkpoint {path} is damaged or incomplete (truncated? a "
                                  f"{path.stat().st_size:,}-byte zip without a readable directory); "
                                  "use another checkpoint") from None
        return  # not a zip at all: torch.load says what it is
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt: {bad} fails its CRC check (damaged on disk or "
                              "in a copy); use an earlier checkpoint")


def load_latest(folder: Path, warn=lambda msg: None, map_location="cpu") -> dict[str, Any] | None:
    """The newest loadable checkpoint in `folder`, falling back past corrupt ones (with a warning).

    Also points latest.pt at it again: a kill between writing a step file and relinking
    latest.pt leaves latest.pt one checkpoint behind (whole, but stale).
    """
    for path in reversed(list_checkpoints(folder)):
        try:
            state = load_checkpoint(path, map_location)
        except CheckpointError as e:
            warn(f"{e}; trying the previous checkpoint")
            continue
        state["_path"] = str(path)
        latest = Path(folder) / "latest.pt"
        try:
            if not (latest.exists() and os.path.samefile(latest, path)):
                _link_latest(path)
        except OSError:
            pass  # a read-only run folder: resuming still works, latest.pt stays as it was
        return state
    return None


def find_latest_checkpoint(run_dir: Path) -> Path:
    """The newest step checkpoint of a run (by step number)."""
    found = list_checkpoints(Path(run_dir) / "checkpoints")
    if not found:
        raise CheckpointError(f"run {run_dir} has no checkpoints yet "
                              f"(train it first: flowercli train --run {Path(run_dir).name})")
    return found[-1]


def _find_newest_run(runs_dir: Path) -> Path | None:
    """The run folder under `runs_dir` whose newest checkpoint was written last."""
    best, best_time = None, -1.0
    if not Path(runs_dir).is_dir():
        return None
    for run in Path(runs_dir).iterdir():
        ckpts = list_checkpoints(run / "checkpoints")
        if ckpts and ckpts[-1].stat().st_mtime > best_time:
            best, best_time = run, ckpts[-1].stat().st_mtime
    return best


def resolve_run_checkpoint(run: str | None, checkpoint: Path | None, runs_dir: Path, ask: str | None = None,
                           fallback: Path | None = None, none_found: str | None = None) -> tuple[Path | None, Path]:
    """(run folder, checkpoint file) from --run and --checkpoint: the one lookup of every command.

    A `checkpoint` wins: a file as it is, a run folder its newest step checkpoint. Its run folder
    (where reports belong) is `run`'s when that is named, else <run>/ for <run>/checkpoints/step-N.pt,
    the folder itself for a run folder, else the file's folder. A `run` alone: its newest checkpoint.
    Neither: with `ask`, an InputError starting with it; without, the run under `runs_dir` saved
    last, else `fallback` (a packaged model; run folder None) when that file exists, else a
    CheckpointError (its message `none_found` where the caller has its own advice, as train --resume).
    """
    runs_dir = Path(runs_dir)
    run_dir: Path | None = None
    if run is not None:
        run_dir = runs_dir / run
        if not run_dir.is_dir():
            raise InputError(f"no run named {run!r} in {runs_dir} (pass --runs-dir, or list the folder)")
    if checkpoint is not None:
        checkpoint = Path(checkpoint)
        if checkpoint.is_dir():
            return run_dir or checkpoint, find_latest_checkpoint(checkpoint)
        if run_dir is None:
            run_dir = checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
        return run_dir, checkpoint
    if run_dir is not None:
        return run_dir, find_latest_checkpoint(run_dir)
    if ask is not None:
        raise InputError(f"{ask}: --run NAME or --checkpoint PATH")
    newest = _find_newest_run(runs_dir)
    if newest is not None:
        return newest, find_latest_checkpoint(newest)
    if fallback is not None and Path(fallback).is_file():
        return None, Path(fallback)
    raise CheckpointError(none_found or f"no checkpoint found under {runs_dir} and no packaged model; train one "
                          "(flowercli train) or pass --checkpoint PATH")
