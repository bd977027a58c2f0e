"""The private torch and Lightning internals of `lightning_gns._compat`, one test per function.

Each test pins what the function returns on the installed versions, so that a torch or Lightning upgrade that
moves an internal fails here, in one named place, rather than deep in a monitor run.
"""

import datetime
import importlib
import inspect
import pkgutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader

import lightning_gns._compat as compat
from lightning_gns._compat.amp import grad_scaler_scale
from lightning_gns._compat.autograd import (
    as_non_view,
    current_graph_task_id,
    is_view,
    queue_engine_callback,
    saved_mean_rstd,
    saved_operand,
    saved_reduction,
    saved_tensors_hooks_active,
    will_engine_execute,
)
from lightning_gns._compat.dynamo import compiled_parts
from lightning_gns._compat.lightning import (
    LightningInternalsError,
    batches_that_stepped,
    ddp_comm_state,
    replace_ddp_comm_hook,
    replace_train_dataloaders,
    restart_train_fetcher,
    set_train_fetcher_length,
    train_dataloaders,
    validates_by_time,
)
from lightning_gns._compat.nn import (
    BatchNormBase,
    ConvBase,
    InstanceNormBase,
    conv_padding_for_pad,
    instance_norm_batched_dims,
    mha_shape_check,
)
from lightning_gns._compat.pytree import tree_leaves, tree_map
from lightning_gns._compat.tensors import fused_norms


def _compat_functions():
    for info in pkgutil.iter_modules(compat.__path__):
        module = importlib.import_module(f"{compat.__name__}.{info.name}")
        for name in module.__all__:
            obj = getattr(module, name)
            if inspect.isfunction(obj):
                yield module.__name__, name, obj


def test_every_compat_function_says_where_it_was_checked_and_has_a_test():
    source = Path(__file__).read_text()
    functions = list(_compat_functions())
    assert len(functions) >= 10
    for module, name, function in functions:
        assert "Checked on" in (function.__doc__ or ""), f"{module}.{name}: say which versions it was checked on"
        assert f"def test_{name}" in source, f"{module}.{name} has no `test_{name}` in tests/test_compat.py"


# -- torch ------------------------------------------------------------------------------------------------------


def test_compiled_parts():
    net = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)))
    assert compiled_parts(net) == []
    net[1] = torch.compile(net[1])
    assert compiled_parts(net) == ["1"]
    assert compiled_parts(torch.compile(net)) == ["(model)"]
    # A module handed to torch.compile, its wrapper kept outside: found where torch marks it (2.13.0, not 2.5.0).
    inner = nn.Linear(2, 2)
    wrapper = torch.compile(inner)
    assert compiled_parts(wrapper) == ["(model)"]
    marked = vars(inner).get("_is_torch_compile", False) is True
    if torch.__version__ >= (2, 13):
        assert marked
    assert compiled_parts(inner) == (["(model)"] if marked else [])


def test_grad_scaler_scale():
    assert grad_scaler_scale(None) is None
    assert grad_scaler_scale(torch.amp.GradScaler("cpu", enabled=False)) is None
    scaler = torch.amp.GradScaler("cpu", init_scale=16.0)
    assert grad_scaler_scale(scaler) is None  # nothing scaled yet
    scaler.scale(torch.ones(()))
    scale = grad_scaler_scale(scaler)
    assert isinstance(scale, torch.Tensor)
    assert scale.item() == 16.0


def test_fused_norms():
    tensors = [torch.randn(3, 4), torch.randn(5, dtype=torch.float64), torch.zeros(2)]
    norms = fused_norms(tensors)
    assert len(norms) == 3
    for norm, tensor in zip(norms, tensors, strict=True):
        assert norm.dtype == tensor.dtype
        torch.testing.assert_close(norm, torch.linalg.vector_norm(tensor))


def test_saved_reduction():
    x, target = torch.randn(4, 3, requires_grad=True), torch.tensor([0, 1, 2, 0])
    assert saved_reduction(F.cross_entropy(x, target).grad_fn) == 1
    assert saved_reduction(F.cross_entropy(x, target, reduction="sum").grad_fn) == 2
    assert saved_reduction(F.mse_loss(x, torch.zeros(4, 3)).grad_fn) == 1
    assert saved_reduction(F.binary_cross_entropy_with_logits(x, torch.ones(4, 3), reduction="sum").grad_fn) == 2
    assert saved_reduction(x.mean().grad_fn) is None
    assert saved_reduction(None) is None


def test_saved_operand():
    x = torch.ones(3, requires_grad=True)
    assert saved_operand((x.sum() / 4).grad_fn, "other") == 4
    assert saved_operand((x.sum() * 0.5).grad_fn, "other") == 0.5
    constant = torch.tensor(3.0)
    assert torch.equal(saved_operand((constant * x.sum()).grad_fn, "self"), constant)
    assert torch.equal(saved_operand((x.sum() * constant).grad_fn, "other"), constant)
    assert saved_operand(x.sum().grad_fn, "other") is None
    with pytest.raises(ValueError, match="`which` to be 'self' or 'other'"):
        saved_operand(x.sum().grad_fn, "left")


