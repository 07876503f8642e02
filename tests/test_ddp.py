"""Two gloo processes on the CPU train the same model and end with identical weights."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import torch
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    import numpy as np

    from conftest import disc_image
    from toy import ToySegmenter

    images, labels = zip(*[disc_image(seed=i, center=(20 + 6 * i, 30)) for i in range(4)])
    seg = ToySegmenter(device="cpu")
    for _ in seg.finetune(np.stack(images), np.stack(labels), steps=4, seed=rank * 0 + 5, val_fraction=0.25):
        pass
    torch.save({k: v.clone() for k, v in seg.checkpoint_tensors().items()}, f"{out}/rank{rank}.pt")
    import torch.distributed as dist

    dist.destroy_process_group()


def test_two_gloo_ranks_end_identical(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and they trained: weights moved away from a fresh model's
    sys.path.insert(0, str(Path(__file__).parent))
    from toy import ToySegmenter

    torch.manual_seed(5)
    fresh = ToySegmenter(device="cpu").checkpoint_tensors()
    assert any(not torch.equal(a[k], fresh[k]) for k in a if a[k].is_floating_point())
