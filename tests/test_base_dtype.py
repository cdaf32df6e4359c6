"""train.base_dtype=bfloat16: frozen encoder Linear/Conv weights in bf16 (no fp32 copy left), trained
weights and norms fp32, a step moves only trained tensors, adapters/merged/exported models stay fp32."""

from __future__ import annotations

import copy
import gc
import math
import weakref

import pytest
import torch
from torch import nn

from _peft_helpers import perturb_trainable
from _training_helpers import TINY, tiny_cfg
from medico_peft.errors import ConfigError
from medico_peft.models import build_model
from medico_peft.tuners import PeftConfig, inject, merge, unload
from medico_peft.tuners.base_dtype import (CAST_TYPES, bytes_by_dtype, cast_frozen_base, frozen_base_dtype,
                                           restore_base_dtype)

NORMS = (nn.LayerNorm, nn.BatchNorm2d, nn.GroupNorm)
# Merging onto the bf16-rounded base vs the fp32 base differs by the base's rounding only: round to nearest
# bf16 (8 significant bits) moves a base value w0 by at most 2^-9·|w0|. Allowed per element:
# 2^-8·|w0| + 1e-7 (the fp32 rounding of the sum w0 + ΔW is far below that).
MERGE_RTOL = 2.0 ** -8
MERGE_ATOL = 1e-7


def _lora(name: str, **peft):
    model = build_model(name, seed=0)
    inject(model, PeftConfig(**(peft or {"method": "lora", "targets": ["q", "v"], "blocks": "all"})))
    return model


def _frozen_castables(model):
    for name, m in model.image_encoder.named_modules():
        own = list(m.parameters(recurse=False))
        if isinstance(m, CAST_TYPES) and own and not any(p.requires_grad for p in own):
            yield name, m


@pytest.mark.parametrize("name", ["vit_tiny", "litemedsam"])
def test_frozen_weights_bf16_trained_and_norms_fp32_and_no_fp32_copy_left(name):
    model = _lora(name)
    castable = dict(_frozen_castables(model))
    old_storages = [weakref.ref(p.untyped_storage()) for m in castable.values() for p in m.parameters(recurse=False)]
    cast_bytes = sum(p.numel() for m in castable.values() for p in m.parameters(recurse=False))
    before = bytes_by_dtype(model)

    names = cast_frozen_base(model, torch.bfloat16)
    gc.collect()

    assert len(names) == len(castable) > 0 and frozen_base_dtype(model) == torch.bfloat16
    for m in castable.values():
        assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in m.parameters(recurse=False))
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for _, p in trained)
    norms = [p for m in model.modules() if isinstance(m, NORMS) for p in [*m.parameters(), *m.buffers()]
             if p.is_floating_point()]
    assert norms and all(p.dtype == torch.float32 for p in norms)
    if name == "litemedsam":
        assert sum(isinstance(m, nn.BatchNorm2d) for m in model.image_encoder.modules()) == 27
    # Parameter + buffer bytes: exactly the cast tensors moved from 4 to 2 bytes per value ...
    after = bytes_by_dtype(model)
    assert after["bfloat16"] == 2 * cast_bytes
    assert after["float32"] == before["float32"] - 4 * cast_bytes
    # ... and no fp32 storage of a cast weight is alive anywhere (not just unreferenced by the model).
    assert all(ref() is None for ref in old_storages)
    # Casting again is a no-op; restoring gives fp32 back without hooks.
    assert cast_frozen_base(model, torch.bfloat16) == []
    assert restore_base_dtype(model) == len(castable)
    assert set(bytes_by_dtype(model)) <= {"float32", "int64"} and frozen_base_dtype(model) == torch.float32
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in castable.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_a_step_moves_only_trained_tensors_in_fp32_and_matches_the_fp32_base(tmp_path, precision):
    from medico_peft.training.trainer import Trainer

    def one_step(base_dtype):
        cfg = tiny_cfg(tmp_path / f"{base_dtype}-{precision}", f"train.base_dtype={base_dtype}",
                       f"memory.precision={precision}")
        trainer = Trainer.from_config(cfg)
        batch = next(iter(trainer.make_loader(trainer.parts.train_ds, trainer.parts.sampler, 2, 0)))
        start = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        metrics = trainer.train_step(batch)
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        trainer.optimizer_step()
        return trainer.model, start, metrics, grads

    model, start, metrics, grads = one_step("bfloat16")
    ref_model, _, ref_metrics, _ = one_step("float32")
    assert math.isfinite(metrics["loss"])
    # Same seed, same batch: the bf16 base changes the first loss by bf16 rounding only.
    assert metrics["loss"] == pytest.approx(ref_metrics["loss"], rel=0.05)
    assert grads and all(g.dtype == torch.float32 for g in grads.values())
    params = dict(model.named_parameters())
    assert set(grads) == {n for n, p in params.items() if p.requires_grad}
    moved = {n for n, p in params.items() if not torch.equal(p.detach().to(start[n].dtype), start[n])}
    assert moved and moved <= {n for n, p in params.items() if p.requires_grad}
    for n, p in params.items():
        if p.requires_grad:
            assert p.dtype == torch.float32, n
        else:
            assert p.dtype == start[n].dtype and torch.equal(p, start[n]), n
    assert any(p.dtype == torch.bfloat16 for p in params.values())
    assert all(p.dtype == torch.float32 for p in ref_model.parameters())


