"""Process-level faults: kill -9 (mid-step, mid-checkpoint) then --resume, compared with an uninterrupted run;
2-process DDP on CPU (replicas, the `no_sync` accumulation path, resume)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from _training_helpers import REPO, TINY, assert_same_metrics, assert_same_tensors, tiny_cfg
from medico_peft.training import checkpointing as ckpt


def _cli(out_dir, *extra):
    return [sys.executable, "-m", "medico_peft.cli", "train", "--config", str(TINY), f"output.dir={out_dir}",
            "output.progress=false", "train.epochs=3", "output.checkpoint_every_steps=2", *extra]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **extra)
    return env


def _wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


@pytest.mark.slow
def test_sigkill_during_checkpoint_write_then_resume(tmp_path):
    out = tmp_path / "run"
    tmp_files = lambda: list(out.glob(".latest.pt.*.tmp"))  # noqa: E731
    proc = subprocess.Popen(_cli(out), env=_env(**{ckpt.SAVE_DELAY_ENV: "2"}), cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        # Let the first checkpoint (step 2) land, then kill while the next one is half-way through its write.
        assert _wait_for(lambda: (out / "latest.pt").exists(), proc), proc.stderr.read().decode()[-2000:]
        assert _wait_for(lambda: bool(tmp_files()), proc), "second checkpoint never started"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert tmp_files()  # killed mid-write: only the temporary file is partial ...
    state = ckpt.load_checkpoint(out / "latest.pt")  # ... the final name still holds a complete checkpoint
    assert state["global_step"] == 2  # nothing lost beyond one checkpoint interval

    done = subprocess.run(_cli(out, "--resume"), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = ckpt.load_checkpoint(out / "latest.pt")
    assert final["global_step"] == 12 and final["epoch"] == 3 and len(final["history"]) == 3
    assert [row["epoch"] for row in final["history"]] == [0, 1, 2]
    assert (out / "adapter.safetensors").is_file() and not tmp_files()


# --- kill, resume, compare ---------------------------------------------------------------------------
# The default feature-cache dtype (float16, tiny_cpu.yaml says float32), a checkpoint every 3 of the 4
# steps per epoch (so checkpoints land mid-epoch and at epoch ends), 3 epochs = 12 steps.
KILL_RECIPE = ("train.epochs=3", "memory.cache_dtype=float16", "output.checkpoint_every_steps=3")


def _recipe_cli(out_dir, *extra):
    return [sys.executable, "-m", "medico_peft.cli", "train", "--config", str(TINY), f"output.dir={out_dir}",
            "output.progress=false", *KILL_RECIPE, *extra]


def _step_of(path) -> int:
    try:
        return ckpt.load_checkpoint(path)["global_step"]
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def _kill_when(out, condition, *extra, delay: float = 0.0, what: str) -> None:
    """Start `train` (with `extra` args) in `out`, SIGKILL it as soon as `condition()` holds."""
    env = _env(**{ckpt.SAVE_DELAY_ENV: str(delay)}) if delay else _env()
    proc = subprocess.Popen(_recipe_cli(out, *extra), env=env, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        reached = _wait_for(condition, proc)
        if reached:
            proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()[-2000:]
    proc.stderr.close()
    assert reached, f"{what}: never reached (exit {proc.returncode}) {err}"
    assert proc.returncode == -signal.SIGKILL, f"{what}: the run ended by itself before the kill"


@pytest.mark.slow
def test_three_kills_then_resume_equal_an_uninterrupted_run(tmp_path):
    """SIGKILL a real `medico_peft.cli train` three times (during the first best.pt write, between
    checkpoints, during a latest.pt write), `--resume` each time: metrics.csv (every non-measured column)
    and the adapter tensors equal the uninterrupted run's."""
    ref, out = tmp_path / "straight", tmp_path / "killed"
    done = subprocess.run(_recipe_cli(ref), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]

    tmp = lambda name: list(out.glob(f".{name}.*.tmp"))  # noqa: E731
    # 1. while the first best.pt is being written (end of epoch 0): no best.pt exists yet.
    _kill_when(out, lambda: bool(tmp("best.pt")), delay=1.0, what="first best.pt write")
    assert not (out / "best.pt").exists() and (out / "latest.pt").exists()
    # 2. between checkpoints, part-way through epoch 1: the steps since the last checkpoint are lost. The 1 s
    # write delay holds latest.pt at step 6 for at least a second after step 6, so a poll slowed by a busy
    # machine still kills before step 8's checkpoint lands (without it, a late kill left leg 3 too few writes).
    _kill_when(out, lambda: _step_of(out / "latest.pt") >= 6, "--resume", delay=1.0, what="step 6 checkpoint")
    start = _step_of(out / "latest.pt")
    assert start in (6, 8), f"leg 2 was killed at step {start}, not after step 6's checkpoint"
    # 3. while a latest.pt is being written, after the resumed run saved at least one checkpoint: the
    # condition is on what is on disk (latest.pt past `start`, another write under way), which a slow poll
    # cannot skip past; the run still has writes at steps 9 and 12 after its first.
    _kill_when(out, lambda: bool(tmp("latest.pt")) and _step_of(out / "latest.pt") > start, "--resume",
               delay=1.0, what=f"a latest.pt write after the resumed run's first (from step {start})")
    assert _step_of(out / "latest.pt") > start  # the killed legs did make progress
    # 4. the rest, to the end.
    done = subprocess.run(_recipe_cli(out, "--resume"), env=_env(), cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not list(out.glob(".*.pt.*.tmp"))

    assert assert_same_metrics(out / "metrics.csv", ref / "metrics.csv") >= 3 * 6
    from safetensors.torch import load_file

    assert_same_tensors(load_file(out / "adapter.safetensors"), load_file(ref / "adapter.safetensors"), "adapter")
    a, b = ckpt.load_checkpoint(out / "latest.pt"), ckpt.load_checkpoint(ref / "latest.pt")
    assert a["global_step"] == b["global_step"] == 12
    assert_same_tensors(a["trainable"], b["trainable"], "final trainable weights")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out_dir: str, report_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from medico_peft.training import train
    from medico_peft.tuners import trainable_state_dict

    digests = []

    def record(event, run):
        if event == "batch":
            state = trainable_state_dict(run.model)
            h = hashlib.sha256()
            for name in sorted(state):
                h.update(state[name].detach().contiguous().numpy().tobytes())
            digests.append(h.hexdigest())

    result = train(tiny_cfg(out_dir, "train.epochs=1", "data.synthetic=8"), callbacks=[record])
    losses = [s["loss"] for s in result.steps]
    with open(os.path.join(report_dir, f"rank{rank}.txt"), "w") as fh:
        fh.write("\n".join(digests) + "\n" + "|".join(f"{v:.8f}" for v in losses))


@pytest.mark.slow
def test_ddp_two_processes_gloo_keep_replicas_identical(tmp_path):
    import torch.multiprocessing as mp

    out, reports = tmp_path / "run", tmp_path / "reports"
    reports.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out), str(reports)), nprocs=2, join=True)
    r0 = (reports / "rank0.txt").read_text().splitlines()
    r1 = (reports / "rank1.txt").read_text().splitlines()
    assert len(r0) == 3  # 8 samples / 2 ranks / batch 2 = 2 steps: digests before each, then losses
    assert r0[:-1] == r1[:-1]  # parameters identical on both replicas before every step
    assert r0[0] != r0[1]  # ... and they did change
    assert r0[-1] != r1[-1]  # the ranks saw different samples (DistributedSampler)
    assert (out / "adapter.safetensors").is_file() and (out / "latest.pt").is_file()
    assert ckpt.load_checkpoint(out / "latest.pt")["world_size"] == 2


