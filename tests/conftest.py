"""Shared fixtures: seeds, and a gloo process group for multi-process tests on CPU."""

from __future__ import annotations

import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist

NUM_PROCESSES = 2


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def setup_ddp(rank: int, world_size: int, port: int) -> None:
    """Join a gloo process group on localhost (CPU): what torchmetrics' own tests do."""
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    # A collective that never completes raises after a minute (gloo honours the timeout) instead of hanging the
    # test until pytest-timeout kills it without a trace.
    dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
