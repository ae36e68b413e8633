"""Denoiser checkpoints: our round trip, the official layout both ways, and readable refusals."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from nnunet_lefusion.diffusion.schedule import BUFFER_NAMES, CosineSchedule
from nnunet_lefusion.cli.export import main as export_main
from nnunet_lefusion.errors import LeFusionError
from nnunet_lefusion.model import CheckpointMeta, ModelConfig, load_checkpoint, save_checkpoint
from tests.reference import reference_numbers, tiny_reference


@pytest.fixture(scope="module")
def reference() -> dict:
    return tiny_reference()


@pytest.fixture
def official_file(tmp_path, reference) -> Path:
    """An official-format checkpoint of the tiny reference network, trained with DataParallel."""
    wrapped = {**CosineSchedule(300).official_buffers(),
               **{f"denoise_fn.module.{k}": v for k, v in reference["state_dict"].items()}}
    path = tmp_path / "official.pt"
    torch.save({"step": 23000, "model": wrapped, "ema": dict(wrapped), "scaler": {}}, path)
    return path


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_round_trip_keeps_weights_metadata_and_optimizer(tmp_path):
    torch.manual_seed(0)
    config = ModelConfig.from_yaml("tiny")
    model, ema = config.build(), config.build()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(1, 2, 2, 8, 8), torch.tensor([3]), torch.rand(1, 32)).mean().backward()
    optimizer.step()
    meta = CheckpointMeta(lesion_labels=[3, 4], roi_size=[10, 72, 72],
                          intensity={"mode": "minmax", "low": -12.5, "high": 830.0},
                          histogram_clusters=[[0.0] * 16, [0.5] * 16], extras={"dataset": "Dataset990", "n": 7})
    path = tmp_path / "ckpt" / "model.pt"
    save_checkpoint(path, model, ema=ema, step=1234, num_steps=50, meta=meta,
                    optimizer_state={"optimizer": optimizer.state_dict()})
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]  # no temporary file left behind

    loaded = load_checkpoint(path, channels=2)
    assert loaded.config == config and loaded.step == 1234 and loaded.num_steps == 50
    assert loaded.meta == meta
    assert _states_equal(loaded.build("model").state_dict(), model.state_dict())
    assert _states_equal(loaded.build("ema").state_dict(), ema.state_dict())
    assert _states_equal(loaded.build().state_dict(), ema.state_dict())  # EMA is the default
    restored = torch.optim.Adam(config.build().parameters(), lr=1e-4)
    restored.load_state_dict(loaded.optimizer_state["optimizer"])
    original, back = optimizer.state_dict()["state"], restored.state_dict()["state"]
    assert original and back.keys() == original.keys()
    assert all(torch.equal(back[i]["exp_avg_sq"], original[i]["exp_avg_sq"]) for i in original)


def test_our_file_has_the_official_layout(tmp_path):
    model = ModelConfig.from_yaml("tiny").build()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, step=5)
    payload = torch.load(path, weights_only=True)
    assert {"step", "model", "ema", "scaler"} <= payload.keys() and payload["step"] == 5
    network_keys = {f"denoise_fn.{k}" for k in model.state_dict()}
    for part in ("model", "ema"):
        assert payload[part].keys() == network_keys | set(BUFFER_NAMES)
        for name, buffer in CosineSchedule(300).official_buffers().items():
            assert torch.equal(payload[part][name], buffer)
    assert payload["lefusion_meta"]["model_config"] == model.config.to_dict()


def test_official_prefixing_rule_gives_the_official_checkpoint_keys():
    expected = reference_numbers()
    with torch.device("meta"):
        keys = ModelConfig.from_yaml("official").build().state_dict().keys()
    assert {f"denoise_fn.{k}" for k in keys} | set(BUFFER_NAMES) == set(expected["emidec_diffusion_state_dict_shapes"])


def test_official_dataparallel_checkpoint_loads_and_reproduces_the_reference(official_file, reference):
    loaded = load_checkpoint(official_file, channels=2)
    assert loaded.meta is None and loaded.step == 23000 and loaded.num_steps == 300
    assert loaded.config == ModelConfig(**reference["config"])  # inferred from the weight shapes
    for weights in ("model", "ema"):
        model = loaded.build(weights)
        with torch.no_grad():
            out = model(reference["x"], reference["t"], reference["cond"])
        torch.testing.assert_close(out, reference["y"], atol=1e-5, rtol=1e-5)


def test_missing_files_and_non_checkpoints_are_refused(tmp_path):
    with pytest.raises(LeFusionError, match="does not exist"):
        load_checkpoint(tmp_path / "nothing.pt")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(2048))
    with pytest.raises(LeFusionError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(garbage)
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(LeFusionError, match="not a readable PyTorch checkpoint"):
        load_checkpoint(truncated)
    other = tmp_path / "other.pt"
    torch.save([torch.zeros(3)], other)
    with pytest.raises(LeFusionError, match="not a LeFusion checkpoint"):
        load_checkpoint(other)
    unrelated = tmp_path / "unrelated.pt"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "ema": {}}, unrelated)
    with pytest.raises(LeFusionError, match="does not hold a LeFusion Unet3D"):
        load_checkpoint(unrelated)


def test_wrong_networks_are_refused(official_file, tmp_path):
    with pytest.raises(LeFusionError, match="2 image channel\\(s\\), but 1 were requested"):
        load_checkpoint(official_file, channels=1)
    with pytest.raises(LeFusionError, match="does not fit the network"):
        load_checkpoint(official_file, config=ModelConfig.from_yaml("tiny"))
    payload = torch.load(official_file, weights_only=True)
    del payload["model"]["denoise_fn.module.downs.1.3.fn.fn.fn.to_qkv.weight"]
    broken = tmp_path / "broken.pt"
    torch.save(payload, broken)
    with pytest.raises(LeFusionError, match="1 missing keys \\(e.g. downs.1.3.fn.fn.fn.to_qkv.weight\\)"):
        load_checkpoint(broken)


def test_bad_weights_choice_and_metadata_are_refused(official_file, tmp_path):
    with pytest.raises(LeFusionError, match="weights must be one of"):
        load_checkpoint(official_file).build("best")
    model = ModelConfig.from_yaml("tiny").build()
    with pytest.raises(LeFusionError, match="extras.centres is a ndarray"):
        save_checkpoint(tmp_path / "m.pt", model, meta=CheckpointMeta(extras={"centres": np.zeros(3)}))
    assert not list(tmp_path.glob("*m.pt*"))


def test_export_keeps_the_ema_weights_alone_in_float16(tmp_path, capsys):
    torch.manual_seed(0)
    config = ModelConfig.from_yaml("tiny")
    model, ema = config.build(), config.build()
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(1, 2, 2, 8, 8), torch.tensor([3]), torch.rand(1, 32)).mean().backward()
    optimizer.step()
    meta = CheckpointMeta(lesion_labels=[3, 4], roi_size=[2, 8, 8], histogram_clusters=[[0.5] * 32])
    source = tmp_path / "checkpoint_final.pt"
    save_checkpoint(source, model, ema=ema, step=77, meta=meta, optimizer_state={"optimizer": optimizer.state_dict()})

    target = tmp_path / "shipped.pt"
    assert export_main([str(source), str(target)]) == 0
    assert "step 77 in fp16" in capsys.readouterr().out
    assert target.stat().st_size < source.stat().st_size / 4
    raw = torch.load(target, weights_only=True)
    assert {"step", "model", "ema", "scaler", "lefusion_meta"} == set(raw)  # no optimizer state
    assert raw["ema"]["denoise_fn.init_conv.weight"].dtype == torch.float16
    assert raw["ema"]["betas"].dtype == CosineSchedule(300).official_buffers()["betas"].dtype  # schedule unchanged
    shipped = load_checkpoint(target)
    assert shipped.step == 77 and shipped.meta.histogram_clusters == meta.histogram_clusters
    assert shipped.meta.extras["exported_weights"] == "ema"
    expected = {k: v.half().float() if v.is_floating_point() else v for k, v in ema.state_dict().items()}
    assert _states_equal(shipped.build("ema").state_dict(), expected)  # float32 again on load
    assert _states_equal(shipped.build("model").state_dict(), expected)  # the official loader reads "model" too
    x, t, cond = torch.randn(1, 2, 2, 8, 8), torch.tensor([40]), torch.rand(1, 32)
    with torch.no_grad():
        assert torch.allclose(shipped.build()(x, t, cond), ema.eval()(x, t, cond), atol=1e-2)

    capsys.readouterr()
    for argv in ([str(source), str(target)], [str(tmp_path / "missing.pt"), str(tmp_path / "x.pt")]):
        with pytest.raises(SystemExit) as exit_info:
            export_main(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(err) == 1 and "error:" in err[0]
    assert not (tmp_path / "x.pt").exists()
