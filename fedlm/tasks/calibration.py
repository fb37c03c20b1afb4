"""Label calibration: one additive bias per class on the label scores, fitted on validation after training.

A frozen LM scores the label words with priors of its own (here: "neutral" too often), which a prompt trained for a
few hundred steps does not fully undo. Adding ``b_c`` to every example's score of class ``c`` moves the decision
boundaries without touching the prompt. The biases are fitted to maximize accuracy or macro-F1 on labelled scores
by coordinate ascent with an exact line search: along one class's bias the predictions change only where that
class's score plus bias crosses the best other one, so the midpoints between those crossings are every distinct
choice there is. Fitting and scoring on the same sentences flatters the biases; ``split_half`` says what they are
worth on sentences they were not fitted on.
"""

from __future__ import annotations

from typing import Literal

import torch

from fedlm.errors import ConfigError

Objective = Literal["accuracy", "macro_f1"]
OBJECTIVES = ("accuracy", "macro_f1")


def objective_of(preds: torch.Tensor, labels: torch.Tensor, num_classes: int, objective: Objective) -> torch.Tensor:
    """Accuracy or macro-F1 of each row of ``preds`` (candidates, examples) against ``labels``: (candidates,)."""
    correct = preds == labels
    if objective == "accuracy":
        return correct.double().mean(dim=-1)
    f1 = []
    for c in range(num_classes):
        true_positive = (correct & (labels == c)).sum(-1).double()
        predicted, actual = (preds == c).sum(-1).double(), (labels == c).sum().double()
        f1.append(torch.where(predicted + actual > 0, 2 * true_positive / (predicted + actual), 0.0))
    return torch.stack(f1).mean(dim=0)


def fit_label_biases(
    scores: torch.Tensor, labels: torch.Tensor, objective: Objective = "macro_f1", sweeps: int = 20
) -> torch.Tensor:
    """Per-class biases that maximize ``objective`` of ``argmax(scores + biases)``; zeros if nothing beats them.

    ``scores``: (examples, classes); ``labels``: (examples,). Among equally good values for a bias the one closest to
    its current value (0 at the start) is kept, so a bias moves only when that strictly helps.
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"calibration objective {objective!r} is unknown; use one of {OBJECTIVES}.")
    scores, labels = scores.double(), labels.long()
    num_classes = scores.shape[1]
    biases = torch.zeros(num_classes, dtype=torch.float64)
    best = objective_of((scores + biases).argmax(-1)[None], labels, num_classes, objective)[0]
    for _ in range(sweeps):
        improved = False
        for c in range(num_classes):
            others = scores + biases
            others[:, c] = float("-inf")
            rival, rival_class = others.max(dim=1)
            # Example i goes to class c exactly when biases[c] > rival_i - scores_ic.
            crossings = torch.unique(rival - scores[:, c])
            candidates = torch.cat([crossings[:1] - 1.0, (crossings[1:] + crossings[:-1]) / 2, crossings[-1:] + 1.0])
            preds = torch.where(candidates[:, None] > (rival - scores[:, c])[None], c, rival_class[None])
            values = objective_of(preds, labels, num_classes, objective)
            top = values.max()
            if top > best:
                winners = candidates[values == top]
                biases[c] = winners[(winners - biases[c]).abs().argmin()]
                best, improved = top, True
        if not improved:
            break
    return biases - biases.mean()  # only differences matter; centred, they read as shifts


def split_half(scores: torch.Tensor, labels: torch.Tensor, objective: Objective) -> tuple[float, float]:
    """(raw, calibrated) ``objective`` on sentences the biases were not fitted on: fit on the even-indexed half and
    score the odd one, and the other way round; the two halves' values are averaged."""
    num_classes = scores.shape[1]
    raw, calibrated = [], []
    for fit, held in ((slice(0, None, 2), slice(1, None, 2)), (slice(1, None, 2), slice(0, None, 2))):
        biases = fit_label_biases(scores[fit], labels[fit], objective)
        for values, shift in ((raw, 0.0), (calibrated, biases)):
            preds = (scores[held].double() + shift).argmax(-1)
            values.append(float(objective_of(preds[None], labels[held], num_classes, objective)[0]))
    return sum(raw) / 2, sum(calibrated) / 2
