"""The LeFusion denoiser: official state-dict layout, the official tiny reference output, both execution paths."""
from __future__ import annotations

import json
import math

import pytest
import torch

from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model import ModelConfig, available_configs
from nnunet_lefusion.model.unet3d import Attention, RelativePositionBias
from tests.reference import reference_numbers, tiny_reference


@pytest.fixture(scope="module")
def reference() -> dict:
    return tiny_reference()


def test_official_config_has_every_official_key_and_shape():
    expected = reference_numbers()
    with torch.device("meta"):
        model = ModelConfig.from_yaml("official").build()
    model.load_state_dict({k: torch.empty(v, device="meta") for k, v in
                           expected["emidec_unet_state_dict_shapes"].items()}, strict=True, assign=True)
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == expected["emidec_unet_state_dict_shapes"]
    assert list(shapes) == list(expected["emidec_unet_state_dict_shapes"])  # same order as the official code
    assert sum(p.numel() for p in model.parameters()) == expected["emidec_unet_num_params"] == 44_895_314
    freqs = [name for name, _ in model.named_buffers() if name.endswith("rotary_emb.freqs")]
    assert len(freqs) == 10 and all(shapes[name] == [16] for name in freqs)


@pytest.mark.parametrize("fused", [False, True])
def test_tiny_reference_output_is_reproduced(reference, fused):
    model = ModelConfig.from_dict(reference["config"]).build().eval()
    model.load_state_dict(reference["state_dict"], strict=True)
    model.fused = fused
    with torch.no_grad():
        out = model(reference["x"], reference["t"], reference["cond"])
    torch.testing.assert_close(out, reference["y"], atol=1e-5, rtol=1e-5)


def test_rotary_frequencies_are_the_official_ones():
    freqs = Attention(8, 2, 32, rotary=True).rotary_emb.freqs
    expected = torch.tensor([10000 ** (-2 * k / 32) for k in range(16)])
    torch.testing.assert_close(freqs, expected)


def test_relative_position_buckets_follow_t5_over_ten_slices():
    def t5_bucket(query: int, key: int) -> int:  # T5 with 32 buckets and max distance 32
        distance = query - key
        bucket = 16 if distance < 0 else 0
        distance = abs(distance)
        if distance < 8:
            return bucket + distance
        return bucket + min(15, 8 + int(math.log(distance / 8) / math.log(32 / 8) * 8))

    buckets = RelativePositionBias(heads=8).buckets(10, torch.device("cpu"))
    assert buckets.tolist() == [[t5_bucket(i, j) for j in range(10)] for i in range(10)]


def _varied_config() -> ModelConfig:
    """Exercises partial rotary (head width 48 > 32), disabled blocks, no condition and 3 -> 1 channels."""
    return ModelConfig(dim=8, dim_mults=(1, 8), channels=3, out_channels=1, cond_dim=None, attn_heads=2,
                       attn_dim_head=48, linear_attn=(False, True), temporal_attn=(True, False))


def test_fused_and_plain_paths_agree_in_outputs_and_gradients():
    torch.manual_seed(0)
    model = _varied_config().build()
    x = torch.randn(2, 3, 5, 8, 8)
    t = torch.tensor([0, 299])
    results = {}
    for fused in (False, True):
        model.fused = fused
        model.zero_grad()
        out = model(x, t)
        out.square().mean().backward()
        results[fused] = out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.testing.assert_close(results[True][0], results[False][0], atol=1e-5, rtol=1e-5)
    assert results[False][0].shape == (2, 1, 5, 8, 8)
    for name, grad in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)
        assert grad.abs().sum() > 0, name


