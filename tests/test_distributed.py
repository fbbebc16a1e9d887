"""Data-parallel SVI with 2 CPU processes (gloo): equal to one process, and resumable."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pyro
import pytest
import torch
import torch.multiprocessing
from conftest import TINY_BACKBONE
from test_models import CLASSES, separable_features

import bayesprompt.commands.train
from bayesprompt import distributed
from bayesprompt.clip.factory import load_clip
from bayesprompt.commands.cli import run_main
from bayesprompt.errors import UserError
from bayesprompt.inference import checkpoint, svi
from bayesprompt.inference.svi import TrainConfig, train
from bayesprompt.inference.training_log import METRICS_FILE, TrainingLog, read_rows
from bayesprompt.program.base import PromptConfig
from bayesprompt.runs.model_files import load_model_class

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "experiments" / "svi_train.py"
#: 16 images in batches of 5: shards of 3 and 2 images, and a last batch of one image that
#: leaves rank 1 without an image.
PER_CLASS = 4
CONFIG = TrainConfig(epochs=2, batch_size=5, num_particles=3, lr=0.1, warmup_epochs=0, seed=7)
DETERMINISTIC = ("coop", "cocoop")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_view_features(clip) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (2 views, 16 images, D) and labels (16,)."""
    features, labels = separable_features(clip, per_class=PER_CLASS)
    return torch.cat([features, features + 0.01]), labels


