"""AdapterBank: several adapters on one base; switching back gives the first adapter's outputs exactly."""

from __future__ import annotations

import pytest
import torch

from _peft_helpers import base, logits, perturb_trainable
from medico_peft.adapters import AdapterBank, save_adapter
from medico_peft.errors import AdapterError
from medico_peft.tuners import PeftConfig, inject


@pytest.mark.slow
def test_switching_between_adapters_is_exact(tmp_path):
    plain = logits(base("litemedsam"))
    files, expected = {}, {}
    cases = {"liver": (dict(rank=4), 1), "kidney": (dict(rank=4), 2),           # same structure: tensor swap
             "brain": (dict(method="adapter", train_decoder=False), 3)}          # other structure: re-inject
    for name, (cfg, seed) in cases.items():
        model = inject(base("litemedsam"), PeftConfig(**cfg))
        perturb_trainable(model, seed=seed)
        expected[name] = logits(model)
        files[name] = save_adapter(model, tmp_path / f"{name}.safetensors")
    bank = AdapterBank(base("litemedsam"))
    for name, path in files.items():
        bank.add(name, path)
    assert bank.names == ["liver", "kidney", "brain"]
    for name in ["liver", "kidney", "liver", "brain", "kidney", "liver"]:
        out = logits(bank.activate(name))
        assert bank.active == name
        assert torch.equal(out, expected[name]), name
    assert not torch.equal(expected["liver"], expected["kidney"])
    torch.testing.assert_close(logits(bank.deactivate()), plain, atol=0, rtol=0)
    with pytest.raises(AdapterError, match="no adapter named 'lung'; loaded: liver, kidney, brain"):
        bank.activate("lung")
    with pytest.raises(AdapterError, match="already in the bank"):
        bank.add("liver", files["liver"])