@pytest.mark.parametrize("pixels", [1, 64], ids=["rotated-activations", "rotated-weights"])
def test_fused_attention_matches_plain_attention_along_slices(pixels):
    torch.manual_seed(1)
    attention = Attention(dim=16, heads=2, dim_head=32, rotary=True)
    tokens = torch.randn(6, 2, pixels, 16)  # (D, B, P, C)
    bias = RelativePositionBias(heads=2)(6, torch.device("cpu"))
    with torch.no_grad():
        fused = attention.attend_fused(tokens, over_slices=True, pos_bias=bias)
        plain = attention(tokens.permute(1, 2, 0, 3), bias).permute(2, 0, 1, 3)  # sequences along D
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_condition_broadcasts_and_defaults_to_the_null_embedding(reference):
    model = ModelConfig.from_dict(reference["config"]).build().eval()
    x, t, cond = reference["x"], reference["t"], reference["cond"]
    with torch.no_grad():
        shared = model(x, t, cond[0])
        repeated = model(x, t, cond[:1].expand(2, -1))
        unconditional = model(x, t, None)
        null = model(x, t, model.null_cond_emb.expand(2, -1))
        other = model(x, t, cond)
    torch.testing.assert_close(shared, repeated)
    torch.testing.assert_close(unconditional, null)
    assert not torch.allclose(shared, other)  # the condition reaches the output


def test_bad_inputs_raise_readable_errors():
    model = ModelConfig.from_yaml("tiny").build()
    t = torch.zeros(1, dtype=torch.long)
    with pytest.raises(LeFusionError, match="expects input"):
        model(torch.randn(1, 1, 2, 8, 8), t, torch.rand(1, 32))
    with pytest.raises(LeFusionError, match="divisible by 2"):
        model(torch.randn(1, 2, 2, 7, 8), t, torch.rand(1, 32))
    with pytest.raises(LeFusionError, match="condition of 32 values"):
        model(torch.randn(1, 2, 2, 8, 8), t, torch.rand(1, 16))


def test_packaged_configs_build_and_round_trip(tmp_path):
    assert {"tiny", "small", "official"} <= set(available_configs())
    for name in available_configs():
        config = ModelConfig.from_yaml(name)
        assert ModelConfig.from_dict(config.to_dict()) == config
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(config.to_dict()))  # JSON is valid YAML
        assert ModelConfig.from_yaml(path) == config
    official = ModelConfig.from_yaml("official")
    assert (official.dim, official.dim_mults, official.channels, official.cond_dim) == (72, (1, 2, 4, 8), 2, 32)
    assert (official.attn_heads, official.attn_dim_head) == (8, 32)
    small = ModelConfig.from_yaml("small")
    with torch.device("meta"):
        keys = small.build().state_dict().keys()
    assert not any(k.startswith("downs.0.2.") for k in keys)  # no linear attention at the finest level
    assert any(k.startswith("downs.1.2.") for k in keys)


@pytest.mark.parametrize("values, message", [
    ({"dim": 16, "depth": 3}, "Unknown model config key"),
    ({"dim_mults": [1, 2]}, "needs at least 'dim'"),
    ({"dim": 15}, "even number"),
    ({"dim": 12, "dim_mults": [1, 2]}, "divisible by resnet_groups"),
    ({"dim": 16, "dim_mults": [1, 2], "linear_attn": [True]}, "one flag per level"),
    ({"dim": 16, "attn_heads": 0}, "positive integer"),
    ({"dim": 16, "attn_dim_head": 7}, "must be even"),
])
def test_invalid_configs_raise(values, message):
    with pytest.raises(LeFusionError, match=message):
        ModelConfig.from_dict(values)


def test_unknown_or_unreadable_config_files_raise(tmp_path):
    with pytest.raises(LeFusionError, match="Unknown model config 'huge'"):
        ModelConfig.from_yaml("huge")
    with pytest.raises(LeFusionError, match="Cannot read"):
        ModelConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("dim: [16\n")
    with pytest.raises(LeFusionError, match="not valid YAML"):
        ModelConfig.from_yaml(bad)


def test_fused_path_runs_under_bfloat16_autocast(reference):
    model = ModelConfig.from_dict(reference["config"]).build().eval()
    model.load_state_dict(reference["state_dict"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(reference["x"], reference["t"], reference["cond"])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), reference["y"], atol=0.1, rtol=0.05)


@pytest.mark.slow
def test_fused_path_compiles_to_one_graph_forward_and_backward():
    torch.manual_seed(0)
    model = ModelConfig.from_yaml("tiny").build()
    x, t, cond = torch.randn(2, 2, 4, 8, 8), torch.tensor([1, 250]), torch.rand(2, 32)
    expected = model(x, t, cond)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # no graph breaks, no C++ toolchain
    out = compiled(x, t, cond)
    torch.testing.assert_close(out, expected)
    out.square().mean().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n != "null_cond_emb")
