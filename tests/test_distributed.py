"""Scale-out: N processes (gloo on the CPU) give the same data as one, and a killed rank resumes.

The multi-process tests start the real CLIs in subprocesses with ``--devices 2``: Lightning's
launcher re-runs the command line for rank 1, exactly as a user's run does.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import SMALL, SMOKE, run_cli, run_tree

from syntagen_st import fit as fit_mod
from syntagen_st.core.cli import run_main
from syntagen_st.generation.writer import BackgroundWriter
from syntagen_st.scaleout.dist import Dist, ShardSampler

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
       "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _files(root: Path, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not str(p.relative_to(root)).startswith(skip)}


def test_shards_cover_every_index_once():
    for n in (0, 1, 5, 8):
        for world in (1, 2, 3):
            shards = [list(ShardSampler(range(n), Dist(rank, world))) for rank in range(world)]
            assert sorted(sum(shards, [])) == list(range(n)), (n, world, shards)
            assert [len(s) for s in shards] == [len(ShardSampler(range(n), Dist(rank, world))) for rank in range(world)]


def test_background_writer_runs_jobs_in_order_bounded_and_raises_a_failure():
    done, gate = [], threading.Event()
    with BackgroundWriter(max_pending=1) as writer:
        writer.submit(lambda: (gate.wait(5), done.append(0)))
        writer.submit(lambda: done.append(1))  # fills the queue while job 0 blocks
        blocked = threading.Thread(target=writer.submit, args=(lambda: done.append(2),))
        blocked.start()
        time.sleep(0.2)
        assert blocked.is_alive(), "a full queue must make the producer wait"
        gate.set()
        blocked.join(5)
    assert done == [0, 1, 2]

    def fail():
        raise OSError("disk full")

    writer = BackgroundWriter(max_pending=2)
    writer.submit(fail)
    writer.submit(lambda: done.append(3))  # dropped: the rerun regenerates it
    with pytest.raises(OSError, match="disk full"):
        writer.close()
    assert done == [0, 1, 2]


GENERATE = [sys.executable, "-m", "syntagen_st.generate", "--config", SMOKE, "--num-images", "7", "--generate.height", "64",
            "--generate.width", "64", "--generate.steps", "2", "--generate.batch_size", "2", "--no-progress"]


@pytest.mark.slow
def test_generate_with_three_processes_writes_the_same_pool_as_one(tmp_path):
    subprocess.run([*GENERATE, "--out", str(tmp_path / "one")], check=True, capture_output=True, env=ENV)
    # 3 processes, though train.batch_size 4 cannot be split over them: generation splits no batch.
    subprocess.run([*GENERATE, "--devices", "3", "--out", str(tmp_path / "two")], check=True, capture_output=True, env=ENV)
    one, two = _files(tmp_path / "one", ("config.yaml",)), _files(tmp_path / "two", ("config.yaml",))
    # 7 samples in batches of 2: rank 0 makes batches 0 and 3 (of one sample), rank 1 batch 1, rank 2 batch 2.
    assert len([k for k in one if k.startswith("pool/images/")]) == 7
    assert len([k for k in one if k.startswith("pool/manifest/")]) == 4
    # Each row records its batch's length, the shape a bit-exact regeneration needs.
    rows = [json.loads(line) for k in sorted(one) if k.startswith("pool/manifest/") for line in one[k].decode().splitlines()]
    assert [row["batch"] for row in rows] == [2, 2, 2, 2, 2, 2, 1]
    assert one.keys() == two.keys()
    assert [k for k in one if one[k] != two[k]] == []


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_fit_with_two_processes_equals_one_and_resumes_after_a_rank_is_killed(tmp_path):
    fit = [sys.executable, "-m", "syntagen_st.fit", *SMALL]
    subprocess.run([*fit, "--out", str(tmp_path / "one")], check=True, capture_output=True, env=ENV)

    two = tmp_path / "two"
    proc = subprocess.Popen([*fit, "--devices", "2", "--out", str(two)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Rank 1 trains fold model 1 beside rank 0's fold 0: kill -9 it in the middle.
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (two / "rounds" / "0" / "fold1" / "train_config.yaml").exists():
        time.sleep(0.02)
    ranks = _children(proc.pid)
    assert len(ranks) == 1, ranks
    os.kill(ranks[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    # Rank 0 stops with one line at its next barrier, or Lightning's launcher ends it naming the dead rank.
    assert "another rank stopped" in err or "terminated with code -9" in err, err[-2000:]
    assert "Traceback" not in err, err[-2000:]
    assert "round0/fold1" not in json.loads((two / "state.json").read_text())["done"]

    done = subprocess.run([*fit, "--devices", "2", "--out", str(two)], capture_output=True, text=True, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    one, resumed = run_tree(tmp_path / "one"), run_tree(two)
    assert one.keys() == resumed.keys()
    # The pool, prompts, refined labels, scores, drops, weights and the exported files are the same;
    # the final model is not: it trained data-parallel, 2 x batch 2 instead of 1 x batch 4.
    model_files = {"final/model.safetensors", "final/checksum.txt", "export/submission.json", "export/README.md",
                   "config.yaml", "final/train_config.yaml"}
    assert [k for k in one if one[k] != resumed[k] and k not in model_files] == []
    assert any(k.startswith("rounds/1/labels/") for k in one) and any(k.startswith("pool/manifest/") for k in one)
    before, after = (json.loads(tree["export/submission.json"]) for tree in (one, resumed))
    assert {**before, "model_sha256": None, "config": None} == {**after, "model_sha256": None, "config": None}
    assert after["model_sha256"] == resumed["final/checksum.txt"].decode().split()[0]
    # The fold models (trained one per rank, on one device each) are the single process's.
    for r in (0, 1):
        for k in (0, 1):
            name = f"rounds/{r}/fold{k}/model.safetensors"
            assert (tmp_path / "one" / name).read_bytes() == (two / name).read_bytes(), name


@pytest.mark.parametrize("flags", [["--train.devices", "3", "--train.batch_size", "8"], ["--devices", "3"]])
def test_a_device_count_that_does_not_divide_the_batch_is_refused(capsys, tmp_path, flags):
    assert run_cli(fit_mod.main, ["--config", str(Path(SMOKE).parent / "protocol.yaml"), *flags, "--out", str(tmp_path / "run")], prog="syntagen_st.fit")[0] == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "train.batch_size 8" in err and "3 devices" in err
    assert not (tmp_path / "run").exists()


def test_the_train_command_refuses_it_too_and_generate_takes_any_count(capsys, tmp_path):
    from syntagen_st import train as train_mod
    from syntagen_st.core.cli import config_from, config_parser
    from syntagen_st.core.config import TrainConfig
    from syntagen_st.core.device import check_batch_split
    from syntagen_st.core.errors import ConfigError

    with pytest.raises(SystemExit) as exit_info:
        run_main(train_mod.main, "syntagen_st.train", ["--config", str(Path(SMOKE).parent / "protocol.yaml"), "--train.devices", "3",
                                                       "--data", str(tmp_path), "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2 and "cannot be split over 3 devices" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    # Generation splits no batch: 3 processes are fine whatever train.batch_size says.
    parser = config_parser("generate", "", shortcuts=("devices",))
    assert config_from(parser, parser.parse_args(["--config", str(Path(SMOKE).parent / "protocol.yaml"), "--devices", "3"])).train.devices == "3"
    # 'auto' found a count that does not fit: the line names the largest that does, per node.
    with pytest.raises(ConfigError, match=r"found 3 devices in all .* \(here --devices 2\)"):
        check_batch_split(TrainConfig(devices="auto", batch_size=8), 3)
    with pytest.raises(ConfigError, match=r"\(here --devices 2\)"):
        check_batch_split(TrainConfig(devices="auto", batch_size=8, num_nodes=2), 6)
    check_batch_split(TrainConfig(devices="auto", batch_size=8), 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has the GPU this test asks for in vain")
def test_devices_lightning_cannot_use_are_refused_in_one_line(capsys, tmp_path, monkeypatch):
    from lightning_fabric import Fabric
    from lightning_fabric.utilities.exceptions import MisconfigurationException

    from syntagen_st import train as train_mod

    def refuse(_, *args, **kwargs):  # what Lightning says on a machine with fewer GPUs than asked for
        raise MisconfigurationException("You requested gpu: [0, 1, 2, 3]\n But your machine only has: [0]")

    out = ["--out", str(tmp_path / "run")]
    cases = [
        (fit_mod.main, ["--config", SMOKE, "--train.accelerator", "gpu", *out], None, "No supported gpu backend found!"),
        (fit_mod.main, ["--config", SMOKE, "--train.devices", "4", *out], refuse, "You requested gpu: [0, 1, 2, 3]"),
        (train_mod.main, ["--config", SMOKE, "--train.devices", "4", "--data", str(tmp_path), *out], refuse, "You requested gpu"),
    ]
    for main, argv, fabric_init, said in cases:
        with monkeypatch.context() as patch:
            if fabric_init is not None:
                patch.setattr(Fabric, "__init__", fabric_init)
            with pytest.raises(SystemExit) as exit_info:
                run_main(main, "cmd", argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "train.accelerator" in err and said in err, err
        assert not (tmp_path / "run").exists()


def _models():
    import torch

    from syntagen_st.segmentation.network import build_segmenter

    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(build_segmenter("lraspp_mobilenet_v3_large", "none").eval())
    return models


def _predict_and_count(rank: int, world: int, init: str, images: list, labels: dict, out: str) -> None:
    """One rank of a 2-process refine pass: its shard's probabilities, and the merged confusion."""
    import torch
    import torch.distributed as torch_dist

    from syntagen_st.selftrain import refine as rf
    from syntagen_st.selftrain.heldout import predict_shard

    torch.set_num_threads(1)
    torch_dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dist = Dist(rank, world)
    probs = dict(predict_shard(_models(), [images[:5], images[5:]], 2, dist))
    confusion = sum(rf.confusion_matrix(p.argmax(0).astype(np.uint8), labels[i]) for i, p in probs.items())
    np.savez(Path(out) / f"rank{rank}.npz", confusion=dist.all_reduce_sum(confusion),
             **{f"p_{i}": p for i, p in probs.items()})
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_refine_predictions_over_two_ranks_equal_one(tmp_path):
    import torch
    import torch.multiprocessing as mp

    from syntagen_st.selftrain import refine as rf
    from syntagen_st.selftrain.heldout import predict_shard

    rng = np.random.default_rng(0)
    images, labels = [], {}
    for n in range(9):
        path = tmp_path / f"s{n}.png"
        from PIL import Image

        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        images.append(str(path))
        labels[str(path)] = rng.integers(0, 21, (32, 32), dtype=np.uint8)
    mp.spawn(_predict_and_count, args=(2, f"file://{tmp_path / 'init'}", images, labels, str(tmp_path)), nprocs=2)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks ran with one thread each: the same kernels
    try:
        single = dict(predict_shard(_models(), [images[:5], images[5:]], 2))
    finally:
        torch.set_num_threads(threads)
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in (0, 1)]
    shards = [{k[2:] for k in f.files if k.startswith("p_")} for f in ranks]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(images) and all(shards)
    for f, shard in zip(ranks, shards):
        for i in shard:
            assert np.array_equal(f[f"p_{i}"], single[i]), i
    confusion = sum(rf.confusion_matrix(p.argmax(0).astype(np.uint8), labels[i]) for i, p in single.items())
    for f in ranks:
        assert np.array_equal(f["confusion"], confusion)


