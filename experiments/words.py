"""Does conditioning on the caption's words help unseen species? No: docs/EXPERIMENTS.md,
"Word-level conditioning; a second seed of the shipped recipe".

`experiments/text_oracle.py` found that binary word and word-pair indicators carry a little more of an
unseen species' look than the minilm sentence vector (linearly). This script tests whether a
generator conditioned on them does better, without changing the package:

    python experiments/words.py build --data-dir D --out D/words/minilm-words.h5 [--k 256]
    flowercli train --data-dir D --embeddings D/words/minilm-words.h5 --run words --max-steps 7500 ...
    python experiments/words.py eval --checkpoint R/words/checkpoints/step-0007500.pt --data-dir D --out E

`build` writes an embeddings file whose vectors are [minilm vector || top-k principal components of
the word indicators]. The vocabulary (words and word pairs seen >= --min-count times) and the
principal axes are fitted on training-class captions only, so unseen-class captions are projected,
never fitted; they are kept beside the file (.npz) to encode new prompts. The components rather than
the raw indicators because training standardises every dimension, which would blow a rare word's
indicator up to tens of standard deviations. The file goes outside <data>/embeddings so that
`train`/`embed` defaults keep picking the minilm file.

`eval` runs the `flowercli eval` protocol (as experiments/truncation.py at psi 1) with prompts encoded
the same way, so colour agreement is measured too.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from common import indicators, vocabulary


class WordFeatures:
    """Captions -> top-k principal components of their binary word/word-pair indicators."""

    def __init__(self, vocab: list[str], mean: np.ndarray, axes: np.ndarray):
        self.vocab, self.mean, self.axes = vocab, mean, axes  # axes: (V, k)
        self.index = {t: i for i, t in enumerate(vocab)}

    @classmethod
    def fit(cls, captions: list[str], k: int, min_count: int) -> WordFeatures:
        vocab = vocabulary(captions, min_count)
        x = indicators(captions, {t: i for i, t in enumerate(vocab)}, np.float64)
        mean = x.mean(0)
        _, vecs = np.linalg.eigh(np.cov(x - mean, rowvar=False))  # eigenvalues ascending
        return cls(vocab, mean, vecs[:, ::-1][:, :k].copy())

    def __call__(self, captions: list[str]) -> np.ndarray:
        return (indicators(captions, self.index, np.float64) - self.mean) @ self.axes

    def save(self, path: Path) -> None:
        np.savez(path, vocab=np.array(self.vocab), mean=self.mean, axes=self.axes)

    @classmethod
    def load(cls, path: Path) -> WordFeatures:
        z = np.load(path)
        return cls([str(t) for t in z["vocab"]], z["mean"], z["axes"])


def build(args) -> None:
    from dataclasses import replace

    from flowercli.embeddings import open_embeddings, write_embeddings
    from flowercli.metrics import evaluate as ev

    emb = open_embeddings(Path(args.embeddings))
    _, train_mask, _ = ev.split_masks(emb, "classes")
    n_caps = np.asarray(emb.n_captions)
    fit_on = [c for r in np.flatnonzero(train_mask) for c in emb.captions[r][: n_caps[r]]]
    wf = WordFeatures.fit(fit_on, args.k, args.min_count)
    flat = [c for caps in emb.captions for c in caps]
    feats = wf(flat).reshape(len(emb.captions), len(emb.captions[0]), -1)
    vectors = np.concatenate([np.asarray(emb.vectors, np.float32), feats.astype(np.float32)], axis=2)
    out = Path(args.out)
    attrs = {**emb.attrs, "words_k": args.k, "words_min_count": args.min_count, "words_vocab": len(wf.vocab),
             "words_of": str(args.embeddings)}
    write_embeddings(out, replace(emb, vectors=vectors.astype(np.float16), attrs=attrs, path=out))
    wf.save(out.with_suffix(".npz"))
    print(json.dumps({"out": str(out), "dim": int(vectors.shape[2]), "vocab": len(wf.vocab),
                      "fit_captions": len(fit_on)}))


def evaluate(args) -> None:
    from flowercli.config import EvalConfig
    from flowercli.generate import LoadedGenerator, load_generator
    from flowercli.metrics.evaluate import evaluate as run_eval

    loaded = load_generator(Path(args.checkpoint), "cpu")
    wf = WordFeatures.load(Path(loaded.meta["encoder_info"]["path"]).with_suffix(".npz"))

    class WithWords(LoadedGenerator):
        def embed(self, prompts, report=None):
            enc = self.text_encoder()
            sentence = enc.encode_tokens(enc.tokenize(prompts))
            return np.concatenate([sentence, wf(prompts)], axis=1)

    gen = WithWords(**{f: getattr(loaded, f) for f in ("G", "meta", "checkpoint", "device")})
    t0 = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    r = run_eval(EvalConfig(data_dir=Path(args.data_dir), out_dir=out, n=args.n, n_other=args.n_other), gen)
    ca = r["class_accuracy"]
    print(json.dumps({"fid": round(r["fid"]["value"], 1), "n": args.n,
                      "unseen_top1_top5": [ca["test"]["top1"], ca["test"]["top5"]],
                      "train_class_top1_top5": [ca["train"]["top1"], ca["train"]["top5"]], "n_other": args.n_other,
                      "colour": r["colour"]["agreement"], "seconds": round(time.perf_counter() - t0)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--data-dir", required=True)
    b.add_argument("--embeddings", help="the minilm file [default: <data>/embeddings/minilm.h5]")
    b.add_argument("--out", required=True)
    b.add_argument("--k", type=int, default=256, help="principal components of the word indicators")
    b.add_argument("--min-count", type=int, default=20)
    e = sub.add_parser("eval")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--data-dir", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--n", type=int, default=1024)
    e.add_argument("--n-other", type=int, default=512)
    args = p.parse_args()
    if args.cmd == "build":
        from flowercli.config import DataLayout

        args.embeddings = args.embeddings or str(DataLayout(Path(args.data_dir)).embeddings_file("minilm"))
        build(args)
    else:
        evaluate(args)


if __name__ == "__main__":
    main()
