"""The ``per_example`` engine on library models, against exact per-example gradients from ``torch.func``.

Every model is built from a tiny config with random weights (nothing is downloaded) and called the way its users
call it: ``model(input_ids=ids, labels=ids).loss`` for Hugging Face causal LMs (which build ``position_ids`` as
``[1, T]`` inside), ``model(pixel_values=x, labels=y).loss`` for ViT, the logits and a token-mean cross entropy
for litgpt. That loss is a mean over the whole batch, so what the hooks see of example ``i`` is the gradient of its
*contribution* ``c_i`` (its token losses over the batch's token count), with ``sum_i c_i`` the batch loss.

The truth is ``vmap(grad(c_i))`` over examples with :func:`torch.func.functional_call` on a float64 copy; each
example runs as a batch of one, and ``c_i`` is computed from its logits exactly as the library computes the batch
loss (Hugging Face casts causal-LM logits to float32 before the cross entropy: so does the truth). Dropout in
training mode (ViT) is replayed: the masks of the measured batched forward are recorded by wrapping
``torch.nn.functional.dropout`` (which ``nn.Dropout`` and the eager attention both call) and multiplied back in,
example by example, in the reference. Every truth is validated first: its ``c_i`` add up to the library's loss,
and its per-example gradients add up to the batch ``.grad``.

Checked for each model:

- (a) ``norms.sq_norms()`` equals the truth (rtol 1e-6 in float64, 1e-4 in float32);
- (b) the ``.grad`` left with the engine attached equals the ``.grad`` without it;
- (c) no module is left on the ``torch.func`` fallback (no ``NormRuleFallbackWarning``): the ``test_no_fallback_*``
  functions, kept apart from the exactness tests so that either can fail alone;

and a ``torch.compile``'d ``nn.TransformerEncoder`` LM, on which the engine must either refuse at attach or give
exact norms, never a silently wrong number.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.overrides import TorchFunctionMode

from lightning_gns.sources.per_example_norms import (
    NormRuleFallbackWarning,
    PerExampleGradNorms,
    UnmeasuredParameterWarning,
)

transformers = pytest.importorskip("transformers")  # the `models` extra
try:  # the `models-litgpt` extra: its cases are skipped without it
    import litgpt
except ImportError:
    litgpt = None

pytestmark = pytest.mark.filterwarnings(
    # vmap over SDPA (the truth) runs a loop instead of a batching rule: slower, as exact.
    "ignore:There is a performance drop because we have not yet implemented the batching rule:UserWarning"
)

N, T, VOCAB = 4, 8, 50
RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}
# The engine may sum per-example weight gradients into `.grad` itself (fuse_weight_grads): the same numbers
# summed in another order.
GRAD_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}

Batch = dict[str, Tensor]


# ---------------------------------------------------------------------------------------------------- the cases


def _causal_lm_contributions(logits: Tensor, batch: Batch, n_total: int, upcast: bool) -> Tensor:
    """``c_i``: example ``i``'s next-token losses over the batch's token count (the labels are the inputs)."""
    if upcast:  # what Hugging Face's ForCausalLMLoss does before the cross entropy
        logits = logits.float()
    ids = batch["input_ids"]
    n, t = ids.shape
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return losses.view(n, t - 1).sum(1) / (n_total * (t - 1))


def _classification_contributions(logits: Tensor, batch: Batch, n_total: int) -> Tensor:
    return F.cross_entropy(logits, batch["labels"], reduction="none") / n_total


@dataclass(frozen=True)
class Case:
    """A library model, its batch, the loss as its users compute it, and the per-example decomposition."""

    name: str
    build: Callable[[], nn.Module]
    make_batch: Callable[[], Batch]
    user_loss: Callable[[nn.Module, Batch], Tensor]
    logits: Callable[[nn.Module, Batch], Tensor]
    contributions: Callable[[Tensor, Batch, int], Tensor]


def _ids_batch() -> Batch:
    return {"input_ids": torch.randint(0, VOCAB, (N, T))}


def _hf_causal_lm(name: str, build: Callable[[], nn.Module]) -> Case:
    return Case(
        name,
        build,
        _ids_batch,
        user_loss=lambda model, b: model(input_ids=b["input_ids"], labels=b["input_ids"]).loss,
        logits=lambda model, b: model(input_ids=b["input_ids"]).logits,
        contributions=lambda logits, b, n: _causal_lm_contributions(logits, b, n, upcast=True),
    )


def _gpt2() -> nn.Module:
    config = transformers.GPT2Config(
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=32,
        vocab_size=VOCAB,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return transformers.GPT2LMHeadModel(config)  # Conv1D layers, lm_head tied to wte


def _llama() -> nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        loss_type="ForCausalLM",
    )
    return transformers.LlamaForCausalLM(config)  # RMSNorm, rotary embeddings, grouped-query attention


def _bert() -> nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=32,
        num_labels=3,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return transformers.BertForSequenceClassification(config)  # position and token-type embeddings from [1, T]


def _vit() -> nn.Module:
    config = transformers.ViTConfig(
        image_size=16,
        patch_size=4,
        num_channels=3,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        # Eager attention drops attention probabilities with F.dropout, which the truth can replay; SDPA drops
        # them inside its kernel.
        attn_implementation="eager",
    )
    return transformers.ViTForImageClassification(config)  # Conv2d patches, cls token and position parameters


def _litgpt(**kwargs: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        config = litgpt.Config(n_layer=2, n_embd=32, n_head=4, block_size=32, vocab_size=VOCAB, **kwargs)
        return litgpt.GPT(config)

    return build


LITGPT_LLAMA = {
    "padded_vocab_size": 64,
    "n_query_groups": 2,
    "norm_class_name": "RMSNorm",
    "mlp_class_name": "LLaMAMLP",
    "intermediate_size": 64,
    "bias": False,
    "parallel_residual": False,
    "rotary_percentage": 1.0,
}
LITGPT_PYTHIA = {
    "padded_vocab_size": 64,
    "norm_class_name": "LayerNorm",
    "mlp_class_name": "GptNeoxMLP",
    "intermediate_size": 128,
    "bias": True,
    "parallel_residual": True,
    "rotary_percentage": 0.25,
}


def _lm_case(name: str, build: Callable[[], nn.Module]) -> Case:
    """A model called as ``model(ids) -> logits``, trained on the token mean of the next-token cross entropy."""

    def user_loss(model: nn.Module, b: Batch) -> Tensor:
        ids = b["input_ids"]
        logits = model(ids)  # litgpt's training scripts: chunked_cross_entropy(logits[:, :-1], ids[:, 1:]), a mean
        return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())

    return Case(
        name,
        build,
        _ids_batch,
        user_loss=user_loss,
        logits=lambda model, b: model(b["input_ids"]),
        contributions=lambda logits, b, n: _causal_lm_contributions(logits, b, n, upcast=False),
    )


CASES = {
    case.name: case
    for case in [
        _hf_causal_lm("gpt2", _gpt2),
        _hf_causal_lm("llama", _llama),
        Case(
            "bert",
            _bert,
            lambda: {"input_ids": torch.randint(0, VOCAB, (N, T)), "labels": torch.randint(0, 3, (N,))},
            user_loss=lambda model, b: model(input_ids=b["input_ids"], labels=b["labels"]).loss,
            logits=lambda model, b: model(input_ids=b["input_ids"]).logits,
            contributions=_classification_contributions,
        ),
        Case(
            "vit_dropout",
            _vit,
            lambda: {"pixel_values": torch.randn(N, 3, 16, 16), "labels": torch.randint(0, 3, (N,))},
            user_loss=lambda model, b: model(pixel_values=b["pixel_values"], labels=b["labels"]).loss,
            logits=lambda model, b: model(pixel_values=b["pixel_values"]).logits,
            contributions=_classification_contributions,
        ),
        _lm_case("litgpt_llama", _litgpt(**LITGPT_LLAMA)),
        _lm_case("litgpt_pythia", _litgpt(**LITGPT_PYTHIA)),
    ]
}
FLOAT32_CASES = list(CASES)


# ---------------------------------------------------------------------------------------------------- dropout


class DropoutTape:
    """Records the mask of every ``F.dropout`` call of a forward, to replay them in another."""

    def __init__(self) -> None:
        self.masks: list[Tensor] = []
        self.probs: list[float] = []

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        """Records the outermost call only.

        Under a ``TorchFunctionMode`` (the engine's op capture, for a module without a module rule: ViT's
        embeddings) ``F.dropout`` hands itself to ``handle_torch_function`` by its module-global name, which is this
        wrapper: the mode calls it again, inside the first call, for the same single draw.
        """
        original = F.dropout
        depth = 0

        def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
            nonlocal depth
            depth += 1
            try:
                out = original(input, p, training, inplace)
            finally:
                depth -= 1
            if depth == 0 and training and p > 0:
                assert not inplace
                # An input entry that is exactly zero would hide whether it was kept.
                assert bool((input != 0).all()), "dropout input with exact zeros: the mask cannot be read off"
                self.masks.append((out != 0).to(input.dtype))
                self.probs.append(p)
            return out

        with mock.patch.object(F, "dropout", dropout):
            yield

    @contextlib.contextmanager
    def replay(self, masks: list[Tensor]) -> Iterator[None]:
        """Dropout multiplies by ``masks[k] / (1 - p)`` at its ``k``-th call (as the native kernel scales)."""
        calls = iter(zip(masks, self.probs, strict=True))

        def dropout(input: Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> Tensor:
            if not (training and p > 0):
                return input
            mask, recorded_p = next(calls)
            assert p == recorded_p, "the replayed forward calls dropout in another order"
            return input * (mask.to(input.dtype) / (1 - p))

        with mock.patch.object(F, "dropout", dropout):
            yield
        assert next(calls, None) is None, "the replayed forward called dropout fewer times"


def test_the_tape_records_a_dropout_once_under_a_torch_function_mode():
    """The engine's op capture is a ``TorchFunctionMode``: ``F.dropout`` then enters the patched name twice."""

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    tape = DropoutTape()
    x = torch.randn(3, 4) + 10  # no exact zeros
    with tape.record(), Passthrough():
        out = F.dropout(x, 0.5, True)
    assert len(tape.masks) == 1
    torch.testing.assert_close(tape.masks[0], (out != 0).to(x.dtype))