def test_a_fold_model_trains_on_its_rank_device_and_ddp_syncs_batchnorm_on_gpus(monkeypatch):
    from syntagen_st.core.config import TrainConfig
    from syntagen_st.segmentation import trainer as train_mod

    # The rank's own device, found by the launcher (SLURM sets no LOCAL_RANK), whatever train.devices says.
    placed = train_mod._placement(TrainConfig(devices="4"), True, torch.device("cuda", 3))
    assert placed["devices"] == [3] and placed["accelerator"] == "gpu" and placed["strategy"] == "auto"
    assert train_mod._placement(TrainConfig(devices="4"), True, None)["devices"] == 1  # CPU: one device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert train_mod._placement(TrainConfig(devices="2,3"), True, None)["devices"] == [2]  # the first listed GPU
    # With 8 GPUs a device holds one image of the protocol's 8: BatchNorm must see all of them.
    assert train_mod._placement(TrainConfig(devices="8"), False, None)["sync_batchnorm"]
    assert not train_mod._placement(TrainConfig(devices="1"), False, None)["sync_batchnorm"]


def test_a_small_pool_fills_a_whole_batch_on_every_rank(make_seg_dataset, tmp_path):
    from types import SimpleNamespace

    from syntagen_st.core.config import TrainConfig
    from syntagen_st.segmentation.data import find_samples
    from syntagen_st.segmentation.module import SegDataModule

    samples = find_samples(make_seg_dataset(tmp_path / "d", n=3))
    module = SegDataModule(samples, TrainConfig(batch_size=4, crop_size=32, num_workers=0))
    module.trainer = SimpleNamespace(world_size=2)  # each rank's sampler takes half: 4 each
    assert len(module.train_dataloader().dataset) == 8