def test_adapter_of_a_bf16_base_run_is_fp32_and_loads_onto_the_fp32_base(tmp_path):
    from safetensors.torch import load_file

    from medico_peft.adapters import load_adapter
    from medico_peft.training import checkpointing as ckpt
    from medico_peft.training import train
    from medico_peft.training.trainer import build_model_for

    over = ("train.epochs=1", "train.max_steps=2")
    bf16 = train(tiny_cfg(tmp_path / "bf16", *over, "train.base_dtype=bfloat16"))
    fp32 = train(tiny_cfg(tmp_path / "fp32", *over))
    got, ref = load_file(str(bf16.adapter_path)), load_file(str(fp32.adapter_path))
    assert sorted(got) == sorted(ref)
    assert all(t.dtype == torch.float32 for t in got.values())
    fresh = build_model_for(tiny_cfg(tmp_path))  # the fp32 base the run started from (same seed)
    assert all(p.dtype == torch.float32 for p in fresh.parameters())
    load_adapter(fresh, bf16.adapter_path)  # checks the base's sha256: the recorded one is the fp32 base's
    trained = ckpt.load_checkpoint(bf16.out_dir / ckpt.LATEST)["trainable"]  # the run's weights at its end
    params = dict(fresh.named_parameters())
    assert len(trained) == len(got)
    for key, value in trained.items():
        assert params[key].dtype == torch.float32 and torch.equal(params[key].detach(), value), key
    assert frozen_base_dtype(fresh) == torch.float32


def test_merged_and_fused_models_are_fp32_and_equal_the_fp32_merge_within_bf16_rounding():
    import medico_peft.export.fuse as fuse_mod

    fp32 = _lora("litemedsam")
    perturb_trainable(fp32)  # non-zero LoRA B: the merge changes the weights
    bf16 = copy.deepcopy(fp32)
    cast_frozen_base(bf16, torch.bfloat16)

    merged = merge(bf16)
    ref = merge(fp32)
    base0 = dict(unload(copy.deepcopy(fp32)).named_parameters())  # the fp32 base weights w0, same keys
    assert frozen_base_dtype(bf16) == torch.bfloat16  # merge worked on a copy
    got, want = dict(merged.named_parameters()), dict(ref.named_parameters())
    assert sorted(got) == sorted(want) == sorted(base0)
    rounded = 0
    for key, w in want.items():
        g = got[key]
        assert g.dtype == torch.float32, key
        err = (g.detach() - w.detach()).abs()
        assert bool((err <= MERGE_RTOL * base0[key].detach().abs() + MERGE_ATOL).all()), (key, err.max().item())
        rounded += bool(err.max() > 0)
    assert rounded > 0  # the bf16 base did change the merged weights (by rounding only)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in merged.modules())

    fused, info = fuse_mod.fuse(bf16)  # what `export onnx|fuse` runs: fp32 result, parity check passed
    assert all(p.dtype == torch.float32 for p in fused.parameters())
    assert info["fuse_max_abs_error"] <= fuse_mod.FUSE_ATOL
    assert frozen_base_dtype(bf16) == torch.bfloat16


def test_bad_base_dtype_is_a_config_error_naming_the_field(tmp_path, capsys):
    from medico_peft.cli import main
    from medico_peft.training import TrainConfig

    with pytest.raises(ConfigError, match=r"train\.base_dtype"):
        TrainConfig.from_yaml(TINY, overrides=["train.base_dtype=float16"])
    assert TrainConfig.from_yaml(TINY, overrides=["train.base_dtype=bfloat16"]).train.base_dtype == "bfloat16"
    assert TrainConfig.from_yaml(TINY).train.base_dtype == "float32"
    with pytest.raises(ConfigError, match=r"train\.base_dtype.*pissa"):
        TrainConfig.from_yaml(TINY, overrides=["train.base_dtype=bfloat16", "peft.init=pissa"])
    rc = main(["train", "--config", str(TINY), f"output.dir={tmp_path / 'run'}", "--base-dtype", "int4"])
    assert rc == 2 and "train.base_dtype" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
