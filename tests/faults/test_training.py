"""Case 4: faults during `imlt train`: a non-finite loss, SIGTERM, the time limit, a full disk.

Each run is the real command on the colour dataset; the fault comes from outside the trainer
(a torch forward hook poisoning the model's output, a signal from another process, the clock,
a file-size limit or a full tmpfs). Every case must leave the last good checkpoint valid and
let a resumed run finish.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import (
    STEPS_PER_EPOCH, checkpoints, ckpt_dir, imlt, imlt_cmd, kept, run_imlt, subprocess_env, train_args,
)
from imlt.trainer.model_files import CONFIG, HISTORY, USAGE, WEIGHTS


def load_checkpoint(path: Path) -> dict:
    from imlt.trainer import checkpoint as ckpt

    return ckpt.load_checkpoint(str(path))


def latest_checkpoint(output_dir: Path) -> Path:
    """The furthest-along checkpoint by (epoch, batch), as the trainer orders them (not by name)."""
    from imlt.trainer import checkpoint as ckpt

    return Path(ckpt.latest_checkpoint(str(ckpt_dir(output_dir))))


def assert_finite_checkpoint(path: Path) -> dict:
    import torch

    state = load_checkpoint(path)
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    return state


@contextlib.contextmanager
def poisoned_forward(after_steps: int, value: float) -> Iterator[None]:
    """Multiply the embedding model's training output by `value` (nan/inf) from step `after_steps` on.

    A global torch forward hook (torch.nn.modules.module.register_module_forward_hook): the fault
    enters through the model's output, as a numerical blow-up would, and the trainer is untouched.
    """
    import torch

    from imlt.trainer.model import EmbeddingModel

    calls = [0]

    def hook(module: torch.nn.Module, args: object, output: torch.Tensor) -> torch.Tensor | None:
        if isinstance(module, EmbeddingModel) and module.training:
            calls[0] += 1
            if calls[0] > after_steps:
                return output * value
        return None

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


# --- NaN / inf loss ------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(
    dataset: str, tmp_path: Path, value: float
) -> None:
    out = tmp_path / "model"
    with poisoned_forward(after_steps=STEPS_PER_EPOCH + 1, value=value):  # epoch 2, batch index 1
        ran = imlt(*train_args(dataset, out, 2))
    assert ran.exit_code == 1 and ran.exception is None, ran.output
    step = STEPS_PER_EPOCH + 1
    assert "NonFiniteLossError: loss is " in ran.output
    assert f"at epoch 2, batch index 1, global step {step}" in ran.output, ran.output
    assert f"last good checkpoint: {out}-checkpoints/epoch-0001.ckpt" in ran.output
    assert checkpoints(out) == ["epoch-0001.ckpt"]
    assert assert_finite_checkpoint(ckpt_dir(out) / "epoch-0001.ckpt")["global_step"] == STEPS_PER_EPOCH
    assert not (out / WEIGHTS).exists()  # no model from a diverged run

    resumed = imlt(*train_args(dataset, out, 2))  # the fault was transient: resume finishes the run
    assert resumed.exit_code == 0, resumed.output
    assert resumed.json()["epochs_completed"] == 2
    assert (out / WEIGHTS).exists()


def test_diverging_learning_rate_stops_at_the_first_bad_step(dataset: str, tmp_path: Path) -> None:
    ran = imlt(*train_args(dataset, tmp_path / "model", 1, "--lr", "1e30", "--set", "optim.warmup_epochs=0"))
    assert ran.exit_code == 1, ran.output
    assert "NonFiniteLossError: loss is" in ran.output and "global step" in ran.output
    assert "last good checkpoint: none yet" in ran.output and "Lower optim.lr (now 1e+30)" in ran.output
    assert not (tmp_path / "model" / WEIGHTS).exists()


# --- SIGTERM to a real `imlt train` process ------------------------------------------------------------

# Holds the child at the start of its 2nd training step of epoch 2 (a slow step, as on a busy
# machine) until the test has sent SIGTERM, so the signal lands mid-epoch every time.
_PAUSE = """
import os, time, torch
from imlt.trainer.model import EmbeddingModel
paused, release, calls = os.environ["PAUSED_MARKER"], os.environ["RELEASE_MARKER"], [0]
def hold(module, args):
    if isinstance(module, EmbeddingModel) and module.training:
        calls[0] += 1
        if calls[0] == int(os.environ["PAUSE_AT_CALL"]):
            open(paused, "w").close()
            deadline = time.monotonic() + 120
            while not os.path.exists(release) and time.monotonic() < deadline:
                time.sleep(0.02)