# ---------------------------------------------------------------------------------------------------- truth


def _float64(batch: Batch) -> Batch:
    return {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


class _Logits(nn.Module):
    """The case's logits as a module, for :func:`functional_call` (parameter names gain the prefix ``model.``)."""

    def __init__(self, case: Case, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.case = case

    def forward(self, batch: Batch) -> Tensor:
        return self.case.logits(self.model, batch)


def exact_per_example_grads(
    case: Case, model: nn.Module, batch: Batch, tape: DropoutTape | None
) -> tuple[dict[str, Tensor], Tensor]:
    """Per-example gradients ``{name: [N, *shape]}`` of the ``c_i`` (float64), and the ``c_i`` of the batch."""
    reference = _Logits(case, copy.deepcopy(model).double())
    batch = _float64(batch)
    params = {name: p.detach() for name, p in _trainable(reference).items()}
    buffers = dict(reference.named_buffers())
    masks = tape.masks if tape is not None else []

    def replay(example_masks: list[Tensor]) -> contextlib.AbstractContextManager[None]:
        return tape.replay(example_masks) if tape is not None else contextlib.nullcontext()

    def contribution(p: dict[str, Tensor], example: Batch, example_masks: list[Tensor]) -> Tensor:
        one = {k: v.unsqueeze(0) for k, v in example.items()}  # a batch of one: HF builds the same [1, T] positions
        with replay(example_masks):
            logits = functional_call(reference, (p, buffers), (one,))
        return case.contributions(logits, one, N)[0]

    grads = vmap(grad(contribution), in_dims=(None, 0, 0))(params, batch, masks)
    with replay(masks), torch.no_grad():
        contributions = case.contributions(reference(batch), batch, N)
    prefix = len("model.")
    return {name[prefix:]: g for name, g in grads.items()}, contributions


def _sq_norms(grads: dict[str, Tensor]) -> Tensor:
    return torch.stack([g.double().square().flatten(1).sum(1) for g in grads.values()]).sum(0)


def _grad_errors(got: dict[str, Tensor], want: dict[str, Tensor]) -> dict[str, float]:
    """Per parameter ``|got - want| / |want|``, as norms.

    As norms, not entry by entry: Llama's RMSNorm (Hugging Face: its input side; litgpt: all of it) and its rotary
    tables compute in float32 even in a float64 model, so single entries differ at float32 rounding. A parameter
    whose gradient is zero but for rounding (a key bias: softmax ignores what it adds) is measured against a
    millionth of the whole gradient instead.
    """
    floor = 1e-6 * float(torch.cat([w.double().flatten() for w in want.values()]).norm())
    return {
        n: float((got[n].double() - w.double()).norm()) / max(float(w.double().norm()), floor) for n, w in want.items()
    }


# ---------------------------------------------------------------------------------------------------- runs

SEED = 1234  # reseeded before every measured forward: runs of one test draw the same dropout masks


def _setup(name: str, dtype: torch.dtype) -> tuple[Case, nn.Module, Batch]:
    case = CASES[name]
    torch.manual_seed(0)
    model = case.build().to(dtype).train()  # train mode: dropout (ViT) is on
    batch = {k: v.to(dtype) if v.is_floating_point() else v for k, v in case.make_batch().items()}
    return case, model, batch


@dataclass
class Run:
    loss: Tensor
    grads: dict[str, Tensor]
    tape: DropoutTape
    norms: PerExampleGradNorms | None = None
    warnings: tuple[warnings.WarningMessage, ...] = ()


def _run(case: Case, model: nn.Module, batch: Batch, *, engine: bool) -> Run:
    """The user's loss and backward on a copy of ``model``, with the engine attached or not; masks recorded."""
    model = copy.deepcopy(model)
    tape = DropoutTape()
    norms = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(SEED)
        with PerExampleGradNorms(model, strict=False) if engine else contextlib.nullcontext() as norms:
            with tape.record():
                loss = case.user_loss(model, batch)
            loss.backward()
    grads = {name: p.grad.detach().clone() for name, p in _trainable(model).items() if p.grad is not None}
    return Run(loss.detach(), grads, tape, norms, tuple(caught))


def _of(caught: tuple[warnings.WarningMessage, ...], category: type[Warning]) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, category)]


