"""`flowercli report`: what a training run has done so far, as numbers and as one PNG.

Reading and summarising (`load_run`, `read_log`, `summarise`) use the run's files and the standard
library only (no model is loaded), so a run can be watched while it trains and the summary works
where matplotlib is not installed. The PNG is drawn by `reportplot.plot_report` with matplotlib
(the `plots` extra), imported only when there is a PNG to draw.

The summary's keys are stable (scripts read `--json`); a value the run does not record is null:
  run, name, step, epoch, epochs, max_steps, png,
  log{lines, skipped, sessions, non_finite_step, modified},
  time{wall_s, device, threads, precision},
  img_per_s{latest, mean}, losses{<term>: latest value},
  quick_fid{n, latest{step, value}, best{step, value, checkpoint}},
  checkpoints{count, latest, latest_step, best},
  samples{count, newest, newest_epoch},
  captions{archive, sha256}, encoder{name, dim, pooling}.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from flowercli.config import ReportConfig
from flowercli.errors import DataError, FlowerError, InputError
from flowercli.report import Reporter

PNG_NAME = "report.png"  # written into the run folder unless --out says otherwise
INSTALL_HINT = "pip install 'flowercli[plots]'"
# Logged fields that are not loss terms: they get panels (or summary lines) of their own.
NOT_TERMS = frozenset({"step", "epoch", "img_per_s", "time", "quick_fid", "best",
                       "quick_recall", "quick_eval_seconds", "quick_n"})  # the rest of a quick eval (quickeval.py)
_SAMPLE_RE = re.compile(r"^epoch-(\d+)\.png$")  # samples/epoch-NNNN.png
_CKPT_RE = re.compile(r"^step-(\d+)\.pt$")  # checkpoints/step-NNNNNNN.pt


@dataclass
class LogRead:
    """log.jsonl as written, in file order, and how many lines could not be used."""

    records: list[dict[str, Any]] = field(default_factory=list)
    skipped: int = 0


@dataclass
class RunData:
    """Everything `summarise` and `plot_report` read, gathered once from the run folder."""

    run_dir: Path
    config: dict[str, Any]
    log: LogRead
    checkpoints: list[Path]
    samples: list[Path]  # oldest first
    log_mtime: float | None = None


def resolve_run(run: str, runs_dir: Path) -> Path:
    """RUN as a name under `runs_dir` (tried first, as --run elsewhere) or as a path to a run folder."""
    for candidate in (Path(runs_dir) / run, Path(run)):
        if candidate.is_dir():
            return candidate
    if Path(run).exists():
        raise InputError(f"{run} is a file, not a run folder; pass a run name under {runs_dir} or a run folder")
    raise InputError(f"no run named {run!r} in {runs_dir} and no folder {run}; pass a run name (see --runs-dir) "
                     "or the path of a run folder")


def read_log(path: Path) -> LogRead:
    """Parse log.jsonl line by line. A line that is empty, cut short (a crash mid-write) or not a
    record with a numeric step is counted in `skipped`, never an error: the rest is still the run."""
    out = LogRead()
    try:
        text = Path(path).read_bytes().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return out
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror}") from None
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            out.skipped += 1
            continue
        if not isinstance(rec, dict) or not _is_number(rec.get("step")):
            out.skipped += 1
            continue
        out.records.append(rec)
    return out


def load_run(run_dir: Path, report: Reporter = Reporter()) -> RunData:
    """Read a run folder (config.json, log.jsonl, checkpoints/, samples/); warn about what is damaged."""
    from flowercli.checkpoint import list_checkpoints

    run_dir = Path(run_dir)
    log_path, cfg_path = run_dir / "log.jsonl", run_dir / "config.json"
    if not (log_path.exists() or cfg_path.exists() or (run_dir / "checkpoints").is_dir()):
        raise DataError(f"{run_dir} is not a training run (no config.json, log.jsonl or checkpoints/ in it); "
                        "pass a folder that flowercli train wrote")
    config: dict[str, Any] = {}
    if cfg_path.exists():
        try:
            config = json.loads(cfg_path.read_text())
            if not isinstance(config, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            report.warn(f"{cfg_path} is unreadable ({str(e)[:80]}); the report leaves out the settings it holds")
            config = {}
    log = read_log(log_path)
    if log.skipped:
        report.warn(f"{log_path}: skipped {log.skipped} empty or unreadable line(s)")
    samples = sorted((int(m.group(1)), p) for p in _listdir(run_dir / "samples") if (m := _SAMPLE_RE.match(p.name)))
    return RunData(run_dir=run_dir, config=config, log=log, checkpoints=list_checkpoints(run_dir / "checkpoints"),
                   samples=[p for _, p in samples], log_mtime=log_path.stat().st_mtime if log_path.is_file() else None)


def sessions(records: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Split the log where training (re)started: `time` counts from each start, and a resume from
    an earlier checkpoint logs steps again. Each session's last `time` is its wall-clock length."""
    out: list[list[dict[str, Any]]] = []
    prev = None
    for rec in records:
        if prev is None or rec["step"] <= prev["step"] or _num(rec.get("time"), 0.0) < _num(prev.get("time"), 0.0):
            out.append([])
        out[-1].append(rec)
        prev = rec
    return out


