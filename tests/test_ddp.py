"""Two gloo processes on the CPU train the same model and end with identical weights.

The rendezvous store is hosted by the test process, as torchrun's agent hosts it
(``TORCHELASTIC_USE_AGENT_STORE``): the workers are only its clients, so rank 0 finishing
first cannot pull the store from under rank 1 while it leaves the process group.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world: int, port: int, out: str) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        TORCHELASTIC_USE_AGENT_STORE="True",
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
    from napari_medseg.engine.train.distributed import shutdown

    shutdown()


def test_two_gloo_ranks_end_identical(tmp_path):
    # Port 0: the OS picks a free port while the store binds it (no race with other tests).
    store = dist.TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=60)
    )
    mp.spawn(_worker, args=(2, store.port, str(tmp_path)), nprocs=2, join=True)
    del store
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
