"""The names that the callbacks log and the report reads back, and their defaults: one place for both sides.

Every logged key is ``log_key_prefix`` (default :data:`DEFAULT_PREFIX`) followed by one of the names below
(docs/tags.md says what each value is). :class:`~lightning_gns.NoiseScaleMonitor` logs :data:`ESTIMATES`,
:data:`COUNTS`, :data:`HORIZON_EXAMPLES`, :data:`PRECONDITIONED` and, with ``per_layer=True``, :func:`layer_b_simple`;
batch-size growth adds :data:`GROWTH`. The report (:mod:`lightning_gns.report`) imports this module, never the
callbacks: it reads logs, and needs no Lightning callback to do so.

Example::

    >>> DEFAULT_PREFIX + B_SIMPLE, DEFAULT_PREFIX + layer_b_simple("net.0")
    ('gns/b_simple', 'gns/layer/net.0/b_simple')
"""

from __future__ import annotations

#: The default ``log_key_prefix`` of the monitor, and the default ``--prefix`` of ``lightning-gns report``.
DEFAULT_PREFIX = "gns/"
#: Steps' worth of examples (at the first step's batch size) that the moving average remembers by default.
DEFAULT_HORIZON_STEPS = 100

# -- the monitor's estimates, at every logging step --------------------------------------------------------------
B_SIMPLE = "b_simple"
B_SIMPLE_LOWER = "b_simple_lower"
B_SIMPLE_UPPER = "b_simple_upper"
B_SIMPLE_STD = "b_simple_std"
TRACE_SIGMA = "trace_sigma"
GRAD_SQ_NORM = "grad_sq_norm"
B_CRIT = "b_crit"
BATCH_SIZE = "batch_size"
EXAMPLES = "examples"
#: The estimates, in the order the monitor logs them (also the keys of ``monitor.estimates`` it logs).
ESTIMATES = (
    B_SIMPLE,
    B_SIMPLE_LOWER,
    B_SIMPLE_UPPER,
    B_SIMPLE_STD,
    TRACE_SIGMA,
    GRAD_SQ_NORM,
    B_CRIT,
    BATCH_SIZE,
    EXAMPLES,
)

# -- the monitor's counters and settings ------------------------------------------------------------------------
NUM_SKIPPED = "num_skipped"
STEPS_SINCE_ESTIMATE = "steps_since_estimate"
COUNTS = (NUM_SKIPPED, STEPS_SINCE_ESTIMATE)
HORIZON_EXAMPLES = "horizon_examples"
PRECONDITIONED = "preconditioned"

# -- batch-size growth ------------------------------------------------------------------------------------------
LR = "lr"
LR_SCALE = "lr_scale"
ACCUMULATE_GRAD_BATCHES = "accumulate_grad_batches"
MICRO_BATCH_SIZE = "micro_batch_size"
BATCH_SIZE_TARGET = "batch_size_target"
BATCH_SIZE_CHANGES = "batch_size_changes"
#: What growth logs with the estimates, in order.
GROWTH = (LR, LR_SCALE, ACCUMULATE_GRAD_BATCHES, MICRO_BATCH_SIZE, BATCH_SIZE_TARGET, BATCH_SIZE_CHANGES)

# -- hyperparameters written to every logger at the start of a fit (``hparams.yaml``) ---------------------------
#: The gradient source in use.
SOURCE_HPARAM = "gns_source"
#: With growth: the learning-rate rule in force.
LR_SCALING_HPARAM = "lr_scaling"
#: With growth: the scheduler's policy.
GROWTH_POLICY_HPARAM = "growth_policy"
#: The moving average's horizon in examples, where a config carries it.
HORIZON_HPARAM = HORIZON_EXAMPLES


def layer_b_simple(name: str) -> str:
    """The name of one layer's B_simple (``per_layer=True``), ``name`` its qualified module name."""
    return f"{LAYER_HEAD}{name}{LAYER_TAIL}"


#: A per-layer name is ``LAYER_HEAD + <qualified module name> + LAYER_TAIL``.
LAYER_HEAD = "layer/"
LAYER_TAIL = "/b_simple"
