"""Hooks and tracing: which hooks survive ``capture`` and which are refused.

Tracing runs through every module that is not a leaf, so the reduced graph no longer calls those
modules: a forward hook there would run once on ``Proxy`` objects during the trace and never
again. Hooks on leaf modules are kept, since the graph still calls them. Refusing the rest, with
the hooked paths in the message, beats a feature extractor that silently stops collecting.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from .errors import TokenReduceError

__all__ = ["check_hooks", "hooked_modules"]

_HOOK_KINDS = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
)
_GLOBAL_HOOKS = (
    ("_global_forward_pre_hooks", "register_module_forward_pre_hook"),
    ("_global_forward_hooks", "register_module_forward_hook"),
    ("_global_backward_pre_hooks", "register_module_full_backward_pre_hook"),
    ("_global_backward_hooks", "register_module_full_backward_hook"),
)


def hooked_modules(model: nn.Module, tracer: fx.Tracer) -> list[str]:
    """The modules of ``model`` that tracing flattens away and that carry hooks, as
    ``"path (Class): kinds"`` (the root is ``"<root>"``).

    Tracing runs through every module that is not a leaf: a hook there would run once on
    ``Proxy`` objects (leaving dead nodes) and never fire on the reduced model, whose graph no
    longer calls that module. Hooks on leaf modules (``nn.Linear``, ``nn.LayerNorm``, registered
    leaves and everything inside them) are kept: the reduced graph still calls those modules, so
    their hooks fire, seeing the reduced token count.
    """
    found: list[str] = []

    def walk(mod: nn.Module, path: str) -> None:
        if path and tracer.is_leaf_module(mod, path):
            return
        kinds = [kind for attr, kind in _HOOK_KINDS if getattr(mod, attr, None)]
        if kinds:
            found.append(f"{path or '<root>'} ({type(mod).__name__}): {', '.join(kinds)}")
        for name, child in mod.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(model, "")
    return found


def _user_hook(hook: Callable) -> bool:
    """A hook not from torch itself: torch's ``FlopCounterMode`` / ``ModuleTracker`` register
    global hooks for the length of a count (possibly in another thread) and ignore proxies."""
    module = getattr(getattr(hook, "__func__", hook), "__module__", None) or ""
    return not (module == "torch" or module.startswith("torch."))


def check_hooks(model: nn.Module, tracer: fx.Tracer) -> None:
    """Refuse global module hooks and hooks on modules ``tracer`` traces through."""
    from torch.nn.modules import module as torch_module

    active = [fn for attr, fn in _GLOBAL_HOOKS if any(map(_user_hook, getattr(torch_module, attr, {}).values()))]
    if active:
        raise TokenReduceError(
            f"capture: global module hooks are registered (torch.nn.modules.module.{', '.join(active)}): "
            f"they would run on tracing proxies for every block and never fire for the blocks of the reduced "
            f"model. Remove them (handle.remove()) before tokenreduce.apply/inspect and register them again after."
        )
    hooked = hooked_modules(model, tracer)
    if hooked:
        raise TokenReduceError(
            f"capture: {len(hooked)} module(s) that tracing flattens away carry hooks: {'; '.join(hooked)}. "
            f"They would run once on tracing proxies and never fire on the reduced model, whose graph no longer "
            f"calls them. Remove them (handle.remove()) before tokenreduce.apply/inspect; on the reduced model, "
            f"hook a leaf module it still calls (e.g. reduced.get_submodule('blocks.3.mlp.fc2')) or use "
            f"apply(..., aux=True) for the final tokens. Hooks on leaf modules (nn.Linear, nn.LayerNorm, ...) "
            f"are kept and need not be removed."
        )
