"""The project's own gradient sources as benchmark methods (``--plugin lightning_gns_methods``).

- ``gns_per_example``: the ``per_example`` engine on every layer (norms checked against the exact ones).
- ``gns_norm_layers``: the engine on the normalisation layers only (LayerNorm/GroupNorm): the cheap signal;
  its norms cover those parameters only, so the harness reports what it leaves out.
- ``plain_accumulation``: the batch as two micro-batches of half the size (the loss of each divided by 2, as
  Lightning does with ``accumulate_grad_batches=2``), no measurement: the reference of the next one.
- ``gns_accumulation``: the same two micro-batches with the ``accumulation`` source's per-parameter tensor hooks,
  its per-micro-batch bookkeeping and the step's norm of ``.grad``: the source only runs with at least two
  micro-batches per step, so it is divided by ``plain_accumulation``, not by the one-batch plain step.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from bench_overhead import register_method
from lightning_gns.sources.accumulation import AccumulationSource
from lightning_gns.sources.per_example_norms import PerExampleGradNorms
from peers import LossFn, Step

_NORM_LAYERS = (nn.LayerNorm, nn.GroupNorm)


def _engine_method(include: tuple[type[nn.Module], ...] | None):
    def factory(model: nn.Module, loss_fn: LossFn) -> Step:
        engine = PerExampleGradNorms(model, include=include).attach()

        def fn(inputs: Tensor, targets: Tensor) -> Tensor | None:
            loss = loss_fn(model(inputs), targets)
            loss.backward()
            records = engine.pop()
            if not records:  # nothing to measure (no layer of the included types)
                return None
            # The loss is a mean over the batch: the hooks saw g_i / N.
            return records[0].sq_norms * inputs.shape[0] ** 2

        covered = set()
        if include is not None:
            for module in model.modules():
                if isinstance(module, include):
                    covered |= {id(p) for p in module.parameters()}
        skipped = [
            n for n, p in model.named_parameters() if p.requires_grad and include is not None and id(p) not in covered
        ]
        return Step(fn, skipped=skipped, close=engine.remove)

    return factory


_MICRO_BATCHES = 2


def _micro_batches(model: nn.Module, loss_fn: LossFn, inputs: Tensor, targets: Tensor, source: Any) -> None:
    for chunk_inputs, chunk_targets in zip(inputs.chunk(_MICRO_BATCHES), targets.chunk(_MICRO_BATCHES), strict=True):
        (loss_fn(model(chunk_inputs), chunk_targets) / _MICRO_BATCHES).backward()
        if source is not None:
            source.micro_batch_done(chunk_inputs.shape[0])


def _plain_accumulation(model: nn.Module, loss_fn: LossFn) -> Step:
    def fn(inputs: Tensor, targets: Tensor) -> None:
        _micro_batches(model, loss_fn, inputs, targets, None)

    return Step(fn)


def _accumulation(model: nn.Module, loss_fn: LossFn) -> Step:
    source = AccumulationSource(loss_divisor=_MICRO_BATCHES)
    source.attach(model)

    def fn(inputs: Tensor, targets: Tensor) -> None:
        _micro_batches(model, loss_fn, inputs, targets, source)
        source.step_norms()

    return Step(fn, close=source.detach, reference="plain_accumulation")


register_method("gns_per_example", _engine_method(None))
register_method("gns_norm_layers", _engine_method(_NORM_LAYERS))
register_method("plain_accumulation", _plain_accumulation)
register_method("gns_accumulation", _accumulation)
