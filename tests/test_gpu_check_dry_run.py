"""benchmarks/gpu_check.py's CPU dry run: the script the GPU machine runs, exercised here on a tiny model so a
broken step is found before device time is spent. TensorRT rows must be reported as skipped with the reason."""

from __future__ import annotations

import torch


def test_gpu_check_cpu_dry_run_reports_every_backend(tmp_path, capsys):
    from benchmarks.gpu_check import check_model

    rows = check_model("vit_tiny", "cpu", 1, tmp_path, False, ["fp16"])
    torch.set_num_threads(1)
    by_backend = {r["backend"]: r for r in rows}
    assert {"torch fp32 (cpu)", "onnxruntime CPU", "tensorrt fp16"} <= set(by_backend)
    ort = by_backend["onnxruntime CPU"]
    assert ort["max_logit_err"] < 1e-3 and ort["mask_mismatch"] < 1e-3 and ort["end_to_end_ms"] > 0
    skipped = by_backend["tensorrt fp16"]["skipped"]
    assert "CUDA GPU" in skipped or "not installed" in skipped


def test_onnx_export_is_skipped_on_a_gpu_machine_with_nothing_to_run_it(monkeypatch):
    """gpu_check skips the ONNX export on a CUDA machine with neither onnxruntime's CUDA provider nor TensorRT (its
    rows would be CPU timings) and says why; on CPU, or with the CUDA provider, it runs."""
    import builtins

    import onnxruntime

    from benchmarks.gpu_check import onnx_not_needed

    assert onnx_not_needed("cpu") is None
    real_import = builtins.__import__

    def no_tensorrt(name, *args, **kwargs):
        if name == "tensorrt":
            raise ImportError("No module named 'tensorrt'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorrt)
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: ["CPUExecutionProvider"])
    reason = onnx_not_needed("cuda")
    assert reason and "onnxruntime-gpu" in reason and "TensorRT" in reason
    monkeypatch.setattr(onnxruntime, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert onnx_not_needed("cuda") is None


def test_gpu_train_check_recipes_are_valid_training_configs(tmp_path):
    """Every run gpu_train_check asks of the trainer passes the trainer's own config validation (so a renamed
    field fails here, not after minutes of device time)."""
    from benchmarks.gpu_train_check import recipe
    from medico_peft.training import TrainConfig

    for device, precision in (("cpu", "fp32"), ("cuda", "fp32"), ("cuda", "bf16"), ("cuda", "fp16")):
        cfg = TrainConfig.from_dict(recipe(tmp_path / "manifest.json", tmp_path / "run", device, precision, 7, True))
        assert (cfg.train.device, cfg.memory.precision, cfg.train.max_steps) == (device, precision, 7)
        assert cfg.train.val_every_steps == 7


def test_bench_clicks_keeps_every_finished_seed_when_a_later_one_dies(tmp_path, monkeypatch):
    """gpu_check.sh gives bench_clicks only the device time that is left; a run killed in seed 1 must leave a
    results file with seed 0's rows, marked partial (models and evaluation replaced by fakes here)."""
    import pytest

    import medico_peft.adapters
    import medico_peft.models
    from benchmarks import bench_clicks

    rules = [*bench_clicks.RULES, "oracle"]
    monkeypatch.setattr(bench_clicks, "build_shards", lambda task, out, compression=None: tmp_path / "manifest.json")
    answered = {"label_name": "grey_matter", "kind": "negative", "n": 4, "region_share": 0.4, "fixed_raw": 0.05,
                "fixed_kept": 0.04, "broken_raw": 80.0, "broken_kept": 0.0, "gain_raw": 0.0, "gain_kept": 0.001}

    def evaluate_rules(model, manifest, n, chosen, answers=None):
        answers.append([answered])
        return {r: [0.5, 0.6, 0.7, 0.7, 0.8] for r in chosen}

    monkeypatch.setattr(bench_clicks, "evaluate_rules", evaluate_rules)

    def finetune(kind, manifest, out, steps, seed, device="cpu", lr=None):
        if seed == 1:
            raise KeyboardInterrupt("time limit")
        return out / "adapter.safetensors"

    monkeypatch.setattr(bench_clicks, "finetune", finetune)
    monkeypatch.setattr(medico_peft.models, "load_model", lambda name: torch.nn.Linear(1, 1))
    monkeypatch.setattr(medico_peft.adapters, "load_adapter", lambda model, path: model)
    out = tmp_path / "clicks.md"
    with pytest.raises(KeyboardInterrupt):
        bench_clicks.main(["--tasks", "mni152", "--seeds", "0", "1", "--work", str(tmp_path / "work"),
                           "--out", str(out)])
    torch.set_num_threads(1)
    text = out.read_text()
    assert "seeds 0." in text and "**Partial**" in text and "seeds done 0 of 0, 1" in text
    assert text.count("| mni152 | LoRA+click-training |") == len(rules)  # seed 0's rows, all rules
    # how the clicks were answered, per model (fakes: one row each)
    assert "| mni152 LoRA+click-training | grey_matter | negative | 4 | 0.400 | 0.050 | 0.040 | 80 / 0 " \
           "| +0.0000 / +0.0010 |" in text


def test_bench_clicks_variants_change_one_thing_each(tmp_path, monkeypatch):
    """Each finetune kind of bench_clicks differs from the demo's LoRA recipe in exactly the setting it names
    (the fair-ablation claim of its results file): the config handed to the trainer is compared key by key."""
    import medico_peft.training
    from benchmarks import bench_clicks

    seen = {}

    class FakeConfig:
        @staticmethod
        def from_dict(raw):
            return raw

    def fake_train(raw, overwrite=False):
        seen[raw["output"]["dir"]] = raw
        return type("Result", (), {"adapter_path": str(tmp_path / "a.safetensors")})()

    monkeypatch.setattr(medico_peft.training, "TrainConfig", FakeConfig)
    monkeypatch.setattr(medico_peft.training, "train", fake_train)
    for kind in bench_clicks.CHANGES:
        bench_clicks.finetune(kind, tmp_path / "manifest.json", tmp_path / kind, 12, 3)
    bench_clicks.finetune("LoRA", tmp_path / "manifest.json", tmp_path / "LoRA-lr", 12, 3, lr=2e-4)

    def flat(raw):
        return {(section, key): value for section, values in raw.items() for key, value in values.items()
                if not (section == "output" and key == "dir")}

    lora, decoder = flat(seen[str(tmp_path / "LoRA")]), flat(seen[str(tmp_path / "decoder-only")])
    assert {k: v for k, v in flat(seen[str(tmp_path / "LoRA-lr")]).items() if lora.get(k) != v} == {
        ("optim", "lr"): 2e-4}  # --lr changes the learning rate only
    assert (lora[("train", "max_steps")], lora[("train", "seed")]) == (12, 3)
    differ = {k for k in set(lora) | set(decoder) if lora.get(k) != decoder.get(k)}
    assert differ and {section for section, _ in differ} == {"peft"}  # decoder-only vs LoRA: the PEFT method only
    interior = flat(seen[str(tmp_path / "LoRA+interior")])
    clicks = flat(seen[str(tmp_path / "LoRA+click-training")])
    assert {k: v for k, v in interior.items() if lora.get(k) != v} == {("train", "click_sampling"): "interior"}
    decoder_interior = flat(seen[str(tmp_path / "decoder-only+interior")])
    assert {k: v for k, v in decoder_interior.items() if decoder.get(k) != v} == {
        ("train", "click_sampling"): "interior"}
    assert {k: v for k, v in clicks.items() if lora.get(k) != v} == {("train", "click_sampling"): "interior",
                                                                      ("loss", "click_bce"): 1.0}
    bce = flat(seen[str(tmp_path / "LoRA+click-bce")])
    assert {k: v for k, v in bce.items() if lora.get(k) != v} == {("loss", "click_bce"): 1.0}
    eight = flat(seen[str(tmp_path / "LoRA+8-sub-iterations")])
    assert {k: v for k, v in eight.items() if lora.get(k) != v} == {("train", "sub_iterations"): 8}
    center = flat(seen[str(tmp_path / "LoRA+center-clicks")])
    assert {k: v for k, v in center.items() if lora.get(k) != v} == {("train", "click_sampling"): "center"}
    for kind, base in (("LoRA+prompt-encoder", lora), ("decoder-only+prompt-encoder", decoder)):
        pe = flat(seen[str(tmp_path / kind)])
        assert {k: v for k, v in pe.items() if base.get(k) != v} == {("peft", "train_prompt_encoder"): True}
    matched = flat(seen[str(tmp_path / "LoRA+eval-matched")])
    assert {k: v for k, v in matched.items() if lora.get(k) != v} == {
        ("train", "click_sampling"): "center", ("train", "prompt"): "box", ("train", "mask_feed_prob"): 1.0,
        ("train", "sub_iterations"): 4}
    for kind, base in (("LoRA+eval-matched+prompt-encoder", lora),
                       ("decoder-only+eval-matched+prompt-encoder", decoder)):
        both = flat(seen[str(tmp_path / kind)])
        assert {k: v for k, v in both.items() if base.get(k) != v} == {
            ("train", "click_sampling"): "center", ("train", "prompt"): "box", ("train", "mask_feed_prob"): 1.0,
            ("train", "sub_iterations"): 4, ("peft", "train_prompt_encoder"): True}
    recommended = flat(seen[str(tmp_path / "LoRA+eval-matched+prompt-encoder")])
    for kind, change in (("LoRA-all-blocks+eval-matched+prompt-encoder", {("peft", "blocks"): "all"}),
                         ("LoRA-all-linears+eval-matched+prompt-encoder",
                          {("peft", "targets"): ["qkv", "proj", "mlp"]})):
        assert {k: v for k, v in flat(seen[str(tmp_path / kind)]).items() if recommended.get(k) != v} == change
    for kind, base in (("LoRA+eval-matched+prompt-encoder+cosine", recommended),
                       ("decoder-only+eval-matched+prompt-encoder+cosine",
                        flat(seen[str(tmp_path / "decoder-only+eval-matched+prompt-encoder")]))):
        assert {k: v for k, v in flat(seen[str(tmp_path / kind)]).items() if base.get(k) != v} == {
            ("schedule", "kind"): "cosine", ("schedule", "total_steps"): 12}  # the schedule only, over the run
    for kind, base in (("LoRA+eval-matched+prompt-encoder+click-region", recommended),
                       ("decoder-only+eval-matched+prompt-encoder+click-region",
                        flat(seen[str(tmp_path / "decoder-only+eval-matched+prompt-encoder")]))):
        assert {k: v for k, v in flat(seen[str(tmp_path / kind)]).items() if base.get(k) != v} == {
            ("loss", "click_region"): 1.0}  # the click-region loss only
        positive = flat(seen[str(tmp_path / (kind + "-positive"))])
        assert {k: v for k, v in positive.items() if base.get(k) != v} == {
            ("loss", "click_region"): 1.0, ("loss", "click_region_clicks"): "positive"}  # on positive clicks only
    quarter = flat(seen[str(tmp_path / "decoder-only+eval-matched+prompt-encoder+click-region-0.25")])
    assert {k: v for k, v in quarter.items() if flat(seen[str(tmp_path / "decoder-only+eval-matched+prompt-encoder")]
                                                     ).get(k) != v} == {("loss", "click_region"): 0.25}
    # The demo's recipe now is the measured LoRA+eval-matched+prompt-encoder kind, key by key (and its
    # decoder-only baseline the decoder-only control), with the recipe's cosine over the run instead of the
    # constant LR the clicks files were measured with (bench_realdata --schedule cosine measured that).
    from medico_peft.workflows.demo import CONSTANT_SCHEDULE, cosine_schedule, decoder_only_config, \
        demo_peft_config, lora_config

    for kind, peft in (("LoRA+eval-matched+prompt-encoder", demo_peft_config(rank=8, blocks=2)),
                       ("decoder-only+eval-matched+prompt-encoder", decoder_only_config())):
        demo = lora_config(tmp_path / "manifest.json", tmp_path / kind, bench_clicks.LR, peft, progress=False,
                           steps=12)
        demo["train"].update({"seed": 3, "device": "cpu"})
        assert demo["schedule"] == cosine_schedule(12) and demo["train"]["max_steps"] == 12
        measured = flat(seen[str(tmp_path / kind)])
        assert {k: v for k, v in flat(demo).items() if measured.get(k) != v} == {
            ("schedule", "kind"): "cosine", ("schedule", "total_steps"): 12, ("schedule", "min_lr_ratio"): 0.05}, kind
        assert {k[1]: v for k, v in measured.items() if k[0] == "schedule"} == {
            **CONSTANT_SCHEDULE, "min_lr_ratio": 0.0, "total_steps": None}  # what the clicks files measured
