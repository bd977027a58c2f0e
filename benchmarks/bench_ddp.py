"""Overhead of the ``ddp`` source: a DDP step with its comm hook against a plain DDP step, 2 gloo processes.

Each rank builds the same model twice (one plain DDP wrapper, one with the source's comm hook), then times them in
interleaved rounds; the ratio is taken within each round and the median reported, so machine noise hits both alike.
Also reports the bytes the source keeps between steps (one float per gradient bucket: independent of model size).

Usage::

    python benchmarks/bench_ddp.py --models mlp,transformer --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).parent))
from lightning_gns.sources.base import average_over_ranks
from lightning_gns.sources.ddp import DDPSource
from models import make_task


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bench_model(name: str, rank: int, world: int, rounds: int, inner: int, flush_every: int) -> dict:
    task = make_task(name, seed=rank)
    torch.manual_seed(0)
    plain = DistributedDataParallel(task.build())
    torch.manual_seed(0)
    watched_model = task.build()
    watched = DistributedDataParallel(watched_model)
    source = DDPSource(world_size=world)
    source.attach(watched_model)
    watched.register_comm_hook(None, source.comm_hook)
    models = {"plain": plain, "ddp_source": watched}
    optimizers = {kind: torch.optim.SGD(model.parameters(), lr=0.0) for kind, model in models.items()}
    pending: list = []

    def step(kind: str) -> None:
        optimizers[kind].zero_grad()
        task.loss_fn(models[kind](task.inputs), task.targets).backward()
        if kind == "ddp_source":
            source.micro_batch_done(task.inputs.shape[0])
            pending.append(source.step_norms())
            if len(pending) == flush_every:  # what the monitor does at each logging step
                average_over_ranks(pending, world)
                pending.clear()
        optimizers[kind].step()

    for kind in ("plain", "ddp_source", "plain", "ddp_source"):  # burn-in
        step(kind)
    ratios, times = [], {"plain": [], "ddp_source": []}
    for index in range(rounds):
        # The order alternates from round to round, so that whatever the first of the two pays hits both alike.
        for kind in ("plain", "ddp_source") if index % 2 == 0 else ("ddp_source", "plain"):
            dist.barrier()
            start = time.perf_counter()
            for _ in range(inner):
                step(kind)
            times[kind].append((time.perf_counter() - start) / inner * 1e3)
        ratios.append(times["ddp_source"][-1] / times["plain"][-1])
    return {
        "plain_ms": statistics.median(times["plain"]),
        "ddp_source_ms": statistics.median(times["ddp_source"]),
        "ratio": statistics.median(ratios),
        "ratio_quartiles": statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3,
    }


def _worker(
    rank: int, world: int, port: int, models: list[str], rounds: int, inner: int, flush_every: int, out: str
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)  # two ranks share two cores
    results = {name: _bench_model(name, rank, world, rounds, inner, flush_every) for name in models}
    if rank == 0:
        Path(out).write_text(json.dumps(results, indent=2))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="mlp,transformer")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--inner", type=int, default=5)
    parser.add_argument("--flush-every", type=int, default=10, help="steps per cross-rank average (log period)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ddp_overhead.json")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    mp.start_processes(
        _worker,
        args=(2, _free_port(), models, args.rounds, args.inner, args.flush_every, str(args.out)),
        nprocs=2,
        start_method="spawn",
    )
    results = json.loads(args.out.read_text())
    lines = ["| task | plain DDP ms | with ddp source ms | × plain [interquartile range] |", "|---|---|---|---|"]
    for name, r in results.items():
        q1, _, q3 = r["ratio_quartiles"]
        lines.append(
            f"| {name} | {r['plain_ms']:.1f} | {r['ddp_source_ms']:.1f} | {r['ratio']:.3f} [{q1:.3f}, {q3:.3f}] |"
        )
    table = "\n".join(lines)
    print(table)
    args.out.with_suffix(".md").write_text(
        "# ddp source: overhead on a DDP step (2 gloo processes on CPU)\n\n"
        f"`python benchmarks/bench_ddp.py --models {args.models} --rounds {args.rounds} --inner {args.inner}`; "
        "the median over rounds of the ratio within each round, the order of the two alternating.\n\n" + table + "\n"
    )


if __name__ == "__main__":
    main()
