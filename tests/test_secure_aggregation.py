"""Secure aggregation: fixed point, int64 wraparound, refusals, and a real 3-rank gloo run under torchrun."""

import subprocess

import pytest
import torch
from helpers import TESTS, torchrun, worker_env

from fedlm.federation.secure import FIELD, SecureAggregationConfig, SecureAggregator, max_magnitude

BITS = 24
SCALE = 2.0**BITS


def encode(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.double() * SCALE).to(torch.int64)


def decode(n: torch.Tensor) -> torch.Tensor:
    return n.double() / SCALE


def wrap(value: int) -> int:
    """A Python integer reduced to int64 the way two's complement hardware does it."""
    return (value + 2**63) % 2**64 - 2**63


# -- one process --------------------------------------------------------------------------------------------


def test_one_process_sum_is_the_fixed_point_rounding() -> None:
    aggregator = SecureAggregator(SecureAggregationConfig(enabled=True, fractional_bits=BITS))
    aggregator.setup()
    x = torch.randn(4, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 100
    summed = aggregator.sum(x, round_index=0)
    assert summed.dtype == torch.float64 and summed.shape == x.shape
    assert torch.equal(summed, decode(encode(x)))
    assert (summed - x).abs().max() <= 2 ** -(BITS + 1)
    exact = torch.arange(-1000, 1000, dtype=torch.float64) / 2**BITS  # already on the grid: returned as is
    assert torch.equal(aggregator.sum(exact.float(), round_index=1), exact)


def test_int64_arithmetic_wraps_modulo_2_64() -> None:
    values = [2**62, 2**63 - 1, -(2**63), -5]
    a = torch.tensor(values, dtype=torch.int64)
    b = torch.tensor([2**62, 1, -1, 2**63 - 1], dtype=torch.int64)
    assert (a + b).tolist() == [wrap(x + y) for x, y in zip(values, b.tolist())]
    assert (a - b).tolist() == [wrap(x - y) for x, y in zip(values, b.tolist())]
    assert (a + b - b).tolist() == values  # a mask added then subtracted cancels exactly, through any overflow


def test_values_that_could_overflow_the_sum_are_refused_naming_the_field() -> None:
    assert max_magnitude(BITS, 1) == 2.0**38 and max_magnitude(BITS, 4) == 2.0**36
    aggregator = SecureAggregator(SecureAggregationConfig(enabled=True, fractional_bits=BITS))
    below = torch.tensor([0.0, 2.0**38 - 1, -(2.0**38) + 1], dtype=torch.float64)
    assert torch.equal(aggregator.sum(below, 0), below)
    with pytest.raises(ValueError, match=rf"magnitude >= 2.75e\+11.*{FIELD}=24\. Lower {FIELD}"):
        aggregator.sum(torch.tensor([1.0, -(2.0**38)]), 0)
    with pytest.raises(ValueError, match=f"{FIELD}=60 must be in"):
        SecureAggregationConfig(enabled=True, fractional_bits=60).validate()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_refused(bad: float) -> None:
    aggregator = SecureAggregator(SecureAggregationConfig(enabled=True))
    with pytest.raises(ValueError, match="non-finite values"):
        aggregator.sum(torch.tensor([1.0, bad, 2.0]), 0)


# -- three real ranks on gloo ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    out = tmp_path_factory.mktemp("secure")
    command = [*torchrun(3), str(TESTS / "secure_worker.py"), str(out)]
    result = subprocess.run(command, capture_output=True, text=True, env=worker_env(), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt") for r in range(3)]


@pytest.mark.multiprocess
def test_gloo_all_reduce_on_int64_wraps(ranks: list[dict]) -> None:
    inputs = [r["wrap_input"].tolist() for r in ranks]
    expected = [wrap(sum(column)) for column in zip(*inputs)]
    assert expected[0] == -(2**62)  # 3 * 2**62 did overflow
    for r in ranks:
        assert r["wrap_output"].tolist() == expected


@pytest.mark.multiprocess
def test_secure_sum_is_the_exact_sum_of_the_fixed_point_inputs(ranks: list[dict]) -> None:
    world = len(ranks)
    for round_index in range(2):
        for call in range(2):
            inputs = [r["rounds"][round_index]["inputs"][call] for r in ranks]
            outputs = [r["rounds"][round_index]["outputs"][call] for r in ranks]
            expected = decode(sum(encode(x) for x in inputs))
            for output in outputs:
                assert torch.equal(output, expected)  # bitwise, on every rank
            float_sum = sum(inputs)
            assert (outputs[0] - float_sum).abs().max() <= world * 2**-BITS
            assert (inputs[0] - float_sum).abs().max() > 1  # the inputs do differ per rank


@pytest.mark.multiprocess
def test_what_travels_is_masked(ranks: list[dict]) -> None:
    masks = {}
    for r in ranks:
        assert len(r["sent"]) == 4  # two rounds of two calls, nothing else
        for index, sent in enumerate(r["sent"]):
            round_index, call = divmod(index, 2)
            x = r["rounds"][round_index]["inputs"][call]
            plain = torch.cat([encode(x), torch.tensor([1, 0, 0])])
            assert sent.dtype == torch.int64 and sent.shape == plain.shape
            assert not (sent == plain).any()  # not one coordinate in the clear
            assert sent.abs().double().median() > 2.0**60  # uniform int64, while |plain| < 2**28
            if call == 0:
                correlation = torch.corrcoef(torch.stack([sent.double()[:-3], x]))[0, 1]
                assert abs(correlation) < 0.2  # independent: the std of the estimate is 1/sqrt(1000)
            masks[r["rank"], round_index, call] = sent - plain  # wraps modulo 2**64
    for round_index in range(2):
        for call in range(2):
            total = sum(masks[rank, round_index, call] for rank in range(3))
            assert not total.any()  # the masks cancel exactly
    for rank in range(3):
        first = masks[rank, 0, 0]
        assert not (first == masks[rank, 1, 0]).any()  # fresh masks each round
        assert not (first[:40] == masks[rank, 0, 1]).any()  # and each call within a round
    assert not (masks[0, 0, 0] == masks[1, 0, 0]).any()


@pytest.mark.multiprocess
def test_only_public_keys_travel(ranks: list[dict]) -> None:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    transmitted = [t.numpy().tobytes() for r in ranks for t in [*r["gathered"], *r["sent"]]]
    publics = set()
    for r in ranks:
        (private,) = r["private_keys"]
        length, key = r["gathered"]  # one exchange: the key's length (checked by every rank), then the key itself
        assert length.tolist() == [32] and key.dtype == torch.uint8 and key.shape == (32,)
        gathered = key.numpy().tobytes()
        assert gathered == X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()
        publics.add(gathered)
        for secret in [private, *r["pair_keys"]]:
            assert not any(secret in payload for payload in transmitted)
    assert len(publics) == 3
    # each pair of ranks derived the same key, different from every other pair's
    keys = {}
    for r in ranks:
        others = [other for other in range(3) if other != r["rank"]]
        keys.update({(r["rank"], other): key for other, key in zip(others, r["pair_keys"])})
    assert keys[0, 1] == keys[1, 0] and keys[0, 2] == keys[2, 0] and keys[1, 2] == keys[2, 1]
    assert len({keys[0, 1], keys[0, 2], keys[1, 2]}) == 3


@pytest.mark.multiprocess
def test_refusals_and_out_of_step_calls_fail_on_every_rank(ranks: list[dict]) -> None:
    for r in ranks:
        errors = r["errors"]
        # 1e11 is allowed alone (below 2**38) but not when 3 ranks' values are summed (2**38 / 3 = 9.16e10)
        assert errors["huge"].startswith(
            "SecureAggregationError: secure aggregation: 1 rank(s) hold values of magnitude >= 9.16e"
        )
        assert f"summed with {FIELD}=24. Lower {FIELD}" in errors["huge"]
        assert errors["nan"].startswith(
            "SecureAggregationError: secure aggregation: 1 rank(s) tried to sum non-finite values"
        )
        assert errors["step"].startswith("RuntimeError: secure aggregation masks did not cancel")
