"""Semantic training (task: semantic): loss goes down, exact resume, adapter round trip, bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from _training_helpers import REPO, assert_same_metrics, assert_same_tensors
from medico_peft.errors import AdapterError, ConfigError, DataError
from medico_peft.training import TrainConfig, train
from medico_peft.training import checkpointing as ckpt

TINY = REPO / "configs" / "tiny_semantic_cpu.yaml"


def cfg_for(out_dir, *overrides):
    return TrainConfig.from_yaml(TINY, overrides=[f"output.dir={out_dir}", "output.progress=false", *overrides])


def _base():
    from medico_peft.training.trainer import build_model_for

    return build_model_for(cfg_for("unused"))  # the recipe's random base: same seed, same weights, same sha256


def test_a_few_steps_lower_the_loss_and_write_a_semantic_adapter(tmp_path):
    result = train(cfg_for(tmp_path, "train.epochs=4", "optim.lr=3e-3"))
    losses = [row["train_loss"] for row in result.history]
    assert losses[-1] < losses[0] - 0.05, losses
    assert result.adapter_path.name == "adapter.safetensors"
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val_dice", "val_dice_1_object_1", "val_dice_3_object_3"} <= set(header)
    from medico_peft.adapters import inspect_adapter

    info = inspect_adapter(result.adapter_path)
    assert info["task"] == "semantic" and info["classes"] == ["background", "object_1", "object_2", "object_3"]
    assert info["head"] == "unetr" and info["format_version"] == 2
    assert set(info["parameters_by_submodule"]) == {"head", "image_encoder"}  # LoRA + head, no SAM decoder


def test_resume_equals_uninterrupted(tmp_path):
    """A run paused after 3 steps (max_steps, mid-epoch) and resumed ends with the same weights and metrics."""
    full = train(cfg_for(tmp_path / "full", "train.epochs=2"))
    cut = tmp_path / "cut"
    train(cfg_for(cut, "train.epochs=2", "train.max_steps=3"))
    assert ckpt.load_checkpoint(cut / ckpt.LATEST)["global_step"] == 3
    resumed = train(cfg_for(cut, "train.epochs=2"), resume=True)
    assert resumed.resumed_from_step == 3
    assert_same_metrics(cut / "metrics.csv", tmp_path / "full" / "metrics.csv")
    assert_same_tensors(ckpt.load_checkpoint(cut / ckpt.LATEST)["trainable"],
                        ckpt.load_checkpoint(tmp_path / "full" / ckpt.LATEST)["trainable"], "resumed vs uninterrupted")
    assert resumed.best_val_dice == pytest.approx(full.best_val_dice, abs=1e-9)


@pytest.mark.parametrize("head,method", [("unetr", "lora"), ("samed", "adapter")])
def test_adapter_round_trip_gives_identical_logits(tmp_path, head, method):
    from medico_peft.adapters import load_semantic_adapter
    from medico_peft.training.semantic import SemanticTrainer

    overrides = [f"semantic.head={head}", f"peft.method={method}", "train.epochs=1"]
    if head == "samed":
        overrides.append("semantic.channels=null")
    cfg = cfg_for(tmp_path, *overrides)
    with SemanticTrainer.from_config(cfg) as trainer:
        result = trainer.fit()
        trained = trainer.model.eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        want = trained(x)
        loaded = load_semantic_adapter(_base(), result.adapter_path,
                                       class_names=["background", "object_1", "object_2", "object_3"]).eval()
        got = loaded(x)
    assert loaded.kind == head and loaded.class_names == trained.class_names
    torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """A semantic adapter and an interactive adapter on the same tiny base."""
    from medico_peft.adapters import save_adapter
    from medico_peft.tuners import inject

    root = tmp_path_factory.mktemp("adapters")
    semantic = train(cfg_for(root / "sem", "train.epochs=1", "data.synthetic=4")).adapter_path
    interactive = save_adapter(inject(_base(), {"method": "lora", "rank": 4}), root / "interactive.safetensors")
    return semantic, interactive


def test_semantic_and_interactive_adapters_refuse_the_other_task(adapters):
    from medico_peft.adapters import AdapterBank, load_adapter, load_semantic_adapter
    from medico_peft.tuners import is_injected

    semantic, interactive = adapters
    base = _base()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    with pytest.raises(AdapterError, match="a semantic adapter .* cannot be used for interactive"):
        load_adapter(base, semantic)
    with pytest.raises(AdapterError, match="a semantic adapter"):
        AdapterBank(base).add("s", semantic)
    with pytest.raises(AdapterError, match="an interactive adapter .* cannot be used for semantic"):
        load_semantic_adapter(base, interactive)
    assert not is_injected(base)
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())


def test_head_applied_with_another_class_table_is_refused(adapters):
    from medico_peft.adapters import load_semantic_adapter
    from medico_peft.tuners import is_injected

    semantic, _ = adapters
    base = _base()
    with pytest.raises(AdapterError, match=r"predicts 4 classes .* has 3"):
        load_semantic_adapter(base, semantic, class_names=["background", "object_1", "object_2"])
    with pytest.raises(AdapterError, match="class 2 is 'object_2' in the head but 'liver'"):
        load_semantic_adapter(base, semantic, class_names=["background", "object_1", "liver", "object_3"])
    assert not is_injected(base)


def test_adapter_inspect_cli_shows_the_classes(adapters, capsys):
    from medico_peft.cli import main

    assert main(["adapter", "inspect", str(adapters[0])]) == 0
    out = capsys.readouterr().out
    assert "task" in out and "semantic" in out and "['background', 'object_1', 'object_2', 'object_3']" in out


def test_class_list_matching_no_label_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="semantic.classes: 'Liver\\*' matches no label of synthetic data"):
        train(cfg_for(out, "semantic.classes=[object_1, Liver*]"))
    with pytest.raises(ConfigError, match="semantic.classes: 9 matches no label of synthetic data"):
        train(cfg_for(out, "semantic.classes=[9]"))
    assert not out.exists()


def _shards(tmp_path, label_names: dict | None):
    from medico_peft.data.convert import convert
    from test_data_synthetic import make_volume

    tmp_path.mkdir(parents=True, exist_ok=True)
    image, label = make_volume((30, 30, 10))
    np.save(tmp_path / "v.npy", image)
    np.save(tmp_path / "v_seg.npy", label)
    report = convert([(tmp_path / "v.npy", tmp_path / "v_seg.npy")], tmp_path / "shards", size=128, split="train",
                     progress=False)
    manifest = Path(report.manifest_path)
    if label_names is not None:
        data = json.loads(manifest.read_text())
        data["label_names"] = label_names
        manifest.write_text(json.dumps(data))
    return manifest


def test_shards_train_with_selected_merged_renamed_classes(tmp_path):
    """Classes from a real manifest's label table: select by glob, merge, rename; one epoch trains."""
    from medico_peft.data.classes import class_table
    from medico_peft.data.manifest import load_manifest

    manifest = _shards(tmp_path, None)
    ids = sorted(load_manifest(manifest).label_names)
    assert len(ids) >= 2
    names = {i: f"organ_{i}" for i in ids}
    manifest = _shards(tmp_path / "named", {str(i): n for i, n in names.items()})
    table = class_table(names, keep=None, merge={"both": [f"organ_{ids[0]}", f"organ_{ids[1]}"]},
                        rename={})
    assert table.names[1] == "both" and table.source_ids[1] == (ids[0], ids[1])
    result = train(cfg_for(tmp_path / "run", "data.synthetic=0", f"data.manifest={manifest}", "data.val_split=train",
                           "data.max_val_samples=2", "train.epochs=1", "semantic.classes=[organ_*]",
                           f"semantic.rename={{{ids[0]}: first}}"))
    from medico_peft.adapters import inspect_adapter

    assert inspect_adapter(result.adapter_path)["classes"] == ["background", "first"] + [names[i] for i in ids[1:]]