def test_saved_mean_rstd():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    mean, rstd = saved_mean_rstd(F.layer_norm(x, (4,)).grad_fn)
    torch.testing.assert_close(mean.flatten(), x.mean(1).detach())
    torch.testing.assert_close(rstd.flatten(), (x.var(1, unbiased=False) + 1e-5).rsqrt().detach())
    images = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    mean, rstd = saved_mean_rstd(F.group_norm(images, 2).grad_fn)
    grouped = images.detach().reshape(2, 2, -1)
    torch.testing.assert_close(mean, grouped.mean(-1))
    torch.testing.assert_close(rstd, (grouped.var(-1, unbiased=False) + 1e-5).rsqrt())
    assert saved_mean_rstd(x.sum().grad_fn) is None
    assert saved_mean_rstd(None) is None


def test_current_graph_task_id():
    x = torch.ones(2, requires_grad=True)
    seen = []
    x.register_hook(lambda g: seen.append(current_graph_task_id()))
    x.sum().backward()
    (x * 2).sum().backward()
    assert current_graph_task_id() == -1
    assert len(seen) == 2
    assert -1 not in seen
    assert seen[0] != seen[1]


def test_will_engine_execute():
    a, b = torch.ones(2, requires_grad=True), torch.ones(2, requires_grad=True)
    nodes = [torch.autograd.graph.get_gradient_edge(t).node for t in (a, b)]
    seen = []
    a.register_hook(lambda g: seen.append([will_engine_execute(n) for n in nodes]))
    (a * 2 + b.detach()).sum().backward()
    assert seen == [[True, False]]
    with pytest.raises(RuntimeError):
        will_engine_execute(nodes[0])  # outside a backward pass


def test_queue_engine_callback():
    x = torch.ones(2, requires_grad=True)
    order = []

    def hook(grad):
        queue_engine_callback(lambda: order.append(("end", x.grad is not None)))
        order.append(("hook", x.grad is not None))

    x.register_hook(hook)
    x.sum().backward()
    assert order == [("hook", False), ("end", True)]  # after the pass accumulated .grad
    with pytest.raises(RuntimeError):
        queue_engine_callback(lambda: None)


def test_saved_tensors_hooks_active():
    # torch 2.5 cannot tell and answers True (the safe side: saved tensors are then never unpacked by the engine).
    askable = hasattr(torch._C._autograd, "_top_saved_tensors_default_hooks")
    assert askable or torch.__version__ < (2, 13)
    assert saved_tensors_hooks_active() is not askable
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert saved_tensors_hooks_active() is True
    with torch.autograd.graph.save_on_cpu():
        assert saved_tensors_hooks_active() is True
    assert saved_tensors_hooks_active() is not askable


def test_is_view():
    x = torch.ones(2, 3)
    assert is_view(x[0])
    assert is_view(x.view(3, 2))
    assert is_view(x.t())
    assert not is_view(x)
    assert not is_view(x + 1)


def test_as_non_view():
    x = torch.randn(2, 3, requires_grad=True)
    plain = x * 1
    assert as_non_view(plain) is plain
    alias = as_non_view(plain[0])
    assert not is_view(alias)
    assert torch.equal(alias, plain[0])
    grads = []
    alias.register_hook(grads.append)
    alias.relu_()  # an in-place op on the alias keeps the hook
    alias.sum().backward()
    assert len(grads) == 1
    torch.testing.assert_close(x.grad[0], (x[0] > 0).to(x.dtype))
    torch.testing.assert_close(x.grad[1], torch.zeros(3))


def test_tree_leaves():
    point = torch.return_types.max((torch.ones(1), torch.zeros(1)))
    assert tree_leaves((1, [2, {"b": 3, "a": 4}])) == [1, 2, 3, 4]
    assert len(tree_leaves(point)) == 2


def test_tree_map():
    assert tree_map(lambda v: v * 10, (1, [2, {"a": 3}])) == (10, [20, {"a": 30}])


# -- torch.nn ----------------------------------------------------------------------------------------------------


def test_nn_base_classes_cover_the_layers_the_rules_match():
    for conv in (nn.Conv1d(1, 1, 1), nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1), nn.ConvTranspose2d(1, 1, 1)):
        assert isinstance(conv, ConvBase)
    for norm in (nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.SyncBatchNorm(2)):
        assert isinstance(norm, BatchNormBase)
    for norm in (nn.InstanceNorm1d(2), nn.InstanceNorm2d(2), nn.InstanceNorm3d(2)):
        assert isinstance(norm, InstanceNormBase)
        assert not isinstance(norm, BatchNormBase)


def test_conv_padding_for_pad():
    assert conv_padding_for_pad(nn.Conv2d(1, 1, 3, padding=(1, 2))) == [2, 2, 1, 1]
    same = nn.Conv1d(1, 1, 4, padding="same")  # even kernel: the extra zero goes on the right
    x = torch.randn(1, 1, 7)
    padded = F.pad(x, conv_padding_for_pad(same))
    torch.testing.assert_close(F.conv1d(padded, same.weight, same.bias), same(x))


