"""Run a function on N CPU processes with the gloo backend (test helper).

``run(fn, world, *args)`` spawns ``world`` processes that each call ``fn(rank, world, *args)``
inside an initialised gloo process group and returns the list of their return values (each
must be picklable). A failure on any rank raises here with that rank's traceback.
"""
from __future__ import annotations

import os
import pickle
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def _worker(rank, world, init_file, out_dir, fn, args, timeout_s):
    torch.set_num_threads(1)
    os.environ["DS_ACCELERATOR"] = "cpu"
    result: tuple[str, object]
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
        result = ("ok", fn(rank, world, *args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = ("error", f"rank {rank}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
    with open(os.path.join(out_dir, f"{rank}.pkl"), "wb") as f:
        pickle.dump(result, f)


def run(fn, world: int, *args, timeout_s: float = 60.0, expect_error: bool = False):
    """Spawn ``world`` gloo processes running ``fn``; return per-rank results (or errors if ``expect_error``)."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        ctx = mp.spawn(_worker, args=(world, init_file, tmp, fn, args, timeout_s), nprocs=world, join=False)
        while True:
            try:
                if ctx.join(timeout=timeout_s * 4):
                    break
            except ProcessException:
                break  # a rank died; its missing result is reported below
        results = []
        for r in range(world):
            path = os.path.join(tmp, f"{r}.pkl")
            if not os.path.exists(path):
                results.append(("error", f"rank {r}: no result (process died)"))
                continue
            with open(path, "rb") as f:
                results.append(pickle.load(f))
    if expect_error:
        return results
    errors = [msg for status, msg in results if status == "error"]
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return [value for _, value in results]