_NEEDS_LITGPT = pytest.mark.skipif(litgpt is None, reason="litgpt is not installed (extra `models-litgpt`)")


def _param(name: str, *more: Any, id: str | None = None) -> Any:
    return pytest.param(name, *more, id=id or name, marks=[_NEEDS_LITGPT] if name.startswith("litgpt") else [])


ALL = [_param(n) for n in CASES]
EXACT = [_param(n, torch.float64, id=f"{n}-float64") for n in CASES] + [
    _param(n, torch.float32, id=f"{n}-float32") for n in FLOAT32_CASES
]


# ---------------------------------------------------------------------------------------------------- the truth


@pytest.mark.parametrize("name", ALL)
def test_truth_adds_up_to_the_batch(name):
    """The reference is right before anything is compared with it: its c_i and gradients sum to the batch's."""
    case, model, batch = _setup(name, torch.float64)
    plain = _run(case, model, batch, engine=False)
    assert bool(plain.tape.masks) == (name == "vit_dropout")  # the dropout case really drops
    grads, contributions = exact_per_example_grads(case, model, batch, plain.tape if plain.tape.masks else None)
    torch.testing.assert_close(contributions.sum().double(), plain.loss.double(), rtol=1e-6, atol=0)
    assert sorted(grads) == sorted(plain.grads)
    errors = _grad_errors({n: g.sum(0) for n, g in grads.items()}, plain.grads)
    assert max(errors.values()) < 1e-6, {n: e for n, e in errors.items() if e >= 1e-6}