def _fail_on_rank_zero(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as torch_dist

    from syntagen_st.core.errors import UserError
    from syntagen_st.scaleout.dist import current

    torch_dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    dist = current()

    def bad_config():
        raise UserError("runs/x holds a run with another config")

    try:
        dist.main_first(bad_config, others=False)
        message = "no error"
    except UserError as err:
        message = f"{type(err).__name__}: {err}"
    Path(out, f"rank{rank}.txt").write_text(message)
    torch_dist.destroy_process_group()


@pytest.mark.slow
def test_an_error_on_rank_zero_alone_stops_every_rank_with_its_message(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_fail_on_rank_zero, args=(2, f"file://{tmp_path / 'init'}", str(tmp_path)), nprocs=2)
    assert (tmp_path / "rank0.txt").read_text() == "UserError: runs/x holds a run with another config"
    assert (tmp_path / "rank1.txt").read_text() == "RankFailure: rank 0 stopped: runs/x holds a run with another config"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_SCRIPT = str(Path(__file__).parent / "rank_scripts.py")


def _start_ranks(*args: str, world: int = 2) -> list[subprocess.Popen]:
    """``world`` processes started as torchrun starts them, each running ``rank_scripts.py ARGS``."""
    port = str(_free_port())
    return [subprocess.Popen([sys.executable, RANK_SCRIPT, *args], text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "RANK": str(r),
                                  "LOCAL_RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_WORLD_SIZE": str(world)})
            for r in range(world)]


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.communicate()


