"""`medico-peft info` and `medico-peft adapter inspect|merge`, including one-line errors (exit 2)."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from _peft_helpers import base, logits, perturb_trainable
from medico_peft.adapters import save_adapter
from medico_peft.cli import main
from medico_peft.tuners import PeftConfig, inject


def test_info_defaults_to_real_litemedsam(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "litemedsam (tinyvit), input 256x256" in out
    assert "total                9,791,300     9,791,300  100.00%" in out


def test_info_with_method_json(capsys):
    assert main(["info", "--model", "vit_tiny", "--method", "lora", "--rank", "4", "--freeze-decoder", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["peft_config"]["rank"] == 4 and data["peft_config"]["alpha"] == 4.0
    total = data["report"][-1]
    assert total["submodule"] == "total" and total["trainable"] == 4 * 2 * (4 * 64 + 64 * 4)


def test_info_bad_input_is_one_line_exit_2(capsys):
    assert main(["info", "--model", "vit_tiny", "--method", "lora", "--targets", "q,out"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: targets: unknown target 'out'; valid targets: q, k, v, qkv, proj, mlp"
    assert main(["info", "--model", "vit_tiny", "--method", "lora", "--rank", "0"]) == 2
    assert "rank: must be a positive integer, got 0" in capsys.readouterr().err


def test_adapter_inspect_and_merge(tmp_path, capsys):
    model = inject(base("vit_tiny"), PeftConfig(rank=4, targets=["q", "v"]))
    perturb_trainable(model)
    path = save_adapter(model, tmp_path / "task.safetensors")
    assert main(["adapter", "inspect", str(path)]) == 0
    assert "method" in capsys.readouterr().out
    out = tmp_path / "merged.safetensors"
    assert main(["adapter", "merge", "--adapter", str(path), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    diff = float(text.split("random image: ")[1].split()[0])
    assert diff <= 1e-4 and out.is_file()
    from medico_peft.models import load_model

    merged = load_model(checkpoint=out)
    torch.testing.assert_close(logits(merged), logits(model), atol=1e-4, rtol=0)


def test_adapter_merge_refuses_bottleneck_and_writes_nothing(tmp_path, capsys):
    model = inject(base("vit_tiny"), PeftConfig(method="adapter"))
    path = save_adapter(model, tmp_path / "ad.safetensors")
    out = tmp_path / "merged.pth"
    assert main(["adapter", "merge", "--adapter", str(path), "--out", str(out)]) == 2
    assert "cannot be merged" in capsys.readouterr().err and not out.exists()
    assert main(["adapter", "merge", "--adapter", str(path), "--out", str(tmp_path / "m.bin")]) == 2
    assert "--out" in capsys.readouterr().err


def test_help_does_not_import_peft_or_torch():
    code = "import sys; from medico_peft.cli import build_parser; build_parser(); " \
           "print('peft' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "False"
