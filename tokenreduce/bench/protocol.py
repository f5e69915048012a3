"""What a benchmark run measures, and the records it writes: plain frozen/JSON-ready dataclasses.

No torch here: the report renders saved results without it.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field

__all__ = ["AMP", "MODES", "Protocol", "Result", "Row", "Timing", "Variant"]

AMP = ("bf16", "fp16", "none")
# "eager" is no compilation; the others are torch.compile(mode=...) ("default": no mode given).
MODES = ("eager", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
GRAPHED_MODES = ("reduce-overhead", "max-autotune")  # the compile modes that replay CUDA graphs


@dataclass(frozen=True)
class Protocol:
    """How to time: the device, autocast dtype, input size, and which timings to take.

    ``timings`` is a sequence of ``(batch, mode)``: ``(256, "default")`` is batch-256 throughput
    compiled with ``torch.compile`` (default mode), ``(1, "reduce-overhead")`` batch-1 latency with
    CUDA graphs, ``(256, "eager")`` no compilation. Each timing is ``repeats`` medians of ``iters``
    calls after ``warmup`` untimed calls. ``kernels`` also records each timing's kernel times
    (``torch.profiler``). ``budget_s`` skips a compilation that would end past that many seconds
    from the start of :func:`~tokenreduce.bench.measure` (the skip is recorded in the row).
    """

    device: str = "cuda"
    amp: str = "bf16"
    img_size: int = 224
    timings: tuple[tuple[int, str], ...] = ((256, "eager"), (256, "default"), (1, "eager"), (1, "reduce-overhead"))
    iters: int = 30
    warmup: int = 10
    repeats: int = 5
    kernels: bool = False
    budget_s: float | None = None

    def __post_init__(self) -> None:
        if self.amp not in AMP:
            raise ValueError(f"amp: expected one of {', '.join(AMP)}, got {self.amp!r}")
        if self.img_size < 1:
            raise ValueError(f"img_size: must be a positive number of pixels, got {self.img_size}")
        if not self.timings:
            raise ValueError("timings: give at least one (batch, mode) pair, e.g. ((256, 'eager'),)")
        for batch, mode in self.timings:
            if not isinstance(batch, int) or batch < 1:
                raise ValueError(f"timings: batch must be an int >= 1, got {batch!r}")
            if mode not in MODES:
                raise ValueError(f"timings: mode must be one of {', '.join(MODES)}, got {mode!r}")
        for name in ("iters", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup: must be >= 0, got {self.warmup}")


@dataclass(frozen=True)
class Variant:
    """``dense``; ``limit[m]@rho``: method m's own plan with free sites; ``m@rho``: the reduced model."""

    kind: str  # "dense" | "limit" | "reduced"
    method: str | None = None
    ratio: float | None = None

    @property
    def name(self) -> str:
        if self.kind == "dense":
            return "dense"
        if self.kind == "limit":
            return f"limit[{self.method}]@{self.ratio:g}"
        return f"{self.method}@{self.ratio:g}"

    @classmethod
    def parse(cls, name: str) -> Variant:
        """The inverse of :attr:`name`: ``"dense"``, ``"limit[etps]@0.7"``, ``"etps@0.7"``."""
        if name == "dense":
            return cls("dense")
        head, at, ratio = name.partition("@")
        try:
            rho = float(ratio)
        except ValueError:
            rho = None
        if not at or rho is None or not head:
            raise ValueError(f"variant: expected 'dense', 'METHOD@RATIO' or 'limit[METHOD]@RATIO', got {name!r}")
        if head.startswith("limit[") and head.endswith("]"):
            return cls("limit", head[len("limit[") : -1], rho)
        return cls("reduced", head, rho)


@dataclass
class Timing:
    """One (batch, mode) measurement of one variant. ``ms``: ms per call, one entry per repeat."""

    batch: int
    mode: str
    ms: list[float] = field(default_factory=list)
    compile_s: float | None = None
    graphs: int | None = None
    graph_breaks: int | None = None
    host_ms: float | None = None  # CUDA: time to launch one call onto an idle GPU
    peak_mib: float | None = None  # CUDA: parameters + buffers + input + largest extra allocation
    kernel_us: float | None = None  # kernels: GPU time per call, summed over kernels
    reduction_us: float | None = None  # the part of kernel_us that selects and merges tokens
    top_kernels: dict[str, float] | None = None
    note: str | None = None  # why this timing is missing (error, skipped) or what it does not measure

    @property
    def median_ms(self) -> float | None:
        return statistics.median(self.ms) if self.ms else None

    @property
    def img_s(self) -> float | None:
        med = self.median_ms
        return self.batch * 1e3 / med if med else None

    @property
    def spread(self) -> float | None:
        """(max - min) / median over the repeats: the noise of this timing."""
        med = self.median_ms
        return (max(self.ms) - min(self.ms)) / med if med and len(self.ms) > 1 else None

    @property
    def launch_bound(self) -> bool:
        """The host needs about as long to launch a call as the call takes: wall clock measures Python."""
        med = self.median_ms
        return bool(med and self.host_ms and self.host_ms >= 0.9 * med)


@dataclass
class Row:
    """One variant of one model: its cost, its tokens and every timing taken."""

    model: str
    variant: str
    kind: str
    method: str | None = None
    ratio: float | None = None
    locs: list | None = None
    sites: list[str] | None = None
    tokens: list[int] | None = None  # tokens in the stream (prefix included) after each site
    limit: str | None = None  # reduced rows: the limit variant with the same plan (None: not defined)
    gflops: float | None = None
    timings: list[Timing] = field(default_factory=list)
    note: str | None = None  # why the variant could not be built

    def timing(self, batch: int, mode: str) -> Timing | None:
        return next((t for t in self.timings if t.batch == batch and t.mode == mode), None)

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        d = dict(d)
        derived = ("median_ms", "img_s", "spread")
        d["timings"] = [Timing(**{k: v for k, v in t.items() if k not in derived}) for t in d.get("timings", [])]
        return cls(**d)


def timed_rows(rows) -> list[dict]:
    """Dataclass rows with a ``timings`` list of :class:`Timing` as dicts, each timing with its
    derived median_ms, img_s and spread."""
    out = []
    for r in rows:
        d = asdict(r)
        for td, t in zip(d["timings"], r.timings):
            td.update(median_ms=t.median_ms, img_s=t.img_s, spread=t.spread)
        out.append(d)
    return out


@dataclass
class Result:
    """A run: environment and protocol (``meta``) and the rows, dense and limits first."""

    meta: dict
    rows: list[Row]

    def to_dict(self) -> dict:
        """JSON-ready; each timing also carries its derived median_ms, img_s and spread."""
        return {"meta": self.meta, "rows": timed_rows(self.rows)}

    @classmethod
    def from_dict(cls, d: dict) -> Result:
        if not isinstance(d, dict) or "meta" not in d or "rows" not in d:
            raise ValueError("result: expected a dict with 'meta' and 'rows' (a file written by tokenreduce.bench)")
        return cls(meta=d["meta"], rows=[Row.from_dict(r) for r in d["rows"]])

    def row(self, model: str, variant: str) -> Row | None:
        return next((r for r in self.rows if r.model == model and r.variant == variant), None)

    def dense(self, row: Row) -> Row | None:
        return self.row(row.model, "dense")

    def limit(self, row: Row) -> Row | None:
        """The limit row that a reduced row is compared with (same model, same ratio)."""
        return self.row(row.model, row.limit) if row.kind == "reduced" and row.limit else None
