"""The project's own gradient sources as benchmark methods (``--plugin lightning_gns_methods``).

- ``gns_per_example``: the ``per_example`` engine on every layer (norms checked against the exact ones).
- ``gns_norm_layers``: the engine on the normalisation layers only (LayerNorm/GroupNorm): the cheap signal;
  its norms cover those parameters only, so the harness reports what it leaves out.
- ``gns_accumulation``: the ``accumulation`` source's per-parameter tensor hooks plus the step's norm of
  ``.grad`` (one micro-batch per step here: the cost per backward pass is what is measured).
"""

from __future__ import annotations

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


def _accumulation(model: nn.Module, loss_fn: LossFn) -> Step:
    source = AccumulationSource(loss_divisor=1)
    source.attach(model)

    def fn(inputs: Tensor, targets: Tensor) -> None:
        loss_fn(model(inputs), targets).backward()
        source.micro_batch_done(inputs.shape[0])
        source.step_norms()
        return

    return Step(fn, close=source.detach)


register_method("gns_per_example", _engine_method(None))
register_method("gns_norm_layers", _engine_method(_NORM_LAYERS))
register_method("gns_accumulation", _accumulation)