def test_manifest_without_label_table_is_refused(tmp_path):
    manifest = _shards(tmp_path, {})
    out = tmp_path / "run"
    with pytest.raises(DataError, match="the manifest has no label table"):
        train(cfg_for(out, "data.synthetic=0", f"data.manifest={manifest}"))
    assert not out.exists()


def test_class_table_rules():
    from medico_peft.data.classes import class_table

    names = {1: "Caudate_L", 2: "Caudate_R", 5: "Cerebelum_3_L", 6: "Cerebelum_4_5_L", 7: "Cerebelum_3_R"}
    t = class_table(names, keep=["Caudate*"], merge={"Cerebellum_L": ["Cerebelum_*_L"]}, rename={2: "CaudR"})
    assert t.names == ("background", "Caudate_L", "CaudR", "Cerebellum_L")
    assert t.source_ids == ((), (1,), (2,), (5, 6))
    assert t.apply(np.array([0, 1, 2, 5, 6, 7, 99])).tolist() == [0, 1, 2, 3, 3, 0, 0]
    with pytest.raises(ConfigError, match=r"semantic.merge\['X'\]: 'Nope\*' matches no label"):
        class_table(names, merge={"X": ["Nope*"]})
    with pytest.raises(ConfigError, match="semantic.rename: id 7 is not a selected class"):
        class_table(names, keep=["Caudate*"], rename={7: "x"})
    with pytest.raises(ConfigError, match="class name 'Caudate_R' is used by several classes"):
        class_table(names, keep=["Caudate*"], rename={1: "Caudate_R"})


