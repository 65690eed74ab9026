"""`deltaclip train` under torchrun: 2 CPU processes on the gloo backend (DistributedDataParallel)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from adapters_store.bases import TINY
from adapters_store.config import StoreSettings
from adapters_store.format.codec import check_against_base, read_adapter
from adapters_store.registry import Registry
from tests.synthetic_domains import make_domains


def test_two_gloo_ranks_train_one_valid_registered_adapter(tmp_path: Path, tiny) -> None:  # type: ignore[no-untyped-def]
    source, target = make_domains(tmp_path / "data", per_class=4, size=32)
    home = tmp_path / "home"
    env = {**os.environ, "DELTACLIP_HOME": str(home), "OMP_NUM_THREADS": "1"}
    env.pop("DELTACLIP_DATABASE_URL", None)
    subprocess.run(
        [sys.executable, "-m", "adapters_store.cli", "db", "upgrade"],
        env=env,
        check=True,
        capture_output=True,
    )
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp.safetensors"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
        "--master-addr", "127.0.0.1", "--master-port", str(port),
        "-m", "adapters_store.cli", "train", "--source", str(source), "--target", str(target),
        "--task", "ddp", "--base-model", TINY[0], "--base-pretrained", TINY[1], "--epochs", "2",
        "--iters", "3", "--batch-size", "4", "--lr", "1e-4", "--head-lr-mult", "100", "--tau", "1e-6",
        "--max-density", "0.05", "--workers", "0", "--threads", "1", "--no-progress", "--json",
        "--device", "cpu", "--output", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # Only rank 0 reports, writes and registers.
    result = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert result["version"] == 1 and result["steps"] == 6
    sig = tiny[1]
    adapter = read_adapter(out)
    check_against_base(adapter, sig)
    assert 0 < adapter.meta.nnz <= 0.05 * sig.eligible_params
    reg = Registry.from_settings(
        StoreSettings(home=home, base_model=TINY[0], base_pretrained=TINY[1])
    )
    assert reg.list().total == 1
    reg.close()
    # The per-epoch cross-rank check ran and passed (a divergence fails the job).
    assert "diverged" not in proc.stderr


def _check_worker(rank: int, world: int, init_file: str, differ: bool, results: object) -> None:
    import torch
    import torch.distributed as dist

    from trainer.distributed import Distributed, assert_replicas_identical
    from trainer.errors import TrainError

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    tower = {"visual.w": torch.full((4,), float(rank) if differ else 1.0)}
    try:
        assert_replicas_identical(Distributed(rank, world, rank), tower, "in the test")
        results.put((rank, "identical"))  # type: ignore[attr-defined]
    except TrainError as exc:
        results.put((rank, str(exc)))  # type: ignore[attr-defined]
    finally:
        dist.destroy_process_group()


def test_diverged_ranks_are_detected_on_every_rank(tmp_path: Path) -> None:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    for differ in (False, True):
        results = ctx.Queue()
        init = tmp_path / f"init-{differ}"
        mp.start_processes(
            _check_worker, args=(2, str(init), differ, results), nprocs=2, start_method="spawn"
        )
        got = dict(results.get(timeout=60) for _ in range(2))
        if differ:
            assert all("diverged in the test" in msg for msg in got.values()), got
        else:
            assert got == {0: "identical", 1: "identical"}
