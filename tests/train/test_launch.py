"""Training in child processes: resume after SIGKILL, tampered checkpoints, DDP on one node and
across two, a timeout."""

import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from phi3ops.config import load_config
from phi3ops.train.checkpoints import MARKER, CheckpointError, latest_complete
from phi3ops.train.launch import TrainingTimeout, command, run_training, write_job
from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow
RESUMABLE = ["training_config.max_steps=30", "training_config.save_steps=10",
             "training_config.logging_steps=5", "training_config.learning_rate=1e-3"]


def config(*overrides):
    return load_config(REPO / "pipelines" / "tiny-cpu.yaml", [*RESUMABLE, *overrides])


def adapter_weights(result) -> dict[str, torch.Tensor]:
    return load_file(str(Path(result.adapter_dir) / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_models, processed):
    return run_training(config(), processed, tmp_path_factory.mktemp("whole"), tiny_models)


def start_child(cfg, processed, out_dir, tiny_models) -> subprocess.Popen:
    """What run_training starts, started by hand so the test can kill it mid-run."""
    out_dir.mkdir(parents=True, exist_ok=True)
    job = write_job(cfg, processed, out_dir, tiny_models)
    return subprocess.Popen(command(job, cfg), start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_sigkill_mid_run_then_rerun_equals_an_uninterrupted_run(
        tmp_path, tiny_models, processed, uninterrupted):
    out_dir = tmp_path / "run"
    child = start_child(config(), processed, out_dir, tiny_models)
    deadline = time.monotonic() + 300
    while not (out_dir / "checkpoints" / "checkpoint-20" / MARKER).exists():
        assert child.poll() is None and time.monotonic() < deadline, "no checkpoint-20"
        time.sleep(0.05)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert not (out_dir / "adapter").exists(), "killed before the end"

    resumed = run_training(config(), processed, out_dir, tiny_models)
    assert resumed.resumed_from is not None and resumed.resumed_from.endswith("checkpoint-20")
    assert resumed.global_step == uninterrupted.global_step == 30
    expected, got = adapter_weights(uninterrupted), adapter_weights(resumed)
    assert expected.keys() == got.keys()
    for name in expected:  # tolerance: float32 reductions may reorder across processes
        assert torch.allclose(got[name], expected[name], atol=1e-5), name


def test_an_interrupted_save_is_skipped_and_a_tampered_checkpoint_refused(
        tmp_path, tiny_models, processed, uninterrupted):
    source = Path(uninterrupted.adapter_dir).parent / "checkpoints"
    checkpoints = tmp_path / "checkpoints"
    subprocess.run(["cp", "-r", str(source), str(checkpoints)], check=True)
    assert latest_complete(checkpoints).name == "checkpoint-30"

    (checkpoints / "checkpoint-30" / MARKER).unlink()  # as if killed while saving
    assert latest_complete(checkpoints).name == "checkpoint-20"
    assert not (checkpoints / "checkpoint-30").exists()

    optimizer = checkpoints / "checkpoint-20" / "optimizer.pt"
    original = optimizer.read_bytes()
    tampered = bytearray(original)
    tampered[len(tampered) // 2] ^= 0xFF  # one flipped byte
    optimizer.write_bytes(bytes(tampered))
    with pytest.raises(CheckpointError, match="optimizer.pt: sha256 differs"):
        latest_complete(checkpoints)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (checkpoints).rename(run_dir / "checkpoints")
    with pytest.raises(Exception, match="optimizer.pt: sha256 differs"):
        run_training(config(), processed, run_dir, tiny_models)  # refused by the child too
    assert not (run_dir / "adapter").exists()

    optimizer = run_dir / "checkpoints" / "checkpoint-20" / "optimizer.pt"
    optimizer.write_bytes(original)
    assert latest_complete(run_dir / "checkpoints").name == "checkpoint-20"
    (optimizer.parent / "pytorch_model.bin").write_bytes(b"a pickle would go here")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: added after"):
        latest_complete(run_dir / "checkpoints")


# Same global batch (16) on one process, split over ranks, or over nodes. Dropout off (its RNG
# is per rank). Tolerance: 1% of the loss, for float reductions in a different order.
SAME_STEPS = ["training_config.max_steps=6", "training_config.logging_steps=1",
              "training_config.learning_rate=3e-4", "peft_config.lora_dropout=0"]


def losses(result) -> list[float]:
    return [h["loss"] for h in result.history]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_models, processed):
    """The reference run: global batch 16 on a single process."""
    return run_training(config(*SAME_STEPS, "training_config.per_device_train_batch_size=16"),
                        processed, tmp_path_factory.mktemp("one"), tiny_models)


def test_two_ddp_processes_reach_the_loss_of_one_with_the_same_global_batch(
        one_process, tmp_path, tiny_models, processed):
    two = run_training(config(*SAME_STEPS, "training_config.per_device_train_batch_size=8",
                              "launch.nproc=2"), processed, tmp_path / "two", tiny_models)
    assert (one_process.world_size, two.world_size) == (1, 2)
    assert len(losses(one_process)) == len(losses(two)) == 6
    assert losses(two) == pytest.approx(losses(one_process), rel=0.01)
    assert [h["num_tokens"] for h in two.history] == [
        h["num_tokens"] for h in one_process.history]


@pytest.mark.scale
def test_two_nodes_at_a_c10d_rendezvous_train_like_one_process_and_each_keeps_a_copy(
        one_process, tmp_path, tiny_models, processed):
    """Two torchrun nodes on 127.0.0.1, one process each, meeting at one endpoint, as two
    machines would: the same losses as one process, and each node's own adapter and checkpoint
    (no shared disk), identical on both."""
    cfg = config(*SAME_STEPS, "training_config.per_device_train_batch_size=8", "launch.nnodes=2",
                 f"launch.rdzv_endpoint=127.0.0.1:{free_port()}")
    with ThreadPoolExecutor(max_workers=2) as nodes:
        results = list(nodes.map(
            lambda node: run_training(cfg, processed, tmp_path / f"node{node}", tiny_models),
            range(2)))
    assert [r.world_size for r in results] == [2, 2]
    for result in results:
        assert losses(result) == pytest.approx(losses(one_process), rel=0.01)
    first, second = (adapter_weights(r) for r in results)
    assert first.keys() == second.keys() and all(
        torch.equal(first[k], second[k]) for k in first), "DDP keeps the replicas identical"
    for node in range(2):
        assert latest_complete(tmp_path / f"node{node}" / "checkpoints").name == "checkpoint-6"


def test_a_hung_training_is_killed_after_its_timeout(tmp_path, tiny_models, processed):
    cfg = config("training_config.max_steps=100000", "launch.timeout_s=8")
    started = time.monotonic()
    with pytest.raises(TrainingTimeout, match="timeout_s=8"):
        run_training(cfg, processed, tmp_path, tiny_models)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "adapter").exists()
