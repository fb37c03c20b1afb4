"""Label calibration: fitted biases are the optimum of their objective, and move only when that helps."""

import itertools
import json
from pathlib import Path

import pytest
import torch
from helpers import write_config

from fedlm.tasks.calibration import fit_label_biases, objective_of, split_half


def shifted_scores(n: int = 90, shift: float = 2.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores that separate the classes perfectly (gold class 1.0 above the rest, +-0.3 noise), with ``shift`` added
    to class 1's score: raw argmax calls too much class 1, and a bias of about -shift on it undoes that."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    scores = torch.nn.functional.one_hot(labels, 3).double() + 0.3 * (
        torch.rand(n, 3, generator=generator, dtype=torch.float64) - 0.5
    )
    scores[:, 1] += shift
    return scores, labels


def grid_optimum(scores: torch.Tensor, labels: torch.Tensor, objective: str) -> float:
    """The best objective over a fine grid of (b1 - b0, b2 - b0): what any bias vector can reach, up to the grid."""
    grid = torch.arange(-4.0, 4.0001, 0.02, dtype=torch.float64)
    pairs = torch.tensor(list(itertools.product(grid.tolist(), repeat=2)), dtype=torch.float64)
    biases = torch.cat([torch.zeros(len(pairs), 1, dtype=torch.float64), pairs], dim=1)
    preds = (scores[None] + biases[:, None]).argmax(-1)
    return float(objective_of(preds, labels, 3, objective).max())


@pytest.mark.parametrize("objective", ["accuracy", "macro_f1"])
def test_fitted_biases_reach_the_known_optimum(objective: str) -> None:
    scores, labels = shifted_scores()
    raw = float(objective_of(scores.argmax(-1)[None], labels, 3, objective)[0])
    biases = fit_label_biases(scores, labels, objective)
    fitted = float(objective_of((scores + biases).argmax(-1)[None], labels, 3, objective)[0])
    assert raw < 0.5 and fitted == 1.0 == grid_optimum(scores, labels, objective)
    # class 1's bias, relative to the others, lies where every example is right: about -shift, within the noise band
    relative = biases[1] - biases[[0, 2]]
    assert bool(((relative > -2.7) & (relative < -1.3)).all()) and abs(float(biases.sum())) < 1e-9


def test_on_overlapping_classes_the_fit_equals_a_brute_force_search() -> None:
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (60,), generator=generator)
    scores = 0.8 * torch.nn.functional.one_hot(labels, 3).double() + torch.randn(
        60, 3, generator=generator, dtype=torch.float64
    )
    scores[:, 2] += 0.7
    for objective in ("accuracy", "macro_f1"):
        biases = fit_label_biases(scores, labels, objective)
        fitted = float(objective_of((scores + biases).argmax(-1)[None], labels, 3, objective)[0])
        assert fitted >= grid_optimum(scores, labels, objective) - 1e-12


def test_biases_stay_zero_when_nothing_beats_the_raw_scores() -> None:
    scores, labels = shifted_scores(shift=0.0)  # already perfect
    assert torch.equal(fit_label_biases(scores, labels, "macro_f1"), torch.zeros(3, dtype=torch.float64))


def test_split_half_scores_each_half_with_biases_fitted_on_the_other() -> None:
    scores, labels = shifted_scores(n=120)
    raw, calibrated = split_half(scores, labels, "accuracy")
    assert raw == pytest.approx(1 / 3) and calibrated == 1.0


def test_an_unknown_objective_is_refused() -> None:
    with pytest.raises(ValueError, match="'recall' is unknown"):
        fit_label_biases(torch.zeros(2, 3), torch.zeros(2), "recall")


def test_a_calibrated_fit_stores_its_biases_and_the_export_predicts_the_calibrated_test(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    from fedlm.cli import cli
    from fedlm.ptuning.export import TrainedPrompt

    config = write_config(tmp_path, tiny_gpt2_dir, synthetic_fpb, None, max_epochs=2, limit_val_batches=1.0)
    run = cli(["fit", "--config", str(config), "--model.task.calibrate", "accuracy", "--test_after_fit", "true"])
    module = run.model
    assert bool(module.task.label_bias.any())  # the tiny model's raw scores favour one class: the biases moved
    metrics = json.loads((tmp_path / "test_metrics.json").read_text())
    predictions = json.loads((tmp_path / "test_predictions.json").read_text())
    assert metrics["calibration"]["label_bias"] == dict(zip(module.task.label_names, module.task.label_bias.tolist()))
    calibrated = predictions["predicted_calibrated"]
    assert calibrated != predictions["predicted"]  # so that an export that dropped the biases would be caught
    accuracy = sum(p == y for p, y in zip(calibrated, predictions["label"])) / len(calibrated)
    assert metrics["test/calibrated/acc"] == pytest.approx(accuracy) and "test/acc" in metrics

    path = tmp_path / "final.ckpt"
    run.trainer.save_checkpoint(path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["task.label_bias"], module.task.label_bias)
    exported = tmp_path / "export"
    exported.mkdir()
    prompt = TrainedPrompt.from_checkpoint(path)
    prompt.save(exported)
    predictor = TrainedPrompt.load(exported).module()
    assert torch.equal(predictor.task.label_bias, module.task.label_bias)
    task = predictor.task
    test = run.datamodule.splits["test"]
    batch = task.template.collate([task.encode(record.fields) for record in test])
    with torch.inference_mode():
        labels = predictor.predict_step(batch, 0)["label"]
    assert [task.label_names.index(label) for label in labels] == calibrated