def curve(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, sorted: where a resumed run logged a step again, the later line wins
    (it belongs to the run that went on)."""
    by_step: dict[float, dict[str, Any]] = {}
    for rec in records:
        by_step[rec["step"]] = rec
    return [by_step[s] for s in sorted(by_step)]


def summarise(run: RunData) -> dict[str, Any]:
    """The run's numbers under the stable keys of the module docstring (no files written)."""
    cfg = saved if isinstance(saved := run.config.get("config"), dict) else {}
    enc = encoder if isinstance(encoder := run.config.get("encoder"), dict) else {}
    points = curve(run.log.records)
    last = points[-1] if points else {}
    wall = sum(_num(s[-1].get("time"), 0.0) for s in sessions(run.log.records))
    rates = [r["img_per_s"] for r in points if _is_number(r.get("img_per_s"))]
    terms = sorted({k for r in points for k, v in r.items() if k not in NOT_TERMS and _is_value(v)}, key=_term_order)
    # The latest value of each term as logged: a loss gone NaN must not hide behind an older number.
    losses = {k: _num(next(r[k] for r in reversed(points) if _is_value(r.get(k))), None) for k in terms}
    bad = next((r["step"] for r in points if any(_is_value(r.get(k)) and not _is_number(r[k]) for k in terms)), None)
    ckpts = run.checkpoints
    best_file = run.run_dir / "checkpoints" / "best.pt"
    fid = _quick_fid(points, run.log.records)
    if fid["best"] is not None and best_file.is_file():
        fid["best"]["checkpoint"] = str(best_file)
    newest = run.samples[-1] if run.samples else None
    # Both lists hold only names their pattern matched (list_checkpoints, load_run).
    latest_match = _CKPT_RE.match(ckpts[-1].name) if ckpts else None
    newest_match = _SAMPLE_RE.match(newest.name) if newest else None
    return {
        "run": str(run.run_dir),
        "name": run.run_dir.resolve().name,
        "step": _int_or_none(last.get("step")),
        "epoch": _num(last.get("epoch"), None),
        "epochs": _int_or_none(cfg.get("epochs")),
        "max_steps": _int_or_none(cfg.get("max_steps")) or None,  # 0 = no limit
        "png": None,
        "log": {"lines": len(run.log.records), "skipped": run.log.skipped,
                "sessions": len(sessions(run.log.records)), "non_finite_step": _int_or_none(bad),
                "modified": None if run.log_mtime is None else
                datetime.fromtimestamp(run.log_mtime, timezone.utc).isoformat(timespec="seconds")},
        "time": {"wall_s": round(wall, 2) if points else None, "device": run.config.get("device"),
                 "threads": run.config.get("threads"),
                 # config.json holds the autocast dtype as torch prints it ("torch.bfloat16") or "fp32".
                 "precision": str(run.config["precision"]).removeprefix("torch.") if run.config.get("precision")
                 else None},
        "img_per_s": {"latest": rates[-1] if rates else None,
                      "mean": round(sum(rates) / len(rates), 1) if rates else None},
        "losses": losses,
        "quick_fid": fid,
        "checkpoints": {"count": len(ckpts), "latest": str(ckpts[-1]) if ckpts else None,
                        "latest_step": int(latest_match.group(1)) if latest_match else None,
                        "best": str(best_file) if best_file.is_file() else
                        (fid["best"] or {}).get("checkpoint")},
        "samples": {"count": len(run.samples), "newest": str(newest) if newest else None,
                    "newest_epoch": int(newest_match.group(1)) if newest_match else None},
        "captions": {"archive": enc.get("captions_archive"), "sha256": enc.get("captions_sha256")},
        "encoder": {"name": enc.get("encoder"), "dim": enc.get("dim"), "pooling": enc.get("pooling")},
    }



def _quick_fid(points: list[dict[str, Any]], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Latest and best quick FID. A `best` field in the log (from the trainer, which knows which
    checkpoint it kept) wins over the minimum of the logged values."""
    fids = [(r["step"], r["quick_fid"]) for r in points if _is_number(r.get("quick_fid"))]
    latest = {"step": int(fids[-1][0]), "value": fids[-1][1]} if fids else None
    best = None
    logged = next((r for r in reversed(records) if r.get("best") not in (None, False)), None)
    if logged is not None:
        b = logged["best"]
        if isinstance(b, dict):
            value = b.get("quick_fid", b.get("value"))
            best = {"step": _int_or_none(b.get("step")), "value": value if _is_number(value) else None,
                    "checkpoint": b.get("checkpoint") if isinstance(b.get("checkpoint"), str) else None}
        elif b is True and _is_number(logged.get("quick_fid")):  # "this line is the best so far"
            best = {"step": int(logged["step"]), "value": logged["quick_fid"], "checkpoint": None}
        elif _is_number(b):  # the best value so far
            best = {"step": next((int(s) for s, v in fids if v == b), None), "value": b, "checkpoint": None}
    if best is None and fids:
        step, value = min(fids, key=lambda sv: sv[1])
        best = {"step": int(step), "value": value, "checkpoint": None}
    return {"n": len(fids), "latest": latest, "best": best}


def summary_lines(s: dict[str, Any]) -> list[str]:
    """The summary as short labelled lines for a terminal."""
    def num(x: Any, fmt: str = "{:.3f}") -> str:
        return "n/a" if x is None else fmt.format(x)

    step = "no log lines yet" if s["step"] is None else f"{s['step']:,}"
    if s["epoch"] is not None:
        step += f" (epoch {s['epoch']:.2f}" + (f" of {s['epochs']}" if s["epochs"] else "") + ")"
    if s["max_steps"]:
        step += f", stops at step {s['max_steps']:,}"
    t = s["time"]
    threads = f"{t['threads']} thread{'s' if t['threads'] != 1 else ''}" if t["threads"] else None
    where = ", ".join(x for x in (t["device"], threads, t["precision"]) if x)
    sess = s["log"]["sessions"]
    time = "n/a" if t["wall_s"] is None else (
        f"{duration(t['wall_s'])} wall clock" + (f" over {sess} sessions" if sess > 1 else ""))
    time += f" ({where})" if where else ""
    rate = s["img_per_s"]
    lines = [f"run          {s['run']}",
             f"steps        {step}",
             f"time         {time}",
             f"img/s        latest {num(rate['latest'], '{:.1f}')}, mean {num(rate['mean'], '{:.1f}')}"]
    if s["losses"]:
        lines.append("losses       " + ", ".join(f"{k} {num(v)}" for k, v in s["losses"].items()))
    if s["log"]["non_finite_step"] is not None:
        lines.append(f"diverged     a logged term is NaN or infinite, first at step {s['log']['non_finite_step']:,}")
    fid = s["quick_fid"]
    if fid["latest"] is None and fid["best"] is None:
        lines.append("quick FID    none logged")
    else:
        parts = []
        if fid["latest"]:
            parts.append(f"latest {num(fid['latest']['value'], '{:.2f}')} at step {fid['latest']['step']:,}")
        if fid["best"]:
            b = fid["best"]
            at = f" at step {b['step']:,}" if b["step"] is not None else ""
            parts.append(f"best {num(b['value'], '{:.2f}')}{at}")
        lines.append("quick FID    " + "; ".join(parts))
    c = s["checkpoints"]
    lines.append("checkpoint   " + (f"latest {c['latest']}" if c["latest"] else "none yet")
                 + (f"; best {c['best']}" if c["best"] else ""))
    cap, enc = s["captions"], s["encoder"]
    caps = "unknown" if not cap["archive"] else (
        f"{cap['archive']}" + (f" (sha256 {str(cap['sha256'])[:12]})" if cap["sha256"] else ""))
    if enc["name"]:
        caps += f"; encoder {enc['name']}" + (f" ({enc['dim']}-d, {enc['pooling']})" if enc["dim"] else "")
    lines.append(f"captions     {caps}")
    lines.append(f"samples      {s['samples']['newest'] or 'none yet'}")
    if s["png"]:
        lines.append(f"report       {s['png']}")
    return lines


def duration(seconds: float) -> str:
    """0.4 s, 12 s, 4 min 05 s, 3 h 07 min."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def make_report(cfg: ReportConfig, report: Reporter = Reporter()) -> dict[str, Any]:
    """Read the run, summarise it, and draw the PNG when matplotlib is there; the summary says
    where the PNG went (`png`, null when none was drawn). An explicit `cfg.out` without matplotlib
    is an error; the default PNG is then skipped with a warning naming the extra to install."""
    from flowercli.reportplot import plot_report, plots_available

    run_dir = resolve_run(cfg.run, cfg.runs_dir)
    out = Path(cfg.out) if cfg.out is not None else run_dir / PNG_NAME
    if cfg.out is not None:
        if out.is_dir():
            raise InputError(f"--out {out} is a folder; give a file name such as {out / PNG_NAME}")
        if out.suffix.lower() != ".png":
            raise InputError(f"--out {out}: the report is a PNG; give a name ending in .png")
        if not plots_available():
            raise FlowerError(f"writing {out} needs matplotlib, which is not installed: {INSTALL_HINT}")
    run = load_run(run_dir, report)
    summary = summarise(run)
    if plots_available():
        summary["png"] = str(plot_report(run, summary, out))
    else:
        report.warn(f"no {PNG_NAME}: matplotlib is not installed ({INSTALL_HINT} draws it)")
    return summary


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_value(x: Any) -> bool:
    """A logged number, NaN and infinity included (json reads NaN and Infinity as floats)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _num(x: Any, default: Any) -> Any:
    return x if _is_number(x) else default


def _int_or_none(x: Any) -> int | None:
    return int(x) if _is_number(x) else None


def _term_order(name: str) -> tuple[int, str]:
    return ({"loss_d": 0, "loss_g": 1}.get(name, 2), name)


def _listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []
