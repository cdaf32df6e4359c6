"""Training config: every recipe validates; bad keys, types and paths give one clear message."""

from __future__ import annotations

import pytest

from _training_helpers import REPO, TINY, tiny_cfg
from medico_peft.errors import ConfigError, DataError
from medico_peft.training import TrainConfig

RECIPES = sorted((REPO / "configs").glob("*.yaml"))


def test_all_required_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"vit_b_lora.yaml", "vit_b_adapter.yaml", "litemedsam_lora.yaml", "litemedsam_adapter.yaml",
            "vit_b_full.yaml", "litemedsam_full.yaml", "tiny_cpu.yaml"} <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_parses_validates_and_round_trips(path):
    cfg = TrainConfig.from_yaml(path)
    assert cfg.peft_config().method == cfg.peft["method"]
    again = TrainConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    size = {"vit_b": 1024, "litemedsam": None, "vit_tiny": None}[cfg.model.name]
    assert cfg.model.img_size == size


@pytest.mark.parametrize("name", ["litemedsam_lora.yaml", "litemedsam_adapter.yaml", "litemedsam_full.yaml"])
def test_litemedsam_recipes_click_train_as_measured(name):
    """The LiteMedSAM recipes carry the click training the benchmark measured (the demo's `CLICK_TRAINING`)
    and train the prompt encoder's mask pathway (`full` trains it anyway)."""
    from medico_peft.workflows.demo import CLICK_TRAINING

    cfg = TrainConfig.from_yaml(REPO / "configs" / name)
    assert {key: getattr(cfg.train, key) for key in CLICK_TRAINING} == CLICK_TRAINING
    peft = cfg.peft_config()
    assert peft.method == "full" or peft.train_prompt_encoder


def test_litemedsam_lora_recipe_is_the_one_the_real_data_benchmark_measured(tmp_path):
    """configs/litemedsam_lora.yaml is the demo's recipe (workflows/demo.py `lora_config`, which bench_realdata
    trains with `--steps 160 --schedule cosine`) key by key; only where the run reads and writes and how it
    loads data (workers, cache size) may differ."""
    from medico_peft.workflows.demo import RECIPE_STEPS, demo_peft_config, lora_config

    config = TrainConfig.from_yaml(REPO / "configs" / "litemedsam_lora.yaml")
    measured = TrainConfig.from_dict(lora_config(config.data.manifest, tmp_path / "run", 5e-4,
                                                 demo_peft_config(rank=8, blocks=2), progress=True,
                                                 steps=RECIPE_STEPS))
    assert config.peft_config() == measured.peft_config()
    ours, recipe = config.to_dict(), measured.to_dict()
    free = {("data", "num_workers"), ("train", "device"), ("memory", "cache_max_gb")}
    differ = {(section, key) for section in recipe if section not in ("peft", "output") for key in recipe[section]
              if (section, key) not in free and ours[section][key] != recipe[section][key]}
    assert not differ, {k: (ours[k[0]][k[1]], recipe[k[0]][k[1]]) for k in differ}
    # and the clock-ended variant its comment gives validates as a time-spanned cosine
    timed = TrainConfig.from_yaml(REPO / "configs" / "litemedsam_lora.yaml", overrides=[
        "train.max_minutes=30", "train.max_steps=null", "schedule.span=time", "schedule.total_steps=null"])
    assert (timed.schedule.span, timed.train.max_steps, timed.train.max_minutes) == ("time", None, 30)


def test_overrides_apply_with_yaml_values():
    cfg = TrainConfig.from_yaml(TINY, overrides=["optim.lr=3e-4", "train.epochs=7", "memory.checkpointing=true",
                                                 "optim.betas=[0.8, 0.9]", "peft.rank=2"])
    assert cfg.optim.lr == 3e-4 and cfg.train.epochs == 7 and cfg.memory.checkpointing is True
    assert cfg.optim.betas == [0.8, 0.9] and cfg.peft_config().rank == 2


@pytest.mark.parametrize("override,message", [
    ("optim.lr=abc", r"optim\.lr: expected a float, got 'abc'"),
    ("train.epochs=2.5", r"train\.epochs: expected an int, got 2\.5"),
    ("train.epochz=3", r"train\.epochz: unknown key; valid keys: epochs"),
    ("trian.epochs=3", r"trian: unknown section; valid sections: model"),
    ("memory.precision=fp8", r"memory\.precision: expected one of fp32, bf16, fp16, got 'fp8'"),
    ("memory.checkpointing=maybe", r"memory\.checkpointing: expected a bool"),
    ("peft.rnak=4", r"peft\.rnak: unknown key; valid keys: activation"),
    ("peft.method=prompt_tuning", r"peft\.method: unknown method 'prompt_tuning'"),
    ("train.mask_feed_prob=1.5", r"train\.mask_feed_prob: expected a float in \[0, 1\]"),
    ("lr=1", r"expected section\.key=value"),
    ("loss.click_region_clicks=all", r"loss\.click_region_clicks: expected one of both, positive, negative"),
    ("loss.click_region_clicks=positive", r"loss\.click_region_clicks: 'positive' chooses the clicks "
                                          r"loss\.click_region scores, but loss\.click_region is 0"),
])
def test_bad_override_names_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_yaml(TINY, overrides=[override])


def test_bad_file_names_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name: vit_tiny\noptim:\n  lr: [1]\ndata:\n  synthetic: 4\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: optim\.lr: expected a float, got \[1\]"):
        TrainConfig.from_yaml(bad)
    with pytest.raises(ConfigError, match=r"missing\.yaml: config file not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    bad.write_text("model: {name: vit_tiny\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        TrainConfig.from_yaml(bad)


def test_data_source_required_and_missing_manifest(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.manifest: required"):
        TrainConfig.from_dict({"model": {"name": "vit_tiny"}})
    from medico_peft.training.data_source import build_datasets

    for where in (tmp_path / "nowhere" / "manifest.json", tmp_path):  # missing file; folder without manifest
        cfg = tiny_cfg(tmp_path / "run", "data.synthetic=0", f"data.manifest={where}")
        with pytest.raises(DataError, match=r"data\.manifest: .*manifest\.json not found"):
            build_datasets(cfg, 128)


def test_cli_reports_config_error_in_one_line(capsys):
    from medico_peft.cli import main

    assert main(["train", "--config", str(TINY), "optim.lr=abc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "optim.lr: expected a float, got 'abc'" in err
