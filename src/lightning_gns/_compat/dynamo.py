"""Which parts of a model run under ``torch.compile`` (TorchDynamo), read from attributes torch keeps private."""

from __future__ import annotations

from torch import nn
from torch._dynamo.eval_frame import OptimizedModule

__all__ = ["compiled_parts"]

# Bound methods that, when replaced by a compiled function, take the module's forward pass into a compiled graph.
_COMPILED_METHODS = ("forward", "training_step")


def compiled_parts(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` whose forward runs compiled, in module order.

    Finds ``torch.compile(module)`` (an ``OptimizedModule`` in the tree), ``module.compile()``, a method replaced
    by ``torch.compile(module.forward)``, a LightningModule handed to ``Trainer.fit`` compiled (Lightning keeps
    the compiler in ``_compiler_ctx``), and, where torch marks it, a module handed to ``torch.compile`` whose
    compiled wrapper is kept outside the tree (``compiled = torch.compile(model)``, then ``model`` measured while
    ``compiled`` runs it). The root is named ``"(model)"``. Code compiled inside ``training_step`` (a compiled
    function called there) cannot be seen from the modules.

    Checked on torch 2.5.0-2.13.0 (``torch._dynamo.eval_frame.OptimizedModule``, ``nn.Module._compiled_call_impl``
    from 2.2, ``_torchdynamo_orig_callable``) and Lightning 2.6.0-2.6.6 (``_compiler_ctx``). The wrapped module's
    mark, ``_is_torch_compile``, is set by torch 2.13.0 (``torch.compile`` sets it on the ``OptimizedModule``,
    which forwards the attribute to the module it wraps) and not by 2.5.0. Every check is a ``getattr`` with a
    default: a torch that renames one stops detecting that form of compilation, it never raises.

    Example::

        >>> import torch
        >>> from torch import nn
        >>> net = nn.Sequential(nn.Linear(2, 2), torch.compile(nn.Linear(2, 2)))
        >>> compiled_parts(net)
        ['1']
    """
    found = []
    for name, module in model.named_modules():
        compiled = (
            isinstance(module, OptimizedModule)
            or getattr(module, "_compiled_call_impl", None) is not None  # nn.Module.compile()
            or getattr(module, "_compiler_ctx", None) is not None  # Lightning's from_compiled
            or getattr(module, "_is_torch_compile", False) is True  # handed to torch.compile, wrapper elsewhere
            or any(hasattr(getattr(module, m, None), "_torchdynamo_orig_callable") for m in _COMPILED_METHODS)
        )
        if compiled:
            found.append(name or "(model)")
    # The modules inside a compiled one are compiled with it: name only the outermost.
    if "(model)" in found:
        return ["(model)"]
    return [n for n in found if not any(n.startswith(f"{outer}.") for outer in found)]