# --- DDP: grad accumulation (no_sync) and resume --------------------------------------------------------
# Gradient check recipe: one image per micro-batch, box prompts only and no corrective clicks, so no
# sample's loss depends on which process (click generator) or micro-step (point/box alternation) ran it.
GRAD_RECIPE = ("data.synthetic=8", "train.epochs=1", "train.batch_size=1", "train.prompt=box",
               "train.sub_iterations=0")
# Resume recipe: the full interactive step (clicks, mask feeding, point/box), float16 feature cache,
# 2 ranks x 2 micro-batches of 1 image per step, 2 steps per epoch, 3 epochs.
DDP_RESUME = ("data.synthetic=8", "train.epochs=3", "train.batch_size=1", "train.grad_accum=2",
              "memory.cache_dtype=float16", "output.checkpoint_every_steps=1")


def _grad_recorder():
    """A Trainer that records the (synchronised) gradient of every optimiser step and then drops it, so the
    weights never change and every step's gradient is taken at the same weights in any run."""
    from medico_peft.training import Trainer

    class GradRecorder(Trainer):
        grads: list

        def optimizer_step(self):
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            self.grads.append({n: (torch.zeros_like(p) if p.grad is None else p.grad.detach().clone())
                               for n, p in named})
            for _, p in named:
                p.grad = None  # AdamW skips parameters without a gradient: no update, no weight decay
            super().optimizer_step()

    return GradRecorder


