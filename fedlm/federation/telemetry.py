"""What a round reports: per-client losses, distances, samples and bytes, timings, and (DP) the privacy spent, as
logged metrics and one log line. Pure: the loop hands the figures in and logs what comes out."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

PER_CLIENT_LIMIT = 32  # up to this many clients, each gets its own metrics and log-line entry


@dataclass(frozen=True)
class RoundReport:
    round: int  # rounds completed
    losses: list[float]  # mean training loss per client (nan: not sampled, or not known on this rank under DP)
    distances: list[float]  # each client's distance from the new global vector (same nan rule)
    samples: list[float]  # training set size per client
    client_bytes: list[int]  # sent and received per client
    compute_seconds: float
    comm_seconds: float
    privacy: tuple[float, float, float] | None = None  # (epsilon, epsilon against a peer, clip norm) under DP


def client_losses(
    loss_sums: torch.Tensor, steps: torch.Tensor, own: dict[int, list[float]] | None, clients: int
) -> torch.Tensor:
    """Mean training loss per client, from the round's sums; or, where losses did not travel (``own`` given), this
    rank's own clients' only."""
    if own is None:
        return loss_sums / steps.clamp(min=1)
    losses = torch.full((clients,), float("nan"), dtype=torch.float64)
    for client, values in own.items():
        losses[client] = sum(values) / max(1, len(values))
    return losses


def exchanged_bytes(sampled: list[int], clients: int, bytes_per_client: int) -> list[int]:
    """Each sampled client sends the round's payload (``bytes_per_client``, as it crosses the wire) and receives the
    sum, once each; the others exchange nothing."""
    return [2 * bytes_per_client if client in sampled else 0 for client in range(clients)]


def metrics(report: RoundReport) -> dict[str, float]:
    logged = {
        "round": float(report.round),  # an x-axis for per-round charts (W&B: set it in the chart)
        "round/bytes_exchanged": float(sum(report.client_bytes)),
        "round/compute_seconds": report.compute_seconds,
        "round/comm_seconds": report.comm_seconds,
    }
    if report.privacy is not None:
        logged["dp/epsilon"], logged["dp/epsilon_peer"], logged["dp/clip_norm"] = report.privacy
    if len(report.losses) > PER_CLIENT_LIMIT:  # thousands of clients: the round's sampled ones, summarized
        losses, distances = known(report.losses), known(report.distances)
        logged["clients/train_loss_mean"] = sum(losses) / len(losses) if losses else math.nan
        logged["clients/divergence_max"] = max(distances, default=math.nan)
        return logged
    for client, loss in enumerate(report.losses):
        logged[f"client{client}/train_loss"] = loss
        logged[f"client{client}/divergence"] = report.distances[client]
        logged[f"client{client}/samples"] = report.samples[client]
        logged[f"client{client}/bytes"] = float(report.client_bytes[client])
    return logged


def known(values: list[float]) -> list[float]:
    return [v for v in values if not math.isnan(v)]


def log_line(report: RoundReport, rounds: int) -> str:
    if len(report.losses) > PER_CLIENT_LIMIT:
        losses = known(report.losses)
        summary = f"{min(losses):.3f}-{max(losses):.3f}, mean {sum(losses) / len(losses):.3f}" if losses else "n/a"
        losses_text = f"sampled clients' train loss {summary}"
    else:
        losses_text = "client train loss " + " ".join(f"{loss:.3f}" for loss in report.losses)
    line = (
        f"[fedlm] round {report.round}/{rounds}: {losses_text} | compute {report.compute_seconds:.2f}s "
        f"comm {report.comm_seconds:.3f}s | {sum(report.client_bytes) / 1e6:.2f} MB exchanged"
    )
    if report.privacy is not None:
        epsilon, peer, clip = report.privacy
        line += f" | epsilon {epsilon:.2f} (peer {peer:.2f}), clip {clip:.3g}"
    return line