def test_semantic_config_is_validated_with_field_names():
    with pytest.raises(ConfigError, match="semantic.head: expected one of unetr, samed, got 'fcn'"):
        TrainConfig.from_dict({"task": "semantic", "data": {"synthetic": 4}, "semantic": {"head": "fcn"}})
    with pytest.raises(ConfigError, match="semantic: this section needs 'task: semantic'"):
        TrainConfig.from_dict({"data": {"synthetic": 4}, "semantic": {"head": "unetr"}})
    with pytest.raises(ConfigError, match="task: expected one of interactive, semantic"):
        TrainConfig.from_dict({"task": "semantics", "data": {"synthetic": 4}})
    with pytest.raises(ConfigError, match="semantic.class_weights: 2 weights for 4 classes"):
        train(cfg_for("/nonexistent/never", "semantic.class_weights=[1, 2]"))


def test_recipes_validate():
    for name in ("litemedsam_semantic_lora.yaml", "vit_b_semantic_lora.yaml"):
        cfg = TrainConfig.from_yaml(REPO / "configs" / name)
        assert cfg.task == "semantic" and cfg.peft_config().method == "lora"


def _semantic_ddp_worker(rank: int, world: int, port: int, out_dir: str, report_dir: str) -> None:
    import hashlib
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    seen = []

    def record(event, run):
        if event == "batch":
            h = hashlib.sha256()
            for name, p in sorted(run.model.named_parameters()):
                if p.requires_grad:
                    h.update(p.detach().contiguous().numpy().tobytes())
            seen.append(h.hexdigest())

    result = train(cfg_for(out_dir, "train.epochs=1", "data.synthetic=8"), callbacks=[record])
    with open(os.path.join(report_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write("\n".join(seen) + "\n" + "|".join(f"{s['loss']:.8f}" for s in result.steps))


@pytest.mark.slow
def test_semantic_ddp_two_processes_keep_replicas_identical(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    mp.spawn(_semantic_ddp_worker, args=(2, port, str(out), str(reports)), nprocs=2, join=True)
    r0 = (reports / "rank0.txt").read_text().splitlines()
    r1 = (reports / "rank1.txt").read_text().splitlines()
    assert len(r0) == 3 and r0[:-1] == r1[:-1] and r0[0] != r0[1]  # same head+LoRA on both ranks, and it trained
    assert r0[-1] != r1[-1]  # each rank its own samples
    assert (out / "adapter.safetensors").is_file()
    assert ckpt.load_checkpoint(out / "latest.pt")["world_size"] == 2