# ---------------------------------------------------------------------------------------------------- (a), (b)


@pytest.mark.parametrize(("name", "dtype"), EXACT)
def test_norms_match_torch_func(name, dtype):
    """(a) ``sq_norms()`` of the user's mean loss equals |grad c_i|^2 of the torch.func truth."""
    case, model, batch = _setup(name, dtype)
    run = _run(case, model, batch, engine=True)
    assert run.norms is not None
    unmeasured = _of(run.warnings, UnmeasuredParameterWarning)
    assert not unmeasured, unmeasured
    grads, _ = exact_per_example_grads(case, model, batch, run.tape if run.tape.masks else None)
    exact = _sq_norms(grads)
    got = run.norms.sq_norms()
    assert got.shape == (N,)
    by_module = {k: v.tolist() for k, v in run.norms.sq_norms_by_module().items()}
    torch.testing.assert_close(
        got.double(), exact, rtol=RTOL[dtype], atol=0, msg=lambda m: f"{m}\nexact {exact.tolist()}\n{by_module}"
    )


@pytest.mark.parametrize(("name", "dtype"), EXACT)
def test_engine_leaves_grad_unchanged(name, dtype):
    """(b) ``.grad`` after the backward with the engine attached equals ``.grad`` without it."""
    case, model, batch = _setup(name, dtype)
    plain = _run(case, model, batch, engine=False)
    measured = _run(case, model, batch, engine=True)
    assert len(measured.tape.masks) == len(plain.tape.masks)
    for a, b in zip(measured.tape.masks, plain.tape.masks, strict=True):
        assert torch.equal(a, b), "the engine changed the dropout masks (it drew random numbers in the forward)"
    assert torch.equal(measured.loss, plain.loss)
    assert sorted(measured.grads) == sorted(plain.grads)
    errors = _grad_errors(measured.grads, plain.grads)
    assert max(errors.values()) < GRAD_RTOL[dtype], {n: e for n, e in errors.items() if e >= GRAD_RTOL[dtype]}


