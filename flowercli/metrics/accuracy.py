"""Does an image show the class its caption came from? A linear probe on real-image features.

Multinomial logistic regression on standardised Inception features of REAL images of all classes,
trained full-batch with L-BFGS (deterministic for a fixed seed). Its
accuracy on held-out real images is the ceiling a generator's accuracy is read against.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class LinearClassifier:
    mean: np.ndarray  # (D,) feature standardisation
    scale: np.ndarray  # (D,)
    weight: np.ndarray  # (D, C)
    bias: np.ndarray  # (C,)
    classes: np.ndarray  # (C,) the class number of each output

    def logits(self, features: np.ndarray) -> np.ndarray:
        z = (np.asarray(features, np.float64) - self.mean) / self.scale
        return z @ self.weight + self.bias

    def top_k(self, features: np.ndarray, k: int) -> np.ndarray:
        """(N, k) class numbers, best first (ties broken by class order, so results are stable)."""
        order = np.argsort(-self.logits(features), axis=1, kind="stable")[:, :k]
        return self.classes[order]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"mean": self.mean, "scale": self.scale, "weight": self.weight, "bias": self.bias,
                "classes": self.classes}

    @classmethod
    def from_arrays(cls, arrays) -> LinearClassifier:
        return cls(**{k: np.asarray(arrays[k]) for k in ("mean", "scale", "weight", "bias", "classes")})


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, held-out indices): `fraction` of every class held out (at least one image
    when a class has two or more), chosen by a fixed permutation per class."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(len(idx) * fraction))
        k = min(max(k, 1 if len(idx) >= 2 else 0), len(idx) - 1) if len(idx) else 0
        held.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(held))


def train_classifier(
    features: np.ndarray,
    labels: np.ndarray,
    weight_decay: float = 1e-3,
    max_iter: int = 300,
    seed: int = 0,
) -> LinearClassifier:
    """Fit the probe: mean cross-entropy + `weight_decay` * |W|^2, by scipy's L-BFGS-B with the
    analytic gradient in float64 (torch.optim would import torch._dynamo: seconds of start-up)."""
    import scipy.optimize

    x = np.asarray(features, np.float64)
    y_cls = np.asarray(labels)
    classes = np.unique(y_cls)
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    # float32 matrix products: half the time of float64 and plenty for a linear probe.
    z = ((x - mean) / scale).astype(np.float32)
    n, d = z.shape
    k = len(classes)
    onehot = np.zeros((n, k), dtype=np.float32)
    onehot[np.arange(n), np.searchsorted(classes, y_cls)] = 1.0

    def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        w, b = theta[: d * k].reshape(d, k).astype(np.float32), theta[d * k:].astype(np.float32)
        logits = z @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = -(onehot * log_p).sum(dtype=np.float64) / n + weight_decay * (w * w).sum(dtype=np.float64)
        g = (np.exp(log_p) - onehot) / n
        grad_w = z.T @ g + 2 * weight_decay * w
        return float(loss), np.concatenate([grad_w.ravel(), g.sum(axis=0)]).astype(np.float64)

    theta0 = np.concatenate([np.random.default_rng(seed).normal(0, 0.01, d * k), np.zeros(k)])
    res = scipy.optimize.minimize(loss_grad, theta0, jac=True, method="L-BFGS-B",
                                  options={"maxiter": max_iter, "gtol": 1e-6})
    return LinearClassifier(mean=mean, scale=scale, weight=res.x[: d * k].reshape(d, k).copy(),
                            bias=res.x[d * k:].copy(), classes=classes)


def top_k_accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose true label is among the predicted (N, k) classes; nan for no rows."""
    predicted = np.asarray(predicted)
    labels = np.asarray(labels)
    if len(labels) == 0:
        return float("nan")
    return float((predicted == labels[:, None]).any(axis=1).mean())


def accuracy_report(classifier: LinearClassifier, features: np.ndarray, labels: np.ndarray) -> dict[str, float | int]:
    top5 = classifier.top_k(features, min(5, len(classifier.classes)))
    return {"top1": top_k_accuracy(top5[:, :1], labels), "top5": top_k_accuracy(top5, labels), "n": int(len(labels))}
