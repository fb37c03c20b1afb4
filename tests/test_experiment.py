"""The triad experiment: statistics on known inputs, reading run logs, and an end-to-end run on a tiny model."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

from fedlm.errors import ConfigError
from fedlm.experiment import TriadConfig, markdown, run_experiment, write_report
from fedlm.experiment.report import find_runs, group, model_section, read_curve
from fedlm.experiment.runner import plan
from fedlm.experiment.stats import example_bootstrap, hierarchical_bootstrap, mean_interval
from fedlm.federation.aggregate import payload_layout
from fedlm.model import PromptEncoderConfig
from fedlm.ptuning import CacheConfig, OptimizerConfig
from fedlm.tasks import TaskConfig


def test_mean_interval_is_the_student_t_interval() -> None:
    interval = mean_interval([1.0, 2.0, 3.0])  # sd 1, n 3, t(0.975, 2) = 4.303
    assert interval.mean == 2.0
    assert interval.high - 2.0 == pytest.approx(4.303 / math.sqrt(3), abs=1e-9)
    assert interval.low == pytest.approx(2.0 - 4.303 / math.sqrt(3), abs=1e-9)
    clipped = mean_interval([0.90, 0.95, 1.00], bounds=(0.0, 1.0))  # sd 0.05: the t-interval reaches 1.074
    assert clipped.high == 1.0 and clipped.low == pytest.approx(0.95 - 4.303 * 0.05 / math.sqrt(3), abs=1e-9)
    single = mean_interval([0.8])
    assert (single.low, single.mean, single.high) == (0.8, 0.8, 0.8) and str(single) == "0.800"
    with pytest.raises(ValueError):
        mean_interval([])


def test_hierarchical_bootstrap_on_known_inputs() -> None:
    labels = [0, 1, 2, 1]
    same = [[0, 1, 1, 1]] * 2
    result = hierarchical_bootstrap(same, labels, same)
    assert (result.difference, result.low, result.high, result.p_value) == (0.0, 0.0, 0.0, 1.0)

    right, wrong = [[1] * 50], [[0] * 50]
    result = hierarchical_bootstrap(right, [1] * 50, wrong)
    assert (result.difference, result.low, result.high) == (1.0, 1.0, 1.0) and result.p_value == 0.0

    # One seed: the bootstrap over sentences. b = a with 40 of 1000 right answers turned wrong: the difference is
    # 0.04, and the interval of a resampled proportion of 40 discordant pairs is about
    # 0.04 +- 1.96 * sqrt(0.04 * 0.96 / 1000).
    generator = torch.Generator().manual_seed(0)
    truth = [1] * 1000
    a = [1 if x else 0 for x in (torch.rand(1000, generator=generator) < 0.8).tolist()]
    flipped = [i for i, x in enumerate(a) if x][:40]
    b = [0 if i in flipped else x for i, x in enumerate(a)]
    result = hierarchical_bootstrap([a], truth, [b], resamples=20_000)
    assert result.difference == pytest.approx(0.04)
    half = 1.96 * math.sqrt(0.04 * 0.96 / 1000)
    assert result.low == pytest.approx(0.04 - half, abs=0.003) and result.high == pytest.approx(0.04 + half, abs=0.003)
    assert result.p_value < 0.001
    with pytest.raises(ValueError, match="same shape"):
        hierarchical_bootstrap([[1]], [1], [[1, 0]])


def test_the_interval_widens_with_seed_to_seed_variance() -> None:
    """Seeds that disagree (one at 0.6, two at 1.0) widen the interval past what the sentences alone give; the
    t-interval over seeds would not see the sentences, the sentence bootstrap would not see the seeds."""
    labels = [1] * 200
    steady = [[1] * 180 + [0] * 20] * 3  # 0.9 each seed
    spread = [[1] * 120 + [0] * 80, [1] * 200, [1] * 200]  # 0.6, 1.0, 1.0: mean 0.867
    narrow, wide = hierarchical_bootstrap(steady, labels), hierarchical_bootstrap(spread, labels)
    assert narrow.difference == pytest.approx(0.9) and wide.difference == pytest.approx(0.8667, abs=1e-4)
    assert wide.high - wide.low > 3 * (narrow.high - narrow.low)
    assert wide.low < 0.7  # a draw of three copies of the 0.6 seed is possible


def test_macro_f1_bootstrap_centres_on_the_per_seed_macro_f1() -> None:
    from torchmetrics.functional.classification import multiclass_f1_score

    generator = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, (120,), generator=generator)
    preds = [torch.where(torch.rand(120, generator=generator) < 0.8, labels, (labels + 1) % 3) for _ in range(2)]
    result = hierarchical_bootstrap([p.tolist() for p in preds], labels.tolist(), metric="macro_f1")
    expected = sum(float(multiclass_f1_score(p, labels, 3, average="macro")) for p in preds) / 2
    assert result.difference == pytest.approx(expected) and result.low < expected < result.high


def test_read_curve_maps_validation_steps_to_the_fraction_of_the_budget(tmp_path: Path) -> None:
    (tmp_path / "metrics.csv").write_text(
        "epoch,step,train/loss,val/acc,val/loss,round/bytes_exchanged\n"
        "0,5,1.0,,,\n"
        "0,11,,0.5,0.9,100\n"
        "1,17,0.7,,,\n"
        "1,23,,0.75,0.6,100\n"
    )
    curve, exchanged = read_curve(tmp_path / "metrics.csv")
    assert curve == [(0.5, 0.9, 0.5), (1.0, 0.6, 0.75)]
    assert exchanged == 200.0


def tiny_configs(tmp_path: Path, backbone: str, fpb: Path) -> dict[str, str]:
    base = {
        "trainer": {
            "accelerator": "cpu",
            "enable_model_summary": False,
            "num_sanity_val_steps": 0,
            "max_epochs": 2,
            "log_every_n_steps": 1,
        },  # fmt: skip
        "model": {
            "backbone": backbone,
            "encoder": {"type": "mlp", "virtual_tokens": 3, "hidden_size": 8},
            "optimizer": {"lr": 0.05},
        },  # fmt: skip
        "data": {"class_path": "fedlm.data.FinancialPhraseBank", "init_args": {"path": str(fpb), "batch_size": 8}},
    }
    configs = {
        "centralized": base,
        "federated": {**base, "federation": {"clients": 2, "rounds": 3, "local_epochs": 0.67}},
        "local": {
            **base,
            "data": {**base["data"], "init_args": {**base["data"]["init_args"], "local_client": 0, "local_clients": 2}},
        },
    }
    paths = {}
    for name, config in configs.items():
        paths[name] = str(tmp_path / f"{name}.yaml")
        Path(paths[name]).write_text(yaml.safe_dump(config))
    return paths


def test_a_run_kind_may_compose_several_configs_in_order(tmp_path: Path) -> None:
    base, overlay = tmp_path / "base.yaml", tmp_path / "blog.yaml"
    base.write_text(yaml.safe_dump({"federation": {"clients": 3, "rounds": 19}}))
    overlay.write_text(yaml.safe_dump({"federation": {"clients": 2, "rounds": 50}}))
    config = TriadConfig(centralized=str(base), federated=[str(base), str(overlay)], local=[str(base), str(overlay)],
                         seeds=[7], zero_shot=False)  # fmt: skip
    runs = {run.name: run.args for run in plan(config)}
    assert list(runs) == ["centralized", "federated", "local0", "local1"]  # the overlay's 2 clients
    assert runs["federated"][:5] == ["fit", "--config", str(base), "--config", str(overlay)]
    assert runs["centralized"][:3] == ["fit", "--config", str(base)]
    with pytest.raises(FileNotFoundError, match=r"local: .*missing.yaml does not exist"):
        plan(replace(config, local=[str(base), str(tmp_path / "missing.yaml")]))
    assert [run.name for run in plan(replace(config, arms=["federated"]))] == ["federated"]
    with pytest.raises(ConfigError, match=r"arms=\['federal'\]: give one or more of"):
        plan(replace(config, arms=["federal"]))


@pytest.mark.multiprocess
def test_triad_end_to_end_with_two_seeds_resumes_and_reports(
    tiny_gpt2_dir: str, synthetic_fpb: Path, tmp_path: Path
) -> None:
    config = TriadConfig(
        **tiny_configs(tmp_path, tiny_gpt2_dir, synthetic_fpb), seeds=[1, 2], output=str(tmp_path / "triad"), threads=1
    )
    readme = run_experiment(replace(config, jobs=2))  # two runs at a time, one thread each

    rows = group(find_runs([tmp_path / "triad"]))
    assert list(rows) == ["centralized", "federated", "client 0 alone", "client 1 alone", "zero-shot"]
    assert all([r.seed for r in runs] == [1, 2] for runs in rows.values())
    for name in ["centralized", "federated", "client 0 alone"]:
        run = rows[name][0]
        assert len(run.labels) == len(run.predicted) == 12  # the whole test split
        assert run.metrics["test/acc"] == pytest.approx(sum(y == p for y, p in zip(run.labels, run.predicted)) / 12)
        assert (
            run.curve
            and run.curve[-1][0] == 1.0
            and run.metrics["epochs_completed"] == (3 if name == "federated" else 2)
        )
    # 3 rounds x 2 clients x (send + receive) of the float64 payload: the encoder and 2 + 4 x 2 bookkeeping slots
    payload = payload_layout(rows["federated"][0].metrics["trainable_parameters"], 2)["failed"].stop
    assert rows["federated"][0].bytes_exchanged == 3 * 2 * 2 * 8 * payload
    # the seeds differ: encoder init, batch order and partition all follow the seed
    assert (
        rows["federated"][0].predicted != rows["federated"][1].predicted
        or rows["federated"][0].metrics["test/loss"] != rows["federated"][1].metrics["test/loss"]
    )

    text = readme.read_text()
    assert "| federated | 2 |" in text and "Federated within 1 point of centralized or above it" in text
    assert "bootstrap over seeds and sentences" in text and "95% CI over seeds and sentences" in text
    # the setup table reads the model's sections of each run's saved config, with the defaults of those left out
    template = "`<|VIRTUAL_PROMPT_0|> {sentence} sentiment:{label}` (cache.prefix: False)"
    assert f"| {template} | mlp, 3 virtual tokens | 0.05 | 0 | 8 |" in text
    for png in [
        "val_loss_centralized_vs_federated",
        "val_loss_local_vs_federated",
        "val_accuracy",
        "confusion_matrices",
    ]:
        assert (readme.parent / f"{png}.png").stat().st_size > 10_000

    command = json.loads((tmp_path / "triad" / "seed1" / "federated" / "command.json").read_text())
    assert command[:2] == ["env", "OMP_NUM_THREADS=1"]

    # Resume: finished runs are kept; a run without test metrics is redone, alone (one job: the same bits).
    kept = tmp_path / "triad" / "seed1" / "centralized" / "logs" / "version_0" / "test_metrics.json"
    redo = tmp_path / "triad" / "seed2" / "local1" / "logs" / "version_0" / "test_metrics.json"
    before = kept.stat().st_mtime_ns
    old = json.loads(redo.read_text())
    redo.unlink()
    run_experiment(config)
    assert kept.stat().st_mtime_ns == before
    assert json.loads(redo.read_text()) == {
        **old,
        "fit_seconds": json.loads(redo.read_text())["fit_seconds"],
    }  # bitwise


def test_the_setup_table_reads_the_model_sections_with_their_defaults_and_old_flat_configs() -> None:
    sectioned = {"task": None, "optimizer": {"lr": 0.5}}  # a section left out is saved as null
    assert model_section(sectioned, "task", TaskConfig)["template"] == TaskConfig().template
    optimizer = model_section(sectioned, "optimizer", OptimizerConfig)
    assert optimizer["lr"] == 0.5 and optimizer["warmup_steps"] == 0
    flat = {"template": "{sentence} <|VIRTUAL_PROMPT_0|> sentiment:{label}", "cache_prefix": True, "lr": 0.01}
    assert model_section(flat, "task", TaskConfig)["template"] == flat["template"]
    assert model_section(flat, "cache", CacheConfig)["prefix"] is True
    assert model_section(flat, "optimizer", OptimizerConfig)["lr"] == 0.01
    assert model_section(flat, "encoder", PromptEncoderConfig) == vars(PromptEncoderConfig())


def saved_run(
    folder: Path, kind: str, seed: int, predicted: list[int], client: int | None = None, labels: list[int] | None = None
) -> None:
    """What a tested run leaves behind, on 4 test sentences labelled 0 1 1 2 (or ``labels``); accuracy logged as
    float32, as Lightning logs it."""
    folder.mkdir(parents=True)
    labels = labels or [0, 1, 1, 2]
    acc = torch.tensor(sum(p == y for p, y in zip(predicted, labels)) / len(labels), dtype=torch.float32).item()
    metrics = {"kind": kind, "seed": seed, "client": client, "test/acc": acc, "test/macro_f1": acc,
               "fit_seconds": 1.0}  # fmt: skip
    (folder / "test_metrics.json").write_text(json.dumps(metrics))
    (folder / "test_predictions.json").write_text(
        json.dumps({"classes": ["a", "b", "c"], "label": labels, "predicted": predicted})
    )


def test_report_rebuilds_from_saved_runs_without_training(tmp_path: Path) -> None:
    saved_run(tmp_path / "c1", "centralized", 1, [0, 1, 1, 2])
    saved_run(tmp_path / "f1", "federated", 1, [0, 1, 1, 1])
    saved_run(tmp_path / "l1", "local", 1, [1, 1, 1, 1], client=0)
    readme = write_report([tmp_path], tmp_path / "report")
    text = readme.read_text()
    assert "| centralized | 1 | 1.000 [1.000, 1.000] |" in text and "| federated | 1 | 0.750 [" in text
    assert "| client 0 alone | 1 | 0.500 [" in text and "majority class (b) | - | 0.500" in text
    assert "Federated within 1 point of centralized or above it: not shown: the interval reaches" in text
    assert "Federated above every local-only client: yes" in text
    assert "resamples the seeds and the" in text and f"fedlm report {tmp_path} --out" in text


def test_a_tie_with_a_local_client_is_no_win(tmp_path: Path) -> None:
    labels = [0] * 227  # 214/227 correct on both sides: float32 rounds that count below its float64 value
    saved_run(tmp_path / "f1", "federated", 1, [0] * 214 + [1] * 13, labels=labels)
    saved_run(tmp_path / "l1", "local", 1, [1] * 13 + [0] * 214, client=0, labels=labels)
    text = write_report([tmp_path], tmp_path / "report").read_text()
    assert "Federated above every local-only client: no, client 0 alone as high or higher" in text
    assert "seed 1: federated 0.943 is not above client 0 alone (0.943)" in text


def test_against_pairs_each_row_with_its_namesake_in_another_experiment(tmp_path: Path) -> None:
    saved_run(tmp_path / "deep" / "c1", "centralized", 1, [0, 1, 1, 2])
    saved_run(tmp_path / "deep" / "c2", "centralized", 2, [0, 1, 1, 2])
    saved_run(tmp_path / "deep" / "f1", "federated", 1, [0, 1, 1, 1])
    saved_run(tmp_path / "deep" / "l1", "local", 1, [1, 1, 1, 1], client=0)  # no namesake there: no row
    saved_run(tmp_path / "shallow" / "c1", "centralized", 1, [0, 1, 1, 1])
    saved_run(tmp_path / "shallow" / "c3", "centralized", 3, [0, 0, 0, 0])  # seed 3: not paired
    saved_run(tmp_path / "shallow" / "f1", "federated", 1, [0, 1, 1, 1])
    text = write_report([tmp_path / "deep"], tmp_path / "report", against=[tmp_path / "shallow"]).read_text()
    section = text.split(f"## Against {tmp_path / 'shallow'}")[1].split("## Plots")[0]
    assert "| centralized | 1 | 1.000 | 0.750 | +25.0 [" in section  # seed 1 only
    assert "| federated | 1 | 0.750 | 0.750 | +0.0 [+0.0, +0.0] | 1.000 | yes |" in section
    assert "client 0 alone" not in section
    saved_run(tmp_path / "other" / "c1", "centralized", 1, [0, 1, 1, 2])
    (tmp_path / "other" / "c1" / "test_predictions.json").write_text(
        json.dumps({"classes": ["a", "b", "c"], "label": [1, 1, 1, 1], "predicted": [0, 1, 1, 2]})
    )
    with pytest.raises(ValueError, match="tested on different sentences"):
        write_report([tmp_path / "deep"], tmp_path / "report", against=[tmp_path / "other"])


def test_calibrated_predictions_get_rows_and_a_verdict_of_their_own(tmp_path: Path) -> None:
    labels = [0, 1, 1, 2]

    def fake_run(
        folder: Path, kind: str, predicted: list[int], calibrated: list[int], client: int | None = None
    ) -> None:
        folder.mkdir(parents=True)
        acc = lambda preds: sum(p == y for p, y in zip(preds, labels)) / 4  # noqa: E731
        metrics = {"kind": kind, "seed": 1, "client": client, "test/acc": acc(predicted),
                   "test/macro_f1": acc(predicted), "test/calibrated/acc": acc(calibrated),
                   "test/calibrated/macro_f1": acc(calibrated)}  # fmt: skip
        predictions = {
            "classes": ["a", "b", "c"],
            "label": labels,
            "predicted": predicted,
            "predicted_calibrated": calibrated,
        }
        (folder / "test_metrics.json").write_text(json.dumps(metrics))
        (folder / "test_predictions.json").write_text(json.dumps(predictions))

    fake_run(tmp_path / "c1", "centralized", [0, 1, 1, 1], [0, 1, 1, 1])
    fake_run(tmp_path / "f1", "federated", [1, 1, 1, 1], [0, 1, 1, 2])  # calibration fixes it
    fake_run(tmp_path / "l1", "local", [0, 1, 1, 2], [1, 1, 1, 1], client=0)
    rows = group(find_runs([tmp_path]))
    assert list(rows) == ["centralized", "centralized, calibrated", "federated", "federated, calibrated",
                          "client 0 alone", "client 0 alone, calibrated"]  # fmt: skip
    assert rows["federated, calibrated"][0].predicted == [0, 1, 1, 2] and rows["federated"][0].predicted == [1, 1, 1, 1]
    text = write_report([tmp_path], tmp_path / "report").read_text()
    assert "| federated, calibrated | 1 | 1.000 [1.000, 1.000] |" in text and "| federated | 1 | 0.500 [" in text
    raw, calibrated = text.split("With calibrated predictions")
    assert "Federated above every local-only client: no" in raw.split("## Verdict")[1]
    assert "Federated above every local-only client: yes" in calibrated.split("## Plots")[0]


def test_example_bootstrap_of_a_0_1_score_is_the_accuracy_bootstrap() -> None:
    """Accuracy is the mean of a 0/1 score per example: the same draws give the same interval and p-value."""
    generator = torch.Generator().manual_seed(2)
    labels = torch.randint(0, 3, (60,), generator=generator).tolist()
    a = [torch.randint(0, 3, (60,), generator=generator).tolist() for _ in range(3)]
    b = [torch.randint(0, 3, (60,), generator=generator).tolist() for _ in range(3)]
    hits = lambda preds: [[float(p == y) for p, y in zip(seed, labels)] for seed in preds]  # noqa: E731
    assert example_bootstrap(hits(a), hits(b)) == hierarchical_bootstrap(a, labels, b)
    assert example_bootstrap(hits(a)) == hierarchical_bootstrap(a, labels)
    with pytest.raises(ValueError, match="same shape"):
        example_bootstrap([[1.0, 0.0]], [[1.0]])


GENERATIVE = ("rougeL", "f1", "exact_match")


def generative_run(
    folder: Path,
    kind: str,
    seed: int,
    scores: dict[str, list[float]],
    client: int | None = None,
    reverse: bool = False,
    generated: list[float] | None = None,
) -> None:
    """What a tested generative run leaves behind on 4 test examples: each example's answer and scores (listed in
    reverse order of index with ``reverse``: the report pairs by index), corpus BLEU, and for a trained run a
    metrics.csv of validation loss with the generated validation answers' ROUGE-L (``generated``) every other
    round."""
    folder.mkdir(parents=True)
    metrics = {"kind": kind, "task": "generation", "seed": seed, "client": client, "fit_seconds": 2.0,
               "trainable_parameters": 100, "test/loss": 1.5, "test/bleu": 0.25 + seed / 100,
               **{f"test/{name}": sum(values) / 4 for name, values in scores.items()}}  # fmt: skip
    examples = [{"index": i, "generated": f"answer {i}", "references": [f"reference {i}"],
                 **{name: values[i] for name, values in scores.items()}} for i in range(4)]  # fmt: skip
    (folder / "test_metrics.json").write_text(json.dumps(metrics))
    (folder / "test_predictions.json").write_text(json.dumps({"examples": examples[::-1] if reverse else examples}))
    if generated is not None:  # rounds of 10 steps; generation every other round (its own row, as on a logger)
        lines = ["epoch,step,train/loss,val/loss,val/generated/rougeL,round/bytes_exchanged"]
        for round_, value in enumerate(generated):
            lines.append(f"{round_},{10 * round_ + 9},,{2.0 - 0.3 * round_},,1000")
            if round_ % 2:
                lines.append(f"{round_},{10 * round_ + 9},,,{value},")
        (folder / "metrics.csv").write_text("\n".join(lines) + "\n")


def test_report_of_a_generative_triad_tables_its_per_example_metrics(tmp_path: Path) -> None:
    def scores(base: float, step: float) -> dict[str, list[float]]:
        """ROUGE-L ``base``, ``base + step``, ...; F1 a little under it; exact match 1 where ROUGE-L > 0.6."""
        rouge = [round(base + step * i, 4) for i in range(4)]
        return {"rougeL": rouge, "f1": [0.9 * r for r in rouge], "exact_match": [float(r > 0.6) for r in rouge]}

    runs = {  # (kind, client): ROUGE-L (base, step) for seeds 1 and 2
        ("centralized", None): [(0.40, 0.10), (0.30, 0.10)],
        ("local", 0): [(0.10, 0.05), (0.20, 0.05)],
        ("local", 1): [(0.30, 0.05), (0.25, 0.05)],
        ("zero-shot", None): [(0.00, 0.02), (0.00, 0.02)],
    }
    expected: dict[str, dict[str, dict[str, list[float]]]] = {}
    for (kind, client), per_seed in runs.items():
        name = f"client {client} alone" if kind == "local" else kind
        expected[name] = {}
        for seed, (base, step) in enumerate(per_seed, 1):
            expected[name][seed] = scores(base, step)
            curve = None if kind == "zero-shot" else [0.1, 0.5 if client == 0 else 0.2, 0.3]  # client 0 validates best
            generative_run(tmp_path / f"seed{seed}" / f"{kind}{client or ''}", kind, seed, expected[name][seed],
                           client, generated=curve)  # fmt: skip
    # Federated: centralized's answers, 0.1 better on every example by ROUGE-L, listed in reverse order.
    expected["federated"] = {}
    for seed in (1, 2):
        centralized = expected["centralized"][seed]
        expected["federated"][seed] = {**centralized, "rougeL": [r + 0.1 for r in centralized["rougeL"]]}
        generative_run(tmp_path / f"seed{seed}" / "federated", "federated", seed, expected["federated"][seed],
                       reverse=True, generated=[0.1, 0.2, 0.3])  # fmt: skip

    readme = write_report([tmp_path], tmp_path / "report")
    text = readme.read_text()
    header, cells = markdown.table_rows(text)
    assert header[:5] == ["run", "seeds", "test ROUGE-L, mean [95% CI over seeds and examples]",
                          "test token F1, mean [95% CI over seeds and examples]",
                          "test exact match, mean [95% CI over seeds and examples]"]  # fmt: skip
    assert header[5:8] == ["ROUGE-L, 95% t-interval over seeds only", "per seed (ROUGE-L)",
                           "test BLEU (corpus), 95% t-interval over seeds"]  # fmt: skip
    table = {row[0]: row for row in cells}
    assert list(table) == ["centralized", "federated", "client 0 alone", "client 1 alone", "zero-shot"]  # no majority
    for name, per_seed in expected.items():
        row = table[name]
        assert row[1] == "2"
        for column, metric in enumerate(GENERATIVE, 2):  # the mean over seeds of each seed's mean over examples
            mean = sum(sum(per_seed[seed][metric]) / 4 for seed in (1, 2)) / 2
            low, high = (float(x) for x in row[column].split(" [")[1].rstrip("]").split(", "))
            assert row[column].startswith(f"{mean:.3f} [") and low <= round(mean, 3) <= high
        seed_means = [sum(per_seed[seed]["rougeL"]) / 4 for seed in (1, 2)]
        assert row[5] == f"{mean_interval(seed_means, bounds=(0.0, 1.0))}"
        assert row[6] == " ".join(f"{m:.3f}" for m in seed_means)
        assert row[7] == f"{mean_interval([0.26, 0.27], bounds=(0.0, 1.0))}"
        assert row[8] == ("0" if name == "zero-shot" else "100")
    assert table["centralized"][2].startswith("0.500 [") and table["federated"][2].startswith("0.600 [")

    assert "**ROUGE-L leads**" in text and "bootstrap over seeds and examples" in text
    # paired by index although federated listed its examples in reverse: +0.1 on every example, whatever the draw
    assert "Federated within 1 point of centralized or above it: yes.** Test ROUGE-L 0.600 [" in text
    assert "bootstrap over seeds and examples +10.0 points, 95% CI [+10.0, +10.0]" in text
    assert "Federated above every local-only client: yes" in text
    assert "best local-only client chosen by validation ROUGE-L (client 0 alone)" in text
    assert "majority class" not in text and "macro-F1" not in text and "calibrated" not in text
    assert not (readme.parent / "confusion_matrices.png").exists()
    for png in ["val_loss_centralized_vs_federated", "val_loss_local_vs_federated", "val_generated_rougeL"]:
        assert (readme.parent / f"{png}.png").stat().st_size > 10_000 and f"![{png}]({png}.png)" in text

    curve, exchanged = read_curve(tmp_path / "seed1" / "federated" / "metrics.csv")
    assert curve == [(1 / 3, 2.0, None), (2 / 3, 1.7, None), (1.0, 2.0 - 0.6, None)] and exchanged == 3000.0
    assert find_runs([tmp_path / "seed1" / "federated"])[0].generated_curves == {"rougeL": [(2 / 3, 0.2)]}

    # Runs scored by SQuAD alone: token F1 leads; no generated validation answers: the third plot is the loss.
    for kind in ("centralized", "federated"):
        generative_run(tmp_path / "squad" / kind, kind, 1, {"f1": [0.5, 1, 0, 1], "exact_match": [0, 1, 0, 1]},
                       generated=[])  # fmt: skip
    text = write_report([tmp_path / "squad"], tmp_path / "squad_report").read_text()
    assert "**Token F1 leads**" in text and "| centralized | 1 | 0.625 [" in text and "BLEU" in text
    assert (tmp_path / "squad_report" / "val_loss.png").exists()

    # A classification run among generative ones is refused, not tabled.
    saved_run(tmp_path / "squad" / "classifier", "centralized", 1, [0, 1, 1, 2])
    with pytest.raises(ValueError, match="mix classification and generation"):
        write_report([tmp_path / "squad"], tmp_path / "mixed_report")