# ---------------------------------------------------------------------------------------------------- (c)


@pytest.mark.parametrize("name", ALL)
def test_no_fallback_at_attach(name):
    """(c) Every module of the model has a norm rule: none is left on the torch.func fallback."""
    _, model, _ = _setup(name, torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        PerExampleGradNorms(model, strict=False).attach().remove()
    assert _of(tuple(caught), NormRuleFallbackWarning) == []


@pytest.mark.parametrize("name", ALL)
def test_no_fallback_in_backward(name):
    """(c) Nor during the backward pass (e.g. tied weights materialised by the fallback warn there, if at all)."""
    case, model, batch = _setup(name, torch.float64)
    run = _run(case, model, batch, engine=True)
    assert _of(run.warnings, NormRuleFallbackWarning) == []


# ---------------------------------------------------------------------------------------------------- compiled


class EncoderLM(nn.Module):
    """A causal LM from ``nn.TransformerEncoder`` (nn.MultiheadAttention inside).

    Its positions are indexed batch-first (``[N, T]``), so that this model tests ``torch.compile`` alone: position
    embeddings indexed by ``[T]`` or ``[1, T]`` are what the Hugging Face cases test.
    """

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d)
        self.positions = nn.Embedding(32, d)
        layer = nn.TransformerEncoderLayer(d, heads, dim_feedforward=2 * d, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, VOCAB)

    def forward(self, ids: Tensor) -> Tensor:
        t = ids.shape[1]
        x = self.tokens(ids) + self.positions(torch.arange(t, device=ids.device).expand_as(ids))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device, dtype=x.dtype)
        return self.head(self.norm(self.encoder(x, mask=mask, is_causal=True)))


ENCODER = _lm_case("encoder_lm", EncoderLM)


@pytest.mark.parametrize("attach_to", ["compiled", "inner", "not_compiled"])
def test_compiled_encoder_is_refused_at_attach_or_exact(attach_to):
    """``torch.compile``: the engine raises at attach, or its norms are exact; never a silently wrong number.

    ``attach_to="compiled"`` hands the engine the ``OptimizedModule``; ``"inner"`` the module that was compiled,
    while the compiled wrapper is what runs; ``"not_compiled"`` is the control, eager throughout. The backend is
    ``aot_eager``: AOTAutograd traces forward and backward as Inductor would, without its code generation (minutes
    on this machine).
    """
    torch.manual_seed(0)
    model = EncoderLM().double().train()
    batch = ENCODER.make_batch()
    grads, _ = exact_per_example_grads(ENCODER, model, batch, None)
    exact = _sq_norms(grads)
    compiled = torch.compile(model, backend="aot_eager") if attach_to != "not_compiled" else model
    refusal: Exception | None = None
    try:
        engine = PerExampleGradNorms(compiled if attach_to == "compiled" else model, strict=False).attach()
    except Exception as exc:
        refusal = exc
    if refusal is not None:  # a refusal must say why
        assert "compile" in str(refusal).lower(), f"refused without naming torch.compile: {refusal!r}"
        return
    try:
        ENCODER.user_loss(compiled, batch).backward()
    finally:
        engine.remove()
    assert len(engine) == 1, "the compiled backward left no record"
    torch.testing.assert_close(engine.sq_norms().double(), exact, rtol=RTOL[torch.float64], atol=0)
