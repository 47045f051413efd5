"""Evaluation of a trained generator: FID, class accuracy and colour agreement.

- `features`: the FID Inception network (found offline or downloaded), the TF1-compatible resize,
  images -> 2048-d pool features.
- `fid`: features -> (mu, sigma) -> Frechet distance (pure functions).
- `accuracy`: a linear classifier trained on real-image features; top-k accuracy.
- `colour`: the dominant petal colour of an image and the colour words of a caption.
- `names`: species-name prompts and their accuracy on training and unseen species.
- `prdc`, `diversity`, `diversity_eval`: k-NN precision/recall/density/coverage and within-prompt
  spread, and the report's diversity section built from them.
- `cache`: keyed, atomically written `.npz` files under `<data>/cache/eval/`.
- `real`: the real-data side, each step cached: features of every real image, the split's
  statistics and FID ceiling, the real-image classifier.
- `generated`: the generated side: images from the split's captions and their features, colour
  agreement and species-name prompts.
- `output`: report.json and samples.png, written atomically.
- `evaluate`: the protocol of docs/EVALUATION.md, tying the above together.

Nothing here imports torch at package import time; each module imports what it needs.
"""