def _digest(state: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(state[name].detach().contiguous().numpy().tobytes())
    return h.hexdigest()


def _ddp_accum_worker(rank: int, world: int, port: int, root: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)  # one group for all runs below
    from medico_peft.training import train
    from medico_peft.tuners import trainable_state_dict

    report = {}
    # 1. no_sync: synchronised gradient of each step with grad_accum=2.
    recorder = _grad_recorder()
    with recorder.from_config(tiny_cfg(os.path.join(root, "grad"), *GRAD_RECIPE, "train.grad_accum=2")) as t:
        t.grads = []
        result = t.fit()
    report["grads"] = t.grads
    report["grad_losses"] = [s["loss"] for s in result.steps]

    # 2. resume: uninterrupted, then stopped after 3 steps (mid-epoch 1) and resumed.
    def digests(into):
        def callback(event, state):
            if event == "step":
                into.append(_digest(trainable_state_dict(state.model)))
        return callback

    for key, out, extra, resume in (("straight", "straight", (), False), ("first", "resumed", ("train.max_steps=3",), False),
                                    ("second", "resumed", (), True)):
        seen: list = []
        result = train(tiny_cfg(os.path.join(root, out), *DDP_RESUME, *extra), resume=resume, callbacks=[digests(seen)])
        report[key] = {"digests": seen, "losses": [s["loss"] for s in result.steps]}
    torch.save(report, os.path.join(root, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_grad_accum_no_sync_and_resume(tmp_path):
    """2-process gloo DDP with train.grad_accum=2 (the first micro-batch of each step runs under `no_sync`).

    Gradients: the synchronised gradient of every step equals a single-process run with the same global
    batch (1 image x 2 micro-batches x 2 ranks == 1 image x 4 micro-batches) up to float re-association (DDP
    sums (a+c)/4 + (b+d)/4, one process ((a+b)+c)+d over 4: bitwise equality cannot hold, so the tolerance is
    1e-6 relative to the gradient's scale), and it is bitwise identical on both ranks. A `no_sync` that lost
    or double-counted a micro-batch would be off by ~50%. Resume: the replicas stay bitwise identical at every
    step, and stop-after-3-steps + resume gives the uninterrupted DDP run's step losses (every rank),
    metrics.csv and adapter exactly."""
    import torch.multiprocessing as mp
    from safetensors.torch import load_file

    mp.spawn(_ddp_accum_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    recorder = _grad_recorder()
    with recorder.from_config(tiny_cfg(tmp_path / "single", *GRAD_RECIPE, "train.grad_accum=4")) as t:
        t.grads = []
        single = t.fit()
    assert len(t.grads) == len(r0["grads"]) == 2
    for step, (want, got0, got1) in enumerate(zip(t.grads, r0["grads"], r1["grads"])):
        assert_same_tensors(got1, got0, f"step {step + 1} gradient, rank 1 vs rank 0")  # bitwise
        scale = max(v.abs().max().item() for v in want.values())
        assert scale > 0
        assert_same_tensors(got0, want, f"step {step + 1} DDP vs single-process gradient", atol=1e-6 * scale)
    ddp_losses = [(a + b) / 2 for a, b in zip(r0["grad_losses"], r1["grad_losses"])]
    np.testing.assert_allclose(ddp_losses, [s["loss"] for s in single.steps], rtol=0, atol=1e-6)

    for run in ("straight", "first", "second"):
        assert r0[run]["digests"] == r1[run]["digests"], f"{run}: replicas differ"
    assert len(r0["straight"]["digests"]) == 6 and len(set(r0["straight"]["digests"])) == 6
    for rank, r in enumerate((r0, r1)):
        assert r["first"]["losses"] + r["second"]["losses"] == r["straight"]["losses"], f"rank {rank}: losses"
        assert r["first"]["digests"] + r["second"]["digests"] == r["straight"]["digests"], f"rank {rank}: weights"
    assert r0["straight"]["losses"] != r1["straight"]["losses"]  # the ranks saw different samples
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert assert_same_metrics(resumed / "metrics.csv", straight / "metrics.csv", atol=0.0) >= 3 * 6
    assert_same_tensors(load_file(resumed / "adapter.safetensors"), load_file(straight / "adapter.safetensors"),
                        "adapter")
