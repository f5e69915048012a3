"""Export a reduced model to ONNX or to a ``torch.export`` program (``.pt2``).

    tokenreduce.export.export(reduced, "deit_s_etps.onnx", format="onnx")
    tokenreduce.export.export(reduced, "deit_s_etps.pt2", format="pt2")

Only the inference form exports (``reduced.eval()``): tokens are really removed, so the graph
has fixed token counts per site and a batch axis that may stay dynamic. The custom operators
(``torch.ops.tokenreduce.*``) are traced as their plain-aten export forms
(:mod:`tokenreduce._export_ops`), so neither file needs tokenreduce to run: ``onnxruntime`` runs
the ``.onnx`` file, ``torch.export.load`` the ``.pt2`` one.
"""

from __future__ import annotations

import importlib.util
import logging
import pathlib
import warnings
from os import PathLike

import torch
from torch import fx, nn

from ._export_ops import export_forms
from .errors import TokenReduceError

__all__ = ["EXPORTERS", "FORMATS", "export", "output_names"]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "pt2")
EXPORTERS = ("dynamo", "torchscript")
ONNX_OPSET = 18
ONNX_SINGLE_FILE_BYTES = 1_800_000_000  # below protobuf's 2 GiB cap, with room for the graph
_ONNX_PACKAGES = {"dynamo": ("onnx", "onnxscript"), "torchscript": ("onnx",)}


def export(
    reduced: fx.GraphModule,
    path: str | PathLike,
    *,
    format: str,
    example_input: torch.Tensor | None = None,
    dynamic_batch: bool = True,
    exporter: str = "dynamo",
) -> pathlib.Path:
    """Write ``reduced`` (a module from ``tokenreduce.apply``, in eval mode) to ``path``.

    Args:
        reduced: what ``tokenreduce.apply`` returned, switched to ``eval()``.
        path: the file to write (parent folders are created).
        format: ``"onnx"`` or ``"pt2"`` (``torch.export.save``; reload with ``torch.export.load``).
        example_input: an input batch (B, 3, H, W) to trace with; default ``torch.randn(2, ...)``
            of the size ``apply`` traced. Token counts are fixed by its H and W.
        dynamic_batch: keep the batch axis symbolic (the example must then have B >= 2); False
            fixes the batch size to the example's.
        exporter: for ONNX, ``"dynamo"`` (``torch.onnx.export(..., dynamo=True)``, from the
            ``torch.export`` program) or ``"torchscript"`` (the legacy tracing exporter).

    Returns:
        The path written. Both files take one input (named ``input`` in ONNX) and return the
        model's output; with ``apply(..., aux=True)`` a flat tuple: the output, then the
        :class:`tokenreduce.Aux` fields in order (ONNX names from :func:`output_names`).
    """
    info = reduced.meta.get("tokenreduce") if isinstance(reduced, fx.GraphModule) else None
    if info is None:
        raise TypeError(f"export: expected a module returned by tokenreduce.apply, got {type(reduced).__name__}")
    if format not in FORMATS:
        raise ValueError(f"export: format must be one of {FORMATS}, got {format!r}")
    if exporter not in EXPORTERS:
        raise ValueError(f"export: exporter must be one of {EXPORTERS}, got {exporter!r}")
    if format == "pt2" and exporter != "dynamo":
        raise ValueError(
            f"export: exporter={exporter!r} applies to format='onnx' only; pt2 is written by "
            f"torch.export (leave exporter at its default 'dynamo')"
        )
    if not isinstance(dynamic_batch, bool):
        raise TypeError(f"export: dynamic_batch must be a bool, got {type(dynamic_batch).__name__}")
    if reduced.training:
        raise TokenReduceError(
            "export: the model is in training mode; only the inference form exports (tokens really "
            "removed; dTPS/DynamicViT train with fixed-length masked forms and random Gumbel masks). "
            "Call reduced.eval() before exporting."
        )
    example = _example(reduced, info, example_input, dynamic_batch)
    if format == "onnx":
        _require_onnx(exporter)
    out = pathlib.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    if format == "pt2":
        torch.export.save(_exported_program(reduced, example, dynamic_batch), out)
    elif exporter == "dynamo":
        program = _exported_program(reduced, example, dynamic_batch)
        torch.onnx.export(
            program,
            (example,),
            str(out),
            dynamo=True,
            input_names=["input"],
            output_names=output_names(reduced, example),
            opset_version=ONNX_OPSET,
            external_data=_needs_external_data(reduced),
            verbose=False,
        )
        if dynamic_batch:
            _name_batch_axis(out)
    else:
        _torchscript_onnx(reduced, example, dynamic_batch, out)
    log.info(
        "tokenreduce.export: wrote %s (%s%s, example %s, dynamic batch %s)",
        out,
        format,
        f"/{exporter}" if format == "onnx" else "",
        tuple(example.shape),
        dynamic_batch,
    )
    return out


