"""A run's rows as tables: :func:`screen` (fixed width, one screen) and :func:`markdown`. No torch.

Per timing (batch, mode): throughput (img/s; batch 1: ms per image), ``vs dense`` (img/s over the
dense model's of the same run) and ``vs limit`` (a reduced row's img/s over its limit's, the
efficiency). With kernel times, ``eff. GPU`` is the same ratio on summed kernel time.
"""

from __future__ import annotations

from .protocol import Result, Row
from .table import format_table, markdown_table, num

__all__ = ["derived", "markdown", "screen"]


def _keys(result: Result) -> list[tuple[int, str]]:
    keys: list[tuple[int, str]] = []
    for row in result.rows:
        for t in row.timings:
            if (t.batch, t.mode) not in keys:
                keys.append((t.batch, t.mode))
    return keys


def derived(result: Result, row: Row, batch: int, mode: str) -> dict:
    """img/s, ms, vs dense, vs limit (wall clock) and eff. on kernel time of one timing of ``row``."""
    t = row.timing(batch, mode)
    out = {"img_s": None, "ms": None, "vs_dense": None, "vs_limit": None, "vs_limit_gpu": None}
    if t is None or t.img_s is None:
        return out
    out.update(img_s=t.img_s, ms=t.median_ms)
    dense = result.dense(row)
    d = dense.timing(batch, mode) if dense else None
    if d is not None and d.img_s:
        out["vs_dense"] = t.img_s / d.img_s
    limit = result.limit(row)
    lim = limit.timing(batch, mode) if limit else None
    if lim is not None and lim.img_s:
        out["vs_limit"] = t.img_s / lim.img_s
        if lim.kernel_us and t.kernel_us:
            out["vs_limit_gpu"] = lim.kernel_us / t.kernel_us
    return out


def _label(batch: int, mode: str) -> str:
    return f"b{batch} {'eager' if mode == 'eager' else 'compiled' if mode == 'default' else mode}"


def _cells(result: Result, row: Row, keys: list[tuple[int, str]], gpu: set) -> list[str]:
    tokens = " / ".join(map(str, row.tokens)) if row.tokens else ""
    cells = [row.variant, tokens, num(row.gflops, ".2f")]
    for batch, mode in keys:
        d = derived(result, row, batch, mode)
        t = row.timing(batch, mode)
        speed = num(d["ms"], ".2f") if batch == 1 else num(d["img_s"], ",.0f")
        if t is not None and t.launch_bound:
            speed += "*"
        cells += [speed, num(d["vs_dense"], ".2f", ""), num(d["vs_limit"], ".3f", "")]
        if (batch, mode) in gpu:
            cells += [
                num(t.kernel_us / 1e3 if t and t.kernel_us else None, ".2f"),
                num(t.host_ms if t else None, ".2f"),
                num(d["vs_limit_gpu"], ".3f", ""),
            ]
    peak = next((t.peak_mib for t in row.timings if t.peak_mib is not None), None)
    return cells + ([num(peak, ",.0f")] if result.meta.get("device_type") == "cuda" else [])


def _table_rows(result: Result, model: str) -> tuple[list[list[str]], list[bool]]:
    keys = _keys(result)
    gpu = {(t.batch, t.mode) for r in result.rows for t in r.timings if t.kernel_us is not None}
    head = ["variant", "tokens after sites", "GFLOPs"]
    for batch, mode in keys:
        head += [f"{_label(batch, mode)} {'ms' if batch == 1 else 'img/s'}", "vs dense", "vs limit"]
        if (batch, mode) in gpu:
            head += ["GPU ms", "host ms", "eff. GPU"]
    if result.meta.get("device_type") == "cuda":
        head.append("peak MiB")
    rows = [head] + [_cells(result, r, keys, gpu) for r in result.rows if r.model == model and r.note is None]
    return rows, [False, False] + [True] * (len(head) - 2)


def _notes(result: Result) -> list[str]:
    notes = []
    for r in result.rows:
        if r.note:
            notes.append(f"{r.model} {r.variant}: {r.note}")
        for t in r.timings:
            if t.note:
                notes.append(f"{r.model} {r.variant} {_label(t.batch, t.mode)}: {t.note}")
            elif t.graph_breaks:
                notes.append(
                    f"{r.model} {r.variant} {_label(t.batch, t.mode)}: {t.graphs} graphs, "
                    f"{t.graph_breaks} graph break(s)"
                )
    if any(t.launch_bound for r in result.rows for t in r.timings):
        notes.append(
            "* launch-bound: the host took about as long to launch a call as the call took, so that "
            "wall-clock figure measures Python and launches, not kernels"
        )
    return notes


def _header(result: Result) -> list[str]:
    m, p = result.meta, result.meta.get("protocol", {})
    lines = [
        f"{m.get('device')} | torch {m.get('torch')} | timm {m.get('timm')} | triton {m.get('triton')} | "
        f"{m.get('date')}"
    ]
    amp = p.get("amp", "none")
    lines.append(
        f"{'fp32' if amp == 'none' else amp + ' autocast'}, {p.get('img_size')} px, eval, no_grad, random "
        f"inputs; median of {p.get('repeats')} repeats x {p.get('iters')} call(s) after {p.get('warmup')} "
        f"warm-up call(s)"
    )
    if m.get("device_type") == "cpu":
        before, after = m.get("load_before"), m.get("load_after")
        fmt = lambda v: " ".join(f"{x:.2f}" for x in v) if v else "n/a"  # noqa: E731
        lines.append(
            f"CPU: {m.get('cpu_count')} logical core(s), {m.get('cpu_threads')} torch thread(s); "
            f"load average before {fmt(before)}, after {fmt(after)}"
        )
    if m.get("load_note"):
        lines.append(f"Note: {m['load_note']}.")
    if "triton_kernels" in m:
        lines.append(f"tokenreduce Triton kernels: {'on' if m['triton_kernels'] else 'off'}")
    return lines


_FOOT = (
    "vs dense: img/s over the dense model's in this run. vs limit: a reduced model's img/s over its limit's "
    "(the same plan with every site a free cut x[:, :P + k]; the efficiency, at most about 1)."
)


def screen(result: Result) -> str:
    """Fixed-width tables, one per model, with the run's header and notes: for a terminal."""
    out = _header(result)
    for model in dict.fromkeys(r.model for r in result.rows):
        rows, right = _table_rows(result, model)
        out += ["", f"== {model}", format_table(rows, right)]
    out += ["", _FOOT]
    notes = _notes(result)
    return "\n".join(out + (["", "Notes:", *(f"- {n}" for n in notes)] if notes else []))


def markdown(result: Result) -> str:
    """The same as :func:`screen` as markdown tables, for docs and reports."""
    out = _header(result)
    for model in dict.fromkeys(r.model for r in result.rows):
        rows, _ = _table_rows(result, model)
        out += ["", f"### {model}", "", markdown_table(rows)]
    out += ["", _FOOT]
    notes = _notes(result)
    return "\n".join(out + (["", "Notes:", *(f"- {n}" for n in notes)] if notes else []))
