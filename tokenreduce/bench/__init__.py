"""Measuring reduced models: dense, the limit and the reduced model side by side, in one process.

The protocol is in ``docs/benchmarks.md``. ``tokenreduce benchmark`` and the scripts under
``benchmarks/`` share this package::

    from tokenreduce import bench

    result = bench.measure("deit_small_patch16_224", bench.Protocol(device="cuda"))
    print(bench.screen(result))

Importing the package does not import torch (the command line parses its arguments first);
the names below load their module on first use.
"""

from __future__ import annotations

import importlib

__all__ = [
    "Protocol",
    "Result",
    "Row",
    "Timing",
    "Variant",
    "build_variants",
    "environment",
    "format_table",
    "kernel_times",
    "limit_of",
    "load_average",
    "markdown",
    "measure",
    "round_robin",
    "screen",
    "time_calls",
]

_HOME = {
    "Protocol": "protocol",
    "Timing": "protocol",
    "Variant": "protocol",
    "Row": "protocol",
    "Result": "protocol",
    "build_variants": "variants",
    "measure": "side_by_side",
    "environment": "env",
    "load_average": "env",
    "format_table": "table",
    "markdown": "report",
    "screen": "report",
    "kernel_times": "timing",
    "round_robin": "timing",
    "time_calls": "timing",
    "limit_of": "limit",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'tokenreduce.bench' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