def _example(reduced: fx.GraphModule, info, example_input: torch.Tensor | None, dynamic: bool) -> torch.Tensor:
    if example_input is None:
        param = next(reduced.parameters(), None)
        return torch.randn(
            2,
            *info.example_shape[1:],
            device=param.device if param is not None else "cpu",
            dtype=param.dtype if param is not None else torch.float32,
        )
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"export: example_input must be a tensor batch, got {type(example_input).__name__}")
    if dynamic and example_input.shape[0] < 2:
        raise ValueError(
            f"export: with dynamic_batch=True the example batch must have at least 2 images (torch.export "
            f"fixes a batch of 1 as a constant), got shape {tuple(example_input.shape)}; pass e.g. "
            f"example_input.expand(2, *example_input.shape[1:]) or dynamic_batch=False"
        )
    return example_input


def _require_onnx(exporter: str) -> None:
    missing = [m for m in _ONNX_PACKAGES[exporter] if importlib.util.find_spec(m) is None]
    if missing:
        raise ModuleNotFoundError(
            f"export: ONNX export needs {', '.join(missing)}; install them with pip install 'tokenreduce[export]'"
        )


class _FlatOutputs(nn.Module):
    """``reduced`` returning a tensor or a flat tuple of tensors: ``(out, aux)`` becomes ``(out,
    *keeps, tokens, token_keep, *hosts)``, so neither file depends on the :class:`tokenreduce.Aux`
    class."""

    def __init__(self, reduced: fx.GraphModule) -> None:
        super().__init__()
        self.reduced = reduced
        # In reduced's mode (eval): the TorchScript exporter restores the mode of the module it is
        # given on exit, which would otherwise switch `reduced` to training.
        self.train(reduced.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        out = self.reduced(x)
        return out if isinstance(out, torch.Tensor) else tuple(_leaves(out))


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def output_names(reduced: fx.GraphModule, example: torch.Tensor) -> list[str]:
    """Names of the flat outputs: ``output``, then for ``aux=True`` the :class:`tokenreduce.Aux`
    fields, per-site ones numbered (``keeps_0``, ..., ``tokens``, ``token_keep``, ``hosts_0``, ...)."""
    with torch.no_grad():
        out = reduced(example[:1])
    if isinstance(out, torch.Tensor):
        return ["output"]
    head, *rest = out if isinstance(out, tuple) else (out,)
    names = ["output"] if isinstance(head, torch.Tensor) else [f"output_{i}" for i in range(len(_leaves(head)))]
    for part in rest:
        fields = getattr(part, "_fields", None)
        if fields is None:
            names += [f"output_{len(names) + i}" for i in range(len(_leaves(part)))]
            continue
        for field in fields:
            value = getattr(part, field)
            if isinstance(value, torch.Tensor):
                names.append(field)
            else:
                names += [f"{field}_{i}" for i in range(len(_leaves(value)))]
    return names


def _exported_program(reduced: fx.GraphModule, example: torch.Tensor, dynamic: bool):
    """``torch.export`` of ``reduced`` (flat outputs) with the custom operators as their export forms."""
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    try:
        with export_forms(), torch.no_grad():
            return torch.export.export(_FlatOutputs(reduced), (example,), dynamic_shapes=shapes, strict=False)
    except TokenReduceError:
        raise
    except Exception as exc:  # re-raised with context
        raise TokenReduceError(
            f"export: torch.export could not trace the reduced {type(reduced).__name__} on an input of "
            f"shape {tuple(example.shape)}: {type(exc).__name__}: {exc}"
        ) from exc


def _name_batch_axis(path: pathlib.Path) -> None:
    """Call the dynamo exporter's batch symbol (``s77`` or so) ``batch``, as the TorchScript path does."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)  # weights in a .data file stay untouched
    symbol = model.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    if not symbol or symbol == "batch":
        return
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param == symbol:
                dim.dim_param = "batch"
    onnx.save(model, str(path))


def _needs_external_data(reduced: fx.GraphModule) -> bool:
    """ONNX files hold at most 2 GiB (protobuf); larger weights go to a ``.data`` file beside it."""
    size = sum(t.numel() * t.element_size() for t in (*reduced.parameters(), *reduced.buffers()))
    return size > ONNX_SINGLE_FILE_BYTES


def _torchscript_onnx(reduced: fx.GraphModule, example: torch.Tensor, dynamic: bool, out: pathlib.Path) -> None:
    """The legacy exporter traces ``reduced`` itself (with the export forms) into ONNX."""
    names = output_names(reduced, example)
    axes = {name: {0: "batch"} for name in ("input", *names)} if dynamic else None
    with warnings.catch_warnings():
        # The tracer warns on every Python bool taken from a tensor: the token counts and the
        # argument checks of the operators, which are constants for the example's image size.
        # The batch axis stays symbolic through `dynamic_axes` (the tests run other batch sizes).
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # The user chose the legacy exporter by name; its deprecation notice is not news.
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        with export_forms(), torch.no_grad():
            torch.onnx.export(
                _FlatOutputs(reduced),
                (example,),
                str(out),
                dynamo=False,
                input_names=["input"],
                output_names=names,
                dynamic_axes=axes,
                opset_version=ONNX_OPSET,
            )
