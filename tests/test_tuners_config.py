"""PeftConfig validation: every bad value names its field and the valid choices."""

from __future__ import annotations

import pytest

from medico_peft.errors import ConfigError
from medico_peft.tuners import PeftConfig


def test_defaults_and_round_trip():
    cfg = PeftConfig(method="dora", rank=4, targets=["q", "v", "q"], blocks=[3, 1])
    assert cfg.targets == ("q", "v") and cfg.blocks == (1, 3)
    data = cfg.to_dict()
    assert data["targets"] == ["q", "v"] and data["blocks"] == [1, 3]
    assert PeftConfig.from_dict(data) == cfg
    assert PeftConfig().to_dict()["method"] == "lora" and PeftConfig().alpha == 8.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="ia3"), r"method: unknown method 'ia3'; valid methods: lora, dora, adapter, decoder_only, full"),
    (dict(rank=0), r"rank: must be a positive integer, got 0"),
    (dict(rank=-2), r"rank: must be a positive integer"),
    (dict(rank=True), r"rank: must be a positive integer"),
    (dict(alpha=0), r"alpha: must be a positive number"),
    (dict(dropout=1.0), r"dropout: must be a number in \[0, 1\)"),
    (dict(targets=["q", "out"]), r"targets: unknown target 'out'; valid targets: q, k, v, qkv, proj, mlp"),
    (dict(targets=[]), r"targets: must be a non-empty list"),
    (dict(targets=["qkv", "v"]), r"targets: 'qkv' .* cannot be combined"),
    (dict(blocks=0), r"blocks: the number of last blocks must be positive"),
    (dict(blocks=[-1]), r"blocks: block indices must be >= 0"),
    (dict(blocks="some"), r"blocks: expected 'all'"),
    (dict(adapter_kind="lateral"), r"adapter_kind: unknown kind 'lateral'; valid kinds: parallel, sequential"),
    (dict(activation="tanh"), r"activation: unknown activation 'tanh'; valid: relu, gelu"),
    (dict(bottleneck=0), r"bottleneck: must be a positive integer"),
    (dict(use_rslora="yes"), r"use_rslora: must be true or false"),
    (dict(method="decoder_only", train_decoder=False), r"train_decoder: method 'decoder_only' .* trains nothing"),
])
def test_bad_values_name_the_field(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        PeftConfig(**kwargs)


def test_from_dict_refuses_unknown_keys():
    with pytest.raises(ConfigError, match=r"peft config: unknown key 'lora_rank'; valid keys: .*rank"):
        PeftConfig.from_dict({"method": "lora", "lora_rank": 4})
    with pytest.raises(ConfigError, match="expected a mapping"):
        PeftConfig.from_dict(["lora"])
