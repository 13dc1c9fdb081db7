"""Whether calling a module runs exactly its standard torch class's forward: the test the fused
engine (which writes those forwards out by hand) and the saturation-safe loss (which replaces one)
share."""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["overrides_forward", "hooks_reason"]


# The layer and loss classes the fused engine writes out by hand: a subclass that overrides their
# forward computes something else and must go to the generic engine.
_KNOWN_FORWARDS = (nn.Sequential, nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.LeakyReLU, nn.GELU, nn.Tanh, nn.Sigmoid,
                   nn.SiLU, nn.Flatten, nn.Dropout, nn.Identity, nn.CrossEntropyLoss, nn.MSELoss)


def overrides_forward(module: Any) -> bool:
    """True when calling ``module`` may run something other than its standard class's forward: a
    subclass's forward, ``__call__`` or ``_call_impl``; a ``forward``/``_call_impl`` set on the
    instance (``m.forward = ...``); a Sequential subclass that iterates its children otherwise
    (Sequential.forward is ``for m in self``)."""
    if not isinstance(module, nn.Module):
        return False
    if "forward" in vars(module) or "_call_impl" in vars(module):
        return True
    cls = type(module)
    if cls.__call__ is not nn.Module.__call__ or cls._call_impl is not nn.Module._call_impl:
        return True
    for base in _KNOWN_FORWARDS:
        if isinstance(module, base):
            if base is nn.Sequential and cls.__iter__ is not nn.Sequential.__iter__:
                return True
            return cls.forward is not base.forward
    return False


_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


def hooks_reason(named: Any) -> str | None:
    """Why hooks rule the fused engine out, or None.  It never calls the modules, so it would run
    neither a forward hook (which may change outputs) nor a backward hook (which may change the
    gradients autograd, and the generic engine, differentiate): either would make the two engines
    disagree.  ``named``: ``(name, module)`` pairs (the model's modules and the loss module)."""
    from torch.nn.modules import module as _module

    for attr in _GLOBAL_HOOKS:
        if getattr(_module, attr, None):
            kind = "forward" if "forward" in attr else "backward"
            return (f"global module {kind} hooks are registered (torch.nn.modules.module.register_module_{kind}_*hook),"
                    " which the fused engine would not run")
    for name, m in named:
        if any(getattr(m, attr, None) for attr in _MODULE_HOOKS):
            kind = "forward" if (m._forward_hooks or m._forward_pre_hooks) else "backward"
            return f"{name} has {kind} hooks, which the fused engine would not run"
    return None
