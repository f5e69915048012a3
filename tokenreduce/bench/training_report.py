"""A training-step run as tables: :func:`train_screen` (fixed width) and :func:`train_markdown`. No torch.

Per timing (eager, compiled): images/s, ms per step, ``x dense`` (img/s over the dense step's
in the same mode of the same run) and, on CUDA, the peak MiB of the timed steps (with kernel
times recorded, also the kernel-time sum and the host time of one step).
"""

from __future__ import annotations

from .protocol import Timing
from .table import format_table, markdown_table, num

__all__ = ["train_markdown", "train_screen"]


def _label(mode: str) -> str:
    return "eager" if mode == "eager" else "compiled" if mode == "default" else mode


def _modes(result) -> list[str]:
    return list(dict.fromkeys(t.mode for r in result.rows for t in r.timings))


def _speed(t: Timing | None, dense: Timing | None) -> list:
    img_s = t.img_s if t else None
    x_dense = img_s / dense.img_s if img_s and dense is not None and dense.img_s else None
    return [img_s, t.median_ms if t else None, x_dense, t.peak_mib if t else None]


def _has_kernels(result, mode: str) -> bool:
    return any(t.kernel_us for r in result.rows for t in r.timings if t.mode == mode)


def _rows(result) -> tuple[list[list[str]], list[bool]]:
    cuda = result.meta.get("device_type") == "cuda"
    modes = _modes(result)
    head = ["variant", "form", "tokens after sites", "loss"]
    for mode in modes:
        head += [f"{_label(mode)} img/s", "ms/step", "x dense"] + (["peak MiB"] if cuda else [])
        head += ["GPU ms", "host ms"] if _has_kernels(result, mode) else []
        head += ["compile s"] if mode != "eager" else []
    dense = result.dense()
    out = [head]
    for r in result.rows:
        if r.note is not None:
            continue
        cells = [r.variant, r.form, " / ".join(map(str, r.tokens)) if r.tokens else "", " + ".join(r.loss_terms)]
        for mode in modes:
            t = r.timing(mode)
            img_s, ms, x_dense, peak = _speed(t, dense.timing(mode) if dense else None)
            speed = num(img_s, ",.0f") + ("*" if t is not None and t.launch_bound else "")
            cells += [speed, num(ms, ".2f"), num(x_dense, ".3f", "")] + ([num(peak, ",.0f")] if cuda else [])
            if _has_kernels(result, mode):
                gpu_ms = t.kernel_us / 1e3 if t is not None and t.kernel_us else None
                cells += [num(gpu_ms, ".2f"), num(t.host_ms if t else None, ".2f")]
            cells += [num(t.compile_s if t else None, ".0f")] if mode != "eager" else []
        out.append(cells)
    return out, [False] * 4 + [True] * (len(head) - 4)


def _notes(result) -> list[str]:
    notes = []
    for r in result.rows:
        if r.note:
            notes.append(f"{r.variant}: {r.note}")
        if r.checks and not r.checks["ok"]:
            notes.append(f"{r.variant}: CHECK FAILED: {'; '.join(r.checks['problems'])}")
        for t in r.timings:
            if t.note:
                notes.append(f"{r.variant} {_label(t.mode)}: {t.note}")
            if t.graph_breaks:
                notes.append(f"{r.variant} {_label(t.mode)}: {t.graphs} graphs, {t.graph_breaks} graph break(s)")
    if any(t.launch_bound for r in result.rows for t in r.timings):
        notes.append("* launch-bound: launching a step took the host about as long as the step took")
    return notes


def _header(result) -> list[str]:
    m, p = result.meta, result.meta.get("protocol", {})
    amp = "fp32" if p.get("amp") == "none" else f"{p.get('amp')} autocast"
    shape = next((r.input_shape for r in result.rows if r.input_shape), None)
    size = f"{shape[1]} x {shape[2]} x {shape[3]}" if shape else p.get("img_size")
    lines = [
        f"{m.get('device')} | torch {m.get('torch')} | timm {m.get('timm')} | triton {m.get('triton')} | "
        f"{m.get('date')}",
        f"{m.get('model')}: one training step (forward, loss, backward, timm AdamW step), batch {p.get('batch')}, "
        f"{amp}, {size} input, train mode, random inputs, keep {p.get('keep_ratio')}"
        f"{', teacher distillation' if p.get('distill') else ', no teacher'}; median of {p.get('repeats')} repeats "
        f"x {p.get('iters')} step(s) after {p.get('warmup')} warm-up step(s)",
    ]
    if m.get("device_type") == "cpu":
        lines.append(
            f"CPU: {m.get('cpu_count')} core(s), {m.get('cpu_threads')} thread(s); load after {m.get('load_after')}"
        )
    return lines


_FOOT = (
    "form: masked = full length with policy-masked attention (dTPS, DynamicViT training), dropped = tokens "
    "really removed (eTPS, EViT). x dense: img/s over the dense step's in the same mode. peak MiB: "
    "max_memory_allocated over the timed steps (weights, gradients, AdamW state, activations). GPU ms: the "
    "kernel-time sum of one step; host ms: the time to launch one step onto an idle GPU."
)


def train_screen(result) -> str:
    """Fixed-width table with the run's header and notes, for a terminal."""
    rows, right = _rows(result)
    notes = _notes(result)
    out = [*_header(result), "", format_table(rows, right), "", _FOOT]
    return "\n".join(out + (["", "Notes:", *(f"- {n}" for n in notes)] if notes else []))


def train_markdown(result) -> str:
    """The same as :func:`train_screen` as a markdown table."""
    rows, _ = _rows(result)
    notes = _notes(result)
    out = [*_header(result), "", markdown_table(rows), "", _FOOT]
    return "\n".join(out + (["", "Notes:", *(f"- {n}" for n in notes)] if notes else []))
