"""How often does one caption name its species? A classifier on the caption alone, or on what a generator makes of it:
docs/EXPERIMENTS.md, "How much of its species one caption carries, and how much the generator draws".

A multinomial logistic regression is fitted from caption vectors (or word and word-pair
indicators) to the species of the image they describe, on the class split's training species. A
fifth of each species' images (and all their captions) is held out. It reports the top-1 over the
training species of one held-out caption, of one held-out image's captions together (their
averaged log-probabilities), and of the fitted captions themselves (in-sample).

A generator sees one caption vector and the noise, so the classifier that reads its images reads,
in the end, that caption: if a caption alone rarely tells its species, the images drawn from it
cannot either, beyond what memorising the training captions gives. With `--checkpoint` the
classifier reads what a trained generator makes of the caption instead: its condition, the
caption's mean or (`--sampled`) one draw of the conditioning augmentation, as G sees it in training.

    python experiments/caption_species.py --data-dir D [--embeddings F] [--text vectors|words] [--lam 1e-4]
    python experiments/caption_species.py --data-dir D --checkpoint RUN/checkpoints/latest.pt [--sampled]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from common import indicators, vocabulary


def fit_softmax(x: torch.Tensor, y: torch.Tensor, k: int, lam: float, iters: int = 200) -> torch.nn.Linear:
    """Multinomial logistic regression, L2 penalty `lam` on the weights, full-batch L-BFGS."""
    model = torch.nn.Linear(x.shape[1], k)
    opt = torch.optim.LBFGS(model.parameters(), max_iter=iters, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y) + lam * model.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--embeddings", help="default: the only/newest file under <data>/embeddings")
    p.add_argument("--text", choices=("vectors", "words"), default="vectors",
                   help="the embeddings file's caption vectors, or binary word and word-pair indicators "
                        "(vocabulary: those in >= 20 fitted captions)")
    p.add_argument("--lam", type=float, default=1e-4, help="L2 penalty on the weights")
    p.add_argument("--holdout", type=float, default=0.2, help="fraction of each species' images held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint", help="read the condition this generator makes of each caption vector")
    p.add_argument("--sampled", action="store_true", help="with --checkpoint: one conditioning-augmentation draw")
    args = p.parse_args()
    if args.checkpoint and args.text != "vectors":
        p.error("--checkpoint reads caption vectors, not words")
    torch.manual_seed(args.seed)

    from flowercli.config import DataLayout
    from flowercli.generate import load_generator
    from flowercli.metrics import evaluate as ev
    from flowercli.traindata import find_embeddings

    layout = DataLayout(Path(args.data_dir))
    path = Path(args.embeddings) if args.embeddings else find_embeddings(layout)
    emb = ev.load_embeddings(path)
    mode, train_mask, _ = ev.split_masks(emb, "classes")
    labels = np.asarray(emb.labels)
    n_caps = np.asarray(emb.n_captions)
    vectors = np.asarray(emb.vectors, np.float32)
    rows = np.flatnonzero(train_mask)
    species = np.unique(labels[rows])

    rng = np.random.default_rng(args.seed)
    held = np.zeros(len(labels), bool)
    for c in species:
        mine = rng.permutation(rows[labels[rows] == c])
        held[mine[: max(1, round(args.holdout * len(mine)))]] = True
    fit_rows, test_rows = rows[~held[rows]], rows[held[rows]]

    G = load_generator(Path(args.checkpoint), device="cpu").G if args.checkpoint else None

    def captions_of(rs: np.ndarray) -> np.ndarray:
        if args.text == "words":
            return indicators([c for r in rs for c in emb.captions[r][:n_caps[r]]], index)
        x = np.concatenate([vectors[r, :n_caps[r]] for r in rs])
        if G is None:
            return x
        with torch.no_grad():  # what G makes of the vectors: its condition
            cond, mu, logvar = G.cond(G.normalise_text(torch.from_numpy(x)), None)
            if mu is None or not args.sampled:
                return cond.numpy()
            eps = torch.randn(mu.shape, generator=torch.Generator().manual_seed(args.seed))
            return (mu + eps * torch.exp(0.5 * logvar)).numpy()

    if args.text == "words":
        index = {t: i for i, t in enumerate(vocabulary([c for r in fit_rows for c in emb.captions[r][:n_caps[r]]]))}
    x_fit, x_test = captions_of(fit_rows), captions_of(test_rows)
    mean, std = x_fit.mean(0), x_fit.std(0) + 1e-6
    to_class = {c: i for i, c in enumerate(species)}
    y_fit = np.repeat([to_class[c] for c in labels[fit_rows]], n_caps[fit_rows])
    y_test_img = np.array([to_class[c] for c in labels[test_rows]])
    y_test = np.repeat(y_test_img, n_caps[test_rows])

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((a - mean) / std).float()

    model = fit_softmax(tensor(x_fit), torch.from_numpy(y_fit), len(species), args.lam)
    with torch.no_grad():
        logp_test = torch.log_softmax(model(tensor(x_test)), 1).numpy()
        top1_fit = float((model(tensor(x_fit)).argmax(1).numpy() == y_fit).mean())
    per_image = np.add.reduceat(logp_test, np.concatenate([[0], np.cumsum(n_caps[test_rows])[:-1]]))
    print(json.dumps({
        "embeddings": path.name, "captions_archive": emb.attrs.get("captions_archive"), "text": args.text,
        "checkpoint": "/".join(Path(args.checkpoint).parts[-3:]) if args.checkpoint else None, "sampled": args.sampled,
        "dim": int(x_fit.shape[1]), "lam": args.lam, "split": mode, "species": int(len(species)),
        "fit_images": int(len(fit_rows)), "held_out_images": int(len(test_rows)),
        "top1_one_held_out_caption": float((logp_test.argmax(1) == y_test).mean()),
        "top1_held_out_image_all_captions": float((per_image.argmax(1) == y_test_img).mean()),
        "top1_fitted_captions": top1_fit, "chance": 1 / len(species),
    }))


if __name__ == "__main__":
    main()
