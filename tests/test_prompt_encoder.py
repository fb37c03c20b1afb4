import pytest
import torch

from fedlm.model.prompt_encoder import PromptEncoder, PromptEncoderConfig, initial_table

EMBED = 16


def encoder(kind: str, virtual: int = 5, **kwargs) -> PromptEncoder:
    torch.manual_seed(0)
    config = PromptEncoderConfig(type=kind, virtual_tokens=virtual, hidden_size=24, **kwargs)
    return PromptEncoder(config, EMBED, torch.randn(config.total_virtual_tokens, EMBED))


@pytest.mark.parametrize("kind", ["mlp", "lstm", "embedding"])
def test_output_shape_and_gradient(kind: str) -> None:
    enc = encoder(kind, virtual=7)
    out = enc()
    assert out.shape == (7, EMBED)
    out.sum().backward()
    assert all(p.grad is not None for p in enc.parameters())


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_mlp_depth_is_configurable(layers: int) -> None:
    enc = encoder("mlp", num_layers=layers)
    assert sum(isinstance(m, torch.nn.Linear) for m in enc.modules()) == layers


def test_lstm_is_bidirectional_with_an_mlp_head() -> None:
    enc = encoder("lstm", num_layers=2)
    assert enc.lstm.bidirectional and enc.lstm.num_layers == 2
    assert enc.head[0].in_features == 2 * 24


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_inference_table_is_cached_in_eval_and_follows_any_parameter_change(kind: str) -> None:
    enc = encoder(kind, dropout=0.3)
    enc.eval()
    first = enc().clone()
    computed_from = enc._table_params
    assert torch.equal(enc(), first) and enc._table_params is computed_from  # cached: not recomputed
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    enc.training = True  # Lightning restores modes by attribute, without calling train()
    enc.training = False
    assert not torch.equal(enc(), first)
    assert torch.equal(enc(), enc.compute())  # eval-mode compute: no dropout


def test_loaded_table_is_used_without_recomputation() -> None:
    source, target = encoder("mlp"), encoder("mlp")
    with torch.no_grad():
        source.input_table.add_(1.0)
    target.load_state_dict(source.state_dict())  # state_dict() refreshes the saved table first
    loaded = target._table_params
    target.eval()
    assert torch.equal(target(), source.eval()()) and target._table_params is loaded


def test_init_from_text_repeats_the_text_embeddings() -> None:
    embeddings = torch.randn(50, EMBED)
    config = PromptEncoderConfig(type="embedding", virtual_tokens=5, init_text="two words")
    table = initial_table(config, embeddings, lambda text: [3, 7])
    assert torch.equal(table, embeddings[[3, 7, 3, 7, 3]])


def test_random_init_matches_the_embedding_scale() -> None:
    embeddings = torch.randn(1000, EMBED) * 0.02
    table = initial_table(PromptEncoderConfig(virtual_tokens=200), embeddings, None, torch.Generator().manual_seed(0))
    assert table.std().item() == pytest.approx(0.02, rel=0.15)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("type", "transformer", "model.encoder.type='transformer' is unknown"),
        ("virtual_tokens", 0, "model.encoder.virtual_tokens=0 must be positive"),
        ("virtual_tokens", [3, -1], "model.encoder.virtual_tokens=\\[3, -1\\] must be positive"),
        ("dropout", 1.5, "model.encoder.dropout=1.5"),
    ],
)
def test_bad_config_is_refused(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PromptEncoderConfig(**{field: value}).validate()