def test_instance_norm_batched_dims():
    assert [
        instance_norm_batched_dims(m) for m in (nn.InstanceNorm1d(2), nn.InstanceNorm2d(2), nn.InstanceNorm3d(2))
    ] == [
        3,
        4,
        5,
    ]


def test_mha_shape_check():
    check = mha_shape_check()
    assert check is not None
    x = torch.ones(5, 2, 4)
    assert check(x, x, x, None, None, 2) is True
    assert check(x[:, 0], x[:, 0], x[:, 0], None, None, 2) is False  # unbatched
    with pytest.raises(AssertionError):
        check(x, x, x, None, torch.ones(1, 1, 5, 5), 2)  # a 4-D mask


# -- Lightning --------------------------------------------------------------------------------------------------


def _hook(state, bucket):
    return bucket


def _wrapper(hook):
    def wrapped(state, bucket):
        return hook(state, bucket)

    wrapped.wraps = hook
    return wrapped


def test_ddp_comm_state():
    state = object()
    assert ddp_comm_state(DDPStrategy(ddp_comm_state=state)) is state
    assert ddp_comm_state(DDPStrategy()) is None


def test_replace_ddp_comm_hook():
    strategy = DDPStrategy(ddp_comm_hook=_hook, ddp_comm_wrapper=_wrapper)
    mine = _hook.__get__  # any other callable
    inner = replace_ddp_comm_hook(strategy, mine)
    assert inner.wraps is _hook  # the user's hook, its wrapper applied
    assert replace_ddp_comm_hook(strategy, _hook) is mine  # ours is now the strategy's, without a wrapper
    assert replace_ddp_comm_hook(DDPStrategy(), _hook) is None


def test_lightning_internals_error_names_the_internal():
    class NoFetcher:
        fit_loop = object()

    with pytest.raises(LightningInternalsError, match=r"private `_FitLoop._data_fetcher`.*checked on Lightning 2\.6"):
        restart_train_fetcher(NoFetcher())  # type: ignore[arg-type]


class _Probe(Callback):
    """Calls the fit-loop functions from inside a fit, where Lightning's internals are set up."""

    def __init__(self):
        self.seen = {}

    def on_train_start(self, trainer, pl_module):
        (loader,) = train_dataloaders(trainer)
        self.seen["loader"] = loader
        smaller = DataLoader(loader.dataset, batch_size=16)
        replace_train_dataloaders(trainer, [smaller])
        restart_train_fetcher(trainer)
        self.seen["replaced"] = train_dataloaders(trainer)[0] is smaller
        set_train_fetcher_length(trainer, 3)
        trainer.fit_loop.max_batches = 3
        self.seen["by_time"] = validates_by_time(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.setdefault("batch_sizes", []).append(len(batch))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.setdefault("stepped", []).append(batches_that_stepped(trainer))


def _fit(tmp_path, probe, **trainer_kwargs):
    trainer = Trainer(
        default_root_dir=tmp_path,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[probe],
        **trainer_kwargs,
    )
    trainer.fit(BoringModel())  # 64 examples in batches of 1 (BoringModel's loader)
    return trainer


def test_train_dataloaders(tmp_path):
    probe = _Probe()
    _fit(tmp_path, probe)
    assert isinstance(probe.seen["loader"], DataLoader)
    assert probe.seen["loader"].batch_size == 1


def test_replace_train_dataloaders(tmp_path):
    probe = _Probe()
    _fit(tmp_path, probe)
    assert probe.seen["replaced"]
    assert set(probe.seen["batch_sizes"]) == {16}  # the new loader's batches are the ones trained on


def test_restart_train_fetcher(tmp_path):
    probe = _Probe()
    _fit(tmp_path, probe)
    assert probe.seen["batch_sizes"][0] == 16  # the first batch already comes from the fresh iterator


def test_set_train_fetcher_length(tmp_path):
    probe = _Probe()
    _fit(tmp_path, probe)
    assert len(probe.seen["batch_sizes"]) == 3  # 64 examples at 16 are 4 batches; the epoch was told 3


def test_batches_that_stepped(tmp_path):
    probe = _Probe()
    _fit(tmp_path, probe, accumulate_grad_batches=1)
    # Read in on_train_batch_end, before Lightning counts the batch: the step its own logging uses there.
    assert probe.seen["stepped"] == [0, 1, 2]


def test_validates_by_time(tmp_path):
    probe = _Probe()
    _fit(tmp_path, probe)
    assert probe.seen["by_time"] is False  # a fraction of the epoch (the default, 1.0)
    try:  # durations are Lightning 2.6+
        trainer = Trainer(val_check_interval=datetime.timedelta(seconds=30), logger=False)
    except (TypeError, ValueError, MisconfigurationException):
        return
    assert validates_by_time(trainer)