def test_the_line_the_other_ranks_print():
    from syntagen_st.core.errors import UserError
    from syntagen_st.scaleout.dist import RankFailure
    from syntagen_st.scaleout.watch import failure_line

    dist = Dist(rank=3, world=4)
    assert failure_line(dist, UserError("runs/x: no such folder")) == "rank 3 stopped: runs/x: no such folder"
    assert failure_line(dist, OSError(28, "No space left on device")) == \
        "rank 3 stopped: OSError: [Errno 28] No space left on device; rerun the same command to resume"
    # Ctrl-C (Lightning's training turns it into SystemExit(1)) is no error of the run.
    for interrupt in (KeyboardInterrupt(), SystemExit(1)):
        assert failure_line(dist, interrupt) == "rank 3 was interrupted; rerun the same command to resume"
    assert failure_line(dist, RankFailure("rank 1 stopped: x")) == "rank 1 stopped: x"


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [0, 1])
def test_an_error_mid_step_on_one_rank_ends_the_rank_waiting_in_a_collective(fail_rank):
    procs = _start_ranks("watched", str(fail_rank), "raise")
    waiting = procs[1 - fail_rank]
    try:
        # The failing rank lives on, so its barrier partner learns of it from the watcher alone.
        out, err = waiting.communicate(timeout=60)
    finally:
        _stop(procs)
    assert waiting.returncode == 2, (out, err)
    assert err.strip().splitlines()[-1] == (f"prog: error: rank {fail_rank} stopped: OSError: [Errno 28] No space left on "
                                            "device; rerun the same command to resume"), err
    assert "returned" not in out and "Traceback" not in err


