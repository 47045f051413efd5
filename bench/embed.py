"""Benchmark `flowercli embed --encoder minilm` on the real dataset: captions per second.

    python bench/embed.py DATA_DIR [--runs 3] [--batch-size 256] [--naive-limit 4000] [--threads N]

DATA_DIR is a data directory holding `oxford102/` as `flowercli download` writes it. Each run
calls the library's `embed()` end to end (read captions, load the encoder, embed, write the
HDF5 file) into a temporary data directory that links to DATA_DIR/oxford102, so DATA_DIR is
never written to. The figure is all captions (81,890 on the full set, duplicates included:
`embed` encodes each distinct caption once) divided by the encoding time; the end-to-end time
is printed too.

`--naive-limit N` also times, on the first N captions, the naive loop (tokenizer padding per
batch of 64, original order, every caption encoded) next to the library's encoder, back to back,
so that the levers can be compared under the same machine load. On a shared machine record the
load average printed with each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_embed(data_dir: Path, batch_size: int, device: str) -> dict:
    from flowercli.config import DataLayout, EmbedConfig
    from flowercli.embed import embed
    from flowercli.embeddings import open_embeddings

    with tempfile.TemporaryDirectory(prefix="flowercli-bench-") as tmp:
        root = Path(tmp)
        (root / "oxford102").symlink_to((data_dir / "oxford102").resolve(), target_is_directory=True)
        load = os.getloadavg()[0]
        t0, c0 = time.perf_counter(), cpu_seconds()
        path = embed(EmbedConfig(data_dir=root, encoder="minilm", batch_size=batch_size, device=device))
        total = time.perf_counter() - t0
        emb = open_embeddings(path)
        n = int(emb.attrs["n_captions_total"])
        seconds = float(emb.attrs["embed_seconds"])
        assert path == DataLayout(root).embeddings_file("minilm")
        return {
            "captions": n, "distinct": int(emb.attrs["n_distinct_captions"]), "shape": list(emb.vectors.shape),
            "encode_seconds": round(seconds, 1), "captions_per_s": round(n / seconds, 1),
            "distinct_per_s": round(emb.attrs["n_distinct_captions"] / seconds, 1),
            "end_to_end_seconds": round(total, 1), "cpu_seconds": round(cpu_seconds() - c0, 1),
            "loadavg_before": round(load, 2), "loadavg_after": round(os.getloadavg()[0], 2),
        }


def compare_naive(data_dir: Path, limit: int, batch_size: int, device: str) -> dict:
    import torch

    from flowercli import data
    from flowercli.config import DataLayout
    from flowercli.textencoder import TextEncoder

    layout = DataLayout(data_dir)
    labels = data.read_labels(layout)
    ids = np.arange(1, len(labels) + 1)
    texts = [c for caps in data.read_captions(layout, ids, labels) for c in data.pad_captions(caps)[0]][:limit]
    enc = TextEncoder.load("minilm", device=device)

    def naive() -> np.ndarray:
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                batch = enc.tokenizer(texts[i:i + 64], padding=True, return_tensors="pt").to(enc.device)
                hidden = enc.model(**batch).last_hidden_state
                m = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                out.append(((hidden * m).sum(1) / m.sum(1)).float().cpu().numpy())
        return np.concatenate(out)

    result = {"captions": len(texts), "distinct": len(set(texts))}
    vectors = {}
    for name, fn in (("naive", naive), ("flowercli", lambda: enc.encode(texts, batch_size))):
        t0 = time.perf_counter()
        vectors[name] = fn()
        result[f"{name}_captions_per_s"] = round(len(texts) / (time.perf_counter() - t0), 1)
    a, b = vectors["naive"], vectors["flowercli"]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    result["min_cosine_naive_vs_flowercli"] = round(float(cos.min()), 6)
    result["loadavg_after"] = round(os.getloadavg()[0], 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("data_dir", type=Path)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--naive-limit", type=int, default=0, help="also compare with a naive loop on N captions")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    args = ap.parse_args()
    if not (args.data_dir / "oxford102" / "text_c10").is_dir():
        sys.exit(f"{args.data_dir}/oxford102 has no text_c10/: "
                 f"run `flowercli download --data-dir {args.data_dir}` first")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)  # a benchmark knob; the library leaves threads to torch
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "batch_size": args.batch_size, "device": args.device}), flush=True)
    for i in range(args.runs):
        print(json.dumps({"run": i + 1, **run_embed(args.data_dir, args.batch_size, args.device)}), flush=True)
    if args.naive_limit:
        print(json.dumps({"compare": compare_naive(args.data_dir, args.naive_limit, args.batch_size, args.device)}),
              flush=True)


if __name__ == "__main__":
    main()
