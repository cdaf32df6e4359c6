"""Process-level faults: kill -9 while a checkpoint is being written, then --resume; 2-process DDP on CPU."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from _training_helpers import REPO, TINY, tiny_cfg
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

    done = subprocess.run(_cli(out), env=_env(), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    final = ckpt.load_checkpoint(out / "latest.pt")
    assert final["global_step"] == 12 and final["epoch"] == 3 and len(final["history"]) == 3
    assert [row["epoch"] for row in final["history"]] == [0, 1, 2]
    assert (out / "adapter.safetensors").is_file() and not tmp_files()


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