def train_model(name: str, clip, config: TrainConfig, checkpoint: Path | None = None,
                resume: bool = False, log_folder: Path | None = None
                ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Loss history and the param store's parameters after training a fresh `name`; with
    `log_folder`, its metrics.jsonl (a row every 2 steps) there."""
    torch.manual_seed(0)
    program = load_model_class(name)(clip, CLASSES, PromptConfig())
    features, labels = two_view_features(clip)
    log = TrainingLog(log_folder, log_every=2) if log_folder is not None else None
    history = train(program, features, labels, config, checkpoint, {"model": name}, resume,
                    log).loss
    return history, program.prompt_state()


PLAIN_SCHEDULE = svi.learning_rate


def stop_at_second_epoch(epoch: int, config: TrainConfig) -> float:
    """The learning-rate schedule of a run that is stopped after its first epoch."""
    if epoch == 1:
        raise KeyboardInterrupt
    return PLAIN_SCHEDULE(epoch, config)


def train_on_rank(rank: int, port: int, folder: str) -> None:
    """One of 2 processes: train every scenario, save this rank's results to `folder`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    clip = load_clip(TINY_BACKBONE)
    results = {}
    with distributed.process_group("cpu"):
        assert distributed.world_size() == 2 and distributed.rank() == rank
        try:
            with distributed.main_process_first():
                if rank == 0:
                    raise UserError("The dataset is missing.")
        except UserError as error:
            results["refused"] = str(error)
        for name in (*DETERMINISTIC, "vpt_cond"):
            results[name] = train_model(name, clip, CONFIG, log_folder=Path(folder) / name)

        three_epochs = dataclasses.replace(CONFIG, epochs=3)
        results["vpt"] = train_model("vpt", clip, three_epochs, Path(folder) / "a.pt")
        interrupted = Path(folder) / "b.pt"
        svi.learning_rate = stop_at_second_epoch
        try:
            train_model("vpt", clip, three_epochs, interrupted)
        except KeyboardInterrupt:
            pass
        finally:
            svi.learning_rate = PLAIN_SCHEDULE
        distributed.barrier()  # rank 0 has written the checkpoint of the first epoch
        results["vpt resumed"] = train_model("vpt", clip, three_epochs, interrupted, True)
    torch.save(results, Path(folder) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """What each of 2 gloo processes trained, by scenario: (loss history, parameters), and
    rank 0's metrics.jsonl rows under "rows"."""
    folder = tmp_path_factory.mktemp("ranks")
    torch.multiprocessing.spawn(train_on_rank, args=(free_port(), str(folder)), nprocs=2)
    ranks = [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ranks[0]["rows"] = {name: read_rows(folder / name / METRICS_FILE)
                        for name in (*DETERMINISTIC, "vpt_cond")}
    return ranks


def test_an_error_of_rank_0_stops_the_others_with_a_message(two_ranks: list[dict]) -> None:
    assert two_ranks[0]["refused"] == "The dataset is missing."
    assert two_ranks[1]["refused"] == "(rank 1) stopped: rank 0 failed with the error above."


def test_ranks_hold_identical_parameters(two_ranks: list[dict]) -> None:
    first, second = two_ranks
    assert set(first) == {*DETERMINISTIC, "vpt_cond", "vpt", "vpt resumed", "refused", "rows"}
    for scenario in DETERMINISTIC + ("vpt_cond", "vpt", "vpt resumed"):
        assert first[scenario][0] == second[scenario][0]  # the all-reduced loss history
        assert first[scenario][1].keys() == second[scenario][1].keys()
        for name, value in first[scenario][1].items():
            assert torch.equal(value, second[scenario][1][name]), (scenario, name)


@pytest.mark.parametrize("name", DETERMINISTIC)
def test_two_ranks_equal_one_process(name: str, two_ranks: list[dict], tiny_clip,
                                     tmp_path: Path) -> None:
    history, parameters = train_model(name, tiny_clip, CONFIG, log_folder=tmp_path)
    rows, distributed_rows = read_rows(tmp_path / METRICS_FILE), two_ranks[0]["rows"][name]
    assert [(r["kind"], r["step"], r["images"], r["lr"]) for r in distributed_rows] == \
        [(r["kind"], r["step"], r["images"], r["lr"]) for r in rows]
    for row, distributed_row in zip(rows, distributed_rows, strict=True):
        for key in ("loss", "nll", "kl"):
            assert distributed_row[key] == pytest.approx(row[key], abs=1e-5), key
    scale = two_ranks[0]["rows"]["vpt_cond"][-1]["posterior_scale"]["r"]  # min/max reduced
    assert 0 < scale["min"] <= scale["mean"] <= scale["max"]
    distributed_history, distributed_parameters = two_ranks[0][name]
    assert distributed_history == pytest.approx(history, abs=1e-5)
    assert parameters.keys() == distributed_parameters.keys()
    for key, value in parameters.items():
        torch.testing.assert_close(distributed_parameters[key], value, atol=1e-5, rtol=0)
    _, initial = train_model(name, tiny_clip, TrainConfig(epochs=0))
    assert any(not torch.allclose(value, initial[key]) for key, value in parameters.items())


def test_stochastic_models_train_and_resume_under_two_ranks(two_ranks: list[dict],
                                                           tiny_clip) -> None:
    """Particle noise differs by rank, so vpt models equal one process in distribution only."""
    history, parameters = two_ranks[0]["vpt"]
    resumed_history, resumed = two_ranks[0]["vpt resumed"]
    assert len(history) == 3 and all(map(math.isfinite, history))
    assert resumed_history == pytest.approx(history)
    for key, value in parameters.items():
        torch.testing.assert_close(resumed[key], value)
    for name in ("vpt", "vpt_cond"):
        _, initial = train_model(name, tiny_clip, TrainConfig(epochs=0))
        trained = two_ranks[0][name][1]
        assert all(torch.isfinite(value).all() for value in trained.values())
        assert not torch.allclose(trained["ctx"], initial["ctx"])


def test_shards_weight_each_rank_by_its_share(monkeypatch) -> None:
    index = torch.tensor([4, 0, 3, 1, 2])
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    shards = []
    for rank in range(2):
        monkeypatch.setattr(distributed, "rank", lambda rank=rank: rank)
        shards.append(distributed.shard(index))
        assert distributed.shard(index[:1]) == ((index[:1], 1.0) if rank == 0
                                                else (index[:1], 0.0))
    assert torch.equal(torch.cat([shards[0][0], shards[1][0]]), index)
    assert [share for _, share in shards] == [0.6, 0.4]


def test_each_rank_but_0_draws_its_own_reproducible_noise(monkeypatch) -> None:
    def draw(rank: int, epoch: int) -> torch.Tensor:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        torch.manual_seed(5)
        distributed.seed_rank_stream(seed=7, epoch=epoch)
        return torch.randn(4)

    single_process = torch.randn(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(draw(0, 0), single_process)  # rank 0 keeps the single-process stream
    assert torch.equal(draw(1, 3), draw(1, 3))      # a resumed epoch draws the same noise
    noises = [draw(0, 0), draw(1, 0), draw(2, 0), draw(1, 1)]
    assert all(not torch.equal(a, b) for i, a in enumerate(noises) for b in noises[i + 1:])


def test_a_batch_smaller_than_the_world_is_refused(monkeypatch) -> None:
    distributed.check_batch_size(1)
    monkeypatch.setattr(distributed, "world_size", lambda: 4)
    distributed.check_batch_size(4)
    with pytest.raises(UserError, match="--batch-size 3 is the global batch.*4 processes"):
        distributed.check_batch_size(3)


def test_one_gpu_for_many_processes_is_refused(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="--device cuda:1 names one GPU.*Pass --device cuda"):
        with distributed.process_group("cuda:1"):
            pass


def test_a_checkpoint_is_loaded_onto_the_device_of_the_run(tmp_path: Path) -> None:
    """Every rank of a GPU run loads the checkpoint onto its own device ('meta' stands in)."""
    state = {key: None for key in checkpoint.CHECKPOINT_KEYS}
    state.update(identity={}, param_store={"ctx_map": torch.ones(2, 3)})
    checkpoint.save_torch(tmp_path / "checkpoint.pt", state)
    pyro.clear_param_store()
    # the program creates its parameters on the run's device first; loading copies into them
    pyro.param("ctx_map", torch.zeros(2, 3, device="meta"))
    checkpoint.load_checkpoint(tmp_path / "checkpoint.pt", {}, "meta")
    (name, value), = pyro.get_param_store().named_parameters()
    assert name == "ctx_map" and value.device.type == "meta" and value.shape == (2, 3)
    assert value.is_leaf and value.requires_grad


def test_torchrun_resumes_a_run_to_the_one_process_result(run_args: list[str],
                                                          tmp_path: Path, monkeypatch) -> None:
    """Epoch 1 in one process, epochs 2-3 by `torchrun --nproc_per_node 2 ... --resume`."""
    svi_train = vars(bayesprompt.commands.train)
    args = [*run_args, "--model", "cocoop", "--subsample", "all", "--batch-size", "3",
            "--epochs", "3", "--precision", "fp32"]  # 40 images: shards of 2 and 1, and a
    # last batch of one image; fp32, where the split of a sum over ranks changes only rounding
    # (bf16 sums depend on the split: README, "Multi-GPU")
    run_main(svi_train["main"], [*args, "--out", str(tmp_path / "single")])
    save = checkpoint.save_torch

    def save_then_stop(path: Path, state: dict) -> None:
        save(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "save_torch", save_then_stop)
    with pytest.raises(SystemExit):  # Ctrl-C: exit code 130
        run_main(svi_train["main"], args)
    shutil.rmtree(tmp_path / "cache" / "features")  # rank 0 computes them, rank 1 waits
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(free_port()), str(SCRIPT), *args, "--resume"],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("harmonic mean") == 1  # rank 0 alone reports

    single = json.loads((tmp_path / "single/results.json").read_text())
    resumed = json.loads((tmp_path / "run/results.json").read_text())
    assert resumed["world_size"] == 2 and single["world_size"] == 1
    assert resumed["loss_history"] == pytest.approx(single["loss_history"], abs=1e-5)
    assert resumed["base_acc"] == pytest.approx(single["base_acc"])
    expected, actual = (torch.load(tmp_path / run / "checkpoint.pt", weights_only=True)
                        for run in ("single", "run"))
    assert actual["epoch"] == 3
    for key, value in expected["param_store"].items():
        torch.testing.assert_close(actual["param_store"][key], value, atol=1e-5,
                                   rtol=0)
