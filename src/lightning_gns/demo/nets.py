"""Plain ``torch.nn`` architectures of the demo tasks, free of Lightning so that benchmarks can reuse them.

Every network is built only from layers that have a per-example gradient: no BatchNorm (it couples the examples of
a batch), GroupNorm and LayerNorm instead. :class:`TinyGPT` writes its attention with plain ``nn.Linear``
projections by default, so that per-layer norm rules cover every parameter; ``attention="mha"`` swaps in
``nn.MultiheadAttention``, the layer that per-example libraries trip over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["MLP", "SmallCNN", "TinyGPT"]

Activation = Literal["gelu", "relu"]
AttentionKind = Literal["linear", "mha"]


def _activation(name: Activation) -> nn.Module:
    if name == "gelu":
        return nn.GELU()
    if name == "relu":
        return nn.ReLU()
    raise ValueError(f"Expected `activation` to be 'gelu' or 'relu', but got {name!r}.")


class MLP(nn.Module):
    """A fully connected classifier: ``depth`` hidden layers of width ``hidden``.

    Args:
        in_features: size of a flattened input example.
        num_classes: number of output logits.
        hidden: width of every hidden layer.
        depth: number of hidden layers (at least 1).
        activation: ``"gelu"`` or ``"relu"``.
        layer_norm: put a ``LayerNorm`` before each hidden activation.

    Raises:
        ValueError: if ``depth`` < 1 or ``activation`` is unknown.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: int = 128,
        depth: int = 2,
        activation: Activation = "gelu",
        layer_norm: bool = False,
    ) -> None:
        super().__init__()
        if depth < 1:
            raise ValueError(f"Expected `depth` >= 1, but got {depth}.")
        layers: list[nn.Module] = []
        width = in_features
        for _ in range(depth):
            layers.append(nn.Linear(width, hidden))
            if layer_norm:
                layers.append(nn.LayerNorm(hidden))
            layers.append(_activation(activation))
            width = hidden
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[N, *]`` inputs (flattened to ``[N, in_features]``) to ``[N, num_classes]`` logits."""
        return self.net(x.flatten(1))


class SmallCNN(nn.Module):
    """A small convolutional classifier: 3×3 convolutions with GroupNorm, then a linear head.

    The first stage keeps the resolution, each later stage halves it (stride 2). An adaptive average pool brings
    the last feature map to ``pool_size``×``pool_size`` so that the head does not depend on the image size.

    Args:
        in_channels: channels of the input images.
        num_classes: number of output logits.
        channels: output channels of each convolution stage.
        groups: GroupNorm groups; must divide every entry of ``channels``.
        activation: ``"gelu"`` or ``"relu"``.
        pool_size: side of the pooled feature map fed to the head.

    Raises:
        ValueError: if ``channels`` is empty or ``groups`` does not divide one of its entries.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        channels: Sequence[int] = (16, 32),
        groups: int = 4,
        activation: Activation = "gelu",
        pool_size: int = 4,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("Expected at least one entry in `channels`, but got none.")
        if any(c % groups for c in channels):
            raise ValueError(f"Expected `groups` to divide every entry of `channels`, but got {groups} and {channels}.")
        layers: list[nn.Module] = []
        width = in_channels
        for stage, out in enumerate(channels):
            layers += [
                nn.Conv2d(width, out, kernel_size=3, stride=1 if stage == 0 else 2, padding=1),
                nn.GroupNorm(groups, out),
                _activation(activation),
            ]
            width = out
        layers += [nn.AdaptiveAvgPool2d(pool_size), nn.Flatten(), nn.Linear(width * pool_size**2, num_classes)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        """Map ``[N, C, H, W]`` images to ``[N, num_classes]`` logits."""
        return self.net(x)


class _LinearCausalSelfAttention(nn.Module):
    """nanoGPT-style attention: every parameter sits in an ``nn.Linear``."""

    def __init__(self, d_model: int, n_head: int) -> None:
        super().__init__()
        self.n_head = n_head
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.view(n, t, self.n_head, d // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(n, t, d))


class _MHACausalSelfAttention(nn.Module):
    """The same attention through ``nn.MultiheadAttention``, whose ``in_proj_weight`` is no ``nn.Linear``."""

    def __init__(self, d_model: int, n_head: int, block_size: int) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d_model, n_head, batch_first=True)
        # True marks a position that may NOT be attended to: everything after the query.
        mask = torch.triu(torch.ones(block_size, block_size, dtype=torch.bool), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        mask: Tensor = self.mask  # type: ignore[assignment]
        y, _ = self.attn(x, x, x, attn_mask=mask[:t, :t], need_weights=False)
        return y


class _Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

    def __init__(self, d_model: int, n_head: int, block_size: int, mlp_ratio: int, attention: AttentionKind) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn: nn.Module
        if attention == "linear":
            self.attn = _LinearCausalSelfAttention(d_model, n_head)
        elif attention == "mha":
            self.attn = _MHACausalSelfAttention(d_model, n_head, block_size)
        else:
            raise ValueError(f"Expected `attention` to be 'linear' or 'mha', but got {attention!r}.")
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(), nn.Linear(mlp_ratio * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """A tiny decoder-only transformer language model.

    Token and learned position embeddings, ``n_layer`` pre-LayerNorm blocks (causal self-attention, GELU MLP), a
    final LayerNorm and a linear head. The head is not tied to the token embedding: a parameter shared by two
    layers would need its per-example gradient summed across both before squaring, which per-layer norm rules
    cannot do.

    Args:
        vocab_size: number of distinct tokens.
        block_size: longest sequence the position embedding covers.
        d_model: width of the residual stream.
        n_layer: number of transformer blocks.
        n_head: attention heads; must divide ``d_model``.
        mlp_ratio: hidden width of the MLP relative to ``d_model``.
        attention: ``"linear"`` (q/k/v and output projections as ``nn.Linear``) or ``"mha"``
            (``nn.MultiheadAttention``).

    Raises:
        ValueError: if ``n_head`` does not divide ``d_model`` or ``attention`` is unknown.
    """

    def __init__(
        self,
        vocab_size: int,
        block_size: int = 64,
        d_model: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        mlp_ratio: int = 4,
        attention: AttentionKind = "linear",
    ) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"Expected `n_head` to divide `d_model`, but got {n_head} and {d_model}.")
        self.block_size = block_size
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(block_size, d_model)
        self.blocks = nn.Sequential(
            *(_Block(d_model, n_head, block_size, mlp_ratio, attention) for _ in range(n_layer))
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(self, idx: Tensor) -> Tensor:
        """Map ``[N, T]`` token ids (``T <= block_size``) to ``[N, T, vocab_size]`` next-token logits."""
        t = idx.shape[-1]
        if t > self.block_size:
            raise ValueError(f"Expected sequences of at most `block_size`={self.block_size} tokens, but got {t}.")
        # Positions expanded over the batch (a view, no copy): every module then sees examples along dim 0, which
        # per-example gradient norms need.
        pos = torch.arange(t, device=idx.device).expand(idx.shape[0], t)
        x = self.tok_emb(idx) + self.pos_emb(pos)
        return self.head(self.ln_f(self.blocks(x)))