@pytest.mark.slow
def test_the_end_waits_for_every_rank_and_a_silent_death_of_rank_zero_is_reported():
    procs = _start_ranks("watched", "-1", "none")
    results = [p.communicate(timeout=60) for p in procs]
    # Rank 0 hosts the store and ended first: rank 1 must not take that for a death.
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(out.strip() == "returned" and "error" not in err for out, err in results), results

    procs = _start_ranks("watched", "1", "late")  # rank 0 is done when rank 1 fails: it must not end well
    try:
        out, err = procs[0].communicate(timeout=60)
    finally:
        _stop(procs)
    assert procs[0].returncode == 2 and "prog: error: rank 1 stopped: OSError" in err and "returned" not in out, (out, err)

    procs = _start_ranks("watched", "0", "die")
    try:
        out, err = procs[1].communicate(timeout=60)
    finally:
        _stop(procs)
    assert procs[1].returncode == 2 and "prog: error: rank 1: lost contact with rank 0" in err.strip().splitlines()[-1], err


@pytest.mark.slow
def test_other_ranks_take_rank_zeros_reading_of_the_run_folder(tmp_path):
    fit = [*SMALL, "--loop.rounds", "1", "--loop.generate_total", "6", "--devices", "2", "--out", str(tmp_path / "run")]
    procs = _start_ranks("blind_fit", *fit)
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        _stop(procs)
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in results]
    done = json.loads((tmp_path / "run" / "state.json").read_text())["done"]
    assert done[-1] == "final1/train" and "round0/fold1" in done
    assert len(list((tmp_path / "run" / "export" / "mask").glob("*.png"))) >= 4


def _small_disk(path: Path, size: str) -> bool:
    """A tmpfs of ``size`` at ``path`` (remounted if there), where this user may mount one."""
    path.mkdir(exist_ok=True)
    options = f"remount,size={size}" if os.path.ismount(path) else f"size={size}"
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


@pytest.mark.slow
def test_a_full_disk_under_two_ranks_is_one_line_each_and_the_rerun_finishes(tmp_path):
    disk = tmp_path / "disk"
    if not _small_disk(disk, "3m"):
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        fit = [sys.executable, "-m", "syntagen_st.fit", *SMALL, "--devices", "2", "--out", str(disk / "run")]
        full = subprocess.run(fit, capture_output=True, text=True, env=ENV)
        # 3 MB hold the pool but not a fold model's checkpoint.
        assert full.returncode == 2, full.stderr[-3000:]
        assert "Traceback" not in full.stderr and "[rank" not in full.stderr, full.stderr[-3000:]
        errors = [line for line in full.stderr.splitlines() if line.startswith("syntagen_st.fit: error:")]
        assert len(errors) == 2 and all("No space left on device" in e or "rank 0 stopped" in e or "rank 1 stopped" in e
                                        for e in errors), errors
        # Nothing half-written stays behind: no temp files, no truncated last.ckpt.
        assert not [p for p in (disk / "run").rglob("*") if p.name.endswith(".tmp") or p.name == "last.ckpt"]
        assert _small_disk(disk, "200m")
        done = subprocess.run(fit, capture_output=True, text=True, env=ENV)
        assert done.returncode == 0, done.stderr[-3000:]
        assert json.loads((disk / "run" / "state.json").read_text())["done"][-1] == "final2/train"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