torch.nn.modules.module.register_module_forward_pre_hook(hold)
"""


@pytest.mark.slow
def test_sigterm_mid_epoch_leaves_a_resumable_checkpoint(dataset: str, tmp_path: Path) -> None:
    out = tmp_path / "model"
    paused, release = tmp_path / "paused", tmp_path / "release"
    env = subprocess_env(PAUSED_MARKER=str(paused), RELEASE_MARKER=str(release), PAUSE_AT_CALL=str(STEPS_PER_EPOCH + 2))
    args = train_args(dataset, out, 3, "--reader-threads", "1")  # a loader worker, as in production
    child = subprocess.Popen(imlt_cmd(*args, prelude=_PAUSE), env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while not paused.exists():
            assert child.poll() is None, child.stdout.read()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the child never reached epoch 2"
            time.sleep(0.05)
        child.send_signal(signal.SIGTERM)
        release.touch()
        output, _ = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 1, output
    mid = f"{out}-checkpoints/epoch-0001-batch-000002.ckpt"
    assert f"TrainingInterrupted: stopped by SIGTERM at epoch 2, batch 2; checkpoint {mid}" in output, output
    assert "Traceback" not in output
    assert checkpoints(out) == ["epoch-0001-batch-000002.ckpt", "epoch-0001.ckpt"]
    state = assert_finite_checkpoint(Path(mid))
    assert (state["epoch"], state["batch"], state["global_step"]) == (1, 2, STEPS_PER_EPOCH + 2)
    assert not (out / WEIGHTS).exists()

    resumed = run_imlt(*args)
    assert resumed.exit_code == 0, resumed.output
    result = resumed.json()
    assert result["epochs_completed"] == 3 and not result["stopped_early"]
    assert [h["images"] for h in result["history"]] == [24, 24, 24]  # the split epoch counts whole
    assert checkpoints(out) == kept(result["history"])


# --- the time limit -----------------------------------------------------------------------------------


def test_time_limit_checkpoints_and_stops_cleanly(
    dataset: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    out = tmp_path / "model"
    epochs = 40  # far more than fit in the limit
    monkeypatch.setenv("IMLT_MAX_SECONDS", "1")
    ran = imlt(*train_args(dataset, out, epochs))
    assert ran.exit_code == 0, ran.output  # a clean stop, not a failure
    assert "time limit of 1 s reached: checkpointing and stopping" in caplog.text  # a warning on stderr
    result = ran.json()
    assert result["stopped_early"] and result["epochs_completed"] < epochs
    state = assert_finite_checkpoint(latest_checkpoint(out))
    assert state["epoch"] == result["epochs_completed"] and state["global_step"] > 0
    assert len(result["history"]) == result["epochs_completed"]
    for name in (WEIGHTS, HISTORY, USAGE, CONFIG):
        assert (out / name).exists(), name  # a usable model of where it stopped

    # the next invocation (e.g. the scheduler's retry) continues from there, under its own limit
    again = imlt(*train_args(dataset, out, epochs))
    assert again.exit_code == 0, again.output
    assert again.json()["stopped_early"]
    assert assert_finite_checkpoint(latest_checkpoint(out))["global_step"] > state["global_step"]


# --- a full disk while checkpointing ----------------------------------------------------------------------

_FILE_SIZE_LIMIT = """
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
"""


@contextlib.contextmanager
def small_tmpfs(path: Path) -> Iterator[None]:
    path.mkdir(parents=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root; the file-size-limit variant covers a failing write")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the file-size-limit variant covers a failing write")
    try:
        yield
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


def resize_tmpfs(path: Path, size: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True, capture_output=True)


@pytest.mark.parametrize("disk", ["file-size-limit", "full-tmpfs"])
def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(dataset: str, tmp_path: Path, disk: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    volume = tmp_path / "volume"  # holds the model folder and, beside it, the checkpoints
    out = volume / "model"
    with small_tmpfs(volume) if disk == "full-tmpfs" else contextlib.nullcontext():
        # 1. a run stopped by the time limit after one step: the "previous" checkpoint
        monkeypatch.setenv("IMLT_MAX_SECONDS", "0")
        first = imlt(*train_args(dataset, out, 2))
        assert first.exit_code == 0, first.output
        monkeypatch.delenv("IMLT_MAX_SECONDS")
        previous = ckpt_dir(out) / "epoch-0000-batch-000001.ckpt"
        assert checkpoints(out) == [previous.name]
        size = previous.stat().st_size
        good = previous.read_bytes()

        # 2. resume on a disk with room for less than one more checkpoint: the epoch-1 save fails
        if disk == "file-size-limit":
            ran = run_imlt(*train_args(dataset, out, 2), prelude=_FILE_SIZE_LIMIT.format(limit=size // 3))
            reason = "File too large"
        else:
            stats = os.statvfs(volume)
            used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
            resize_tmpfs(volume, used + size // 3)
            ran = imlt(*train_args(dataset, out, 2))
            reason = "No space left on device"
        assert ran.exit_code == 1, ran.output
        assert f"{out}-checkpoints/epoch-0001.ckpt" in ran.output and reason in ran.output, ran.output
        assert "Traceback" not in ran.output
        assert sorted(p.name for p in ckpt_dir(out).iterdir()) == [previous.name]  # no partial file, no temp file
        assert previous.read_bytes() == good
        assert_finite_checkpoint(previous)

        # 3. room again: the resumed run finishes from the previous checkpoint
        if disk == "full-tmpfs":
            resize_tmpfs(volume, 64 * 2**20)
        done = imlt(*train_args(dataset, out, 2))
        assert done.exit_code == 0, done.output
        assert done.json()["epochs_completed"] == 2
        assert checkpoints(out) == kept(done.json()["history"])
