"""benchmarks/training.py and tokenreduce.bench.training on CPU: a tiny digit ViT, a few steps per variant."""

import importlib.util
import json
import math
import pathlib

import pytest
import torch

import tokenreduce
from tokenreduce.bench.training_step import build_step, check_step, step_loss, train_recipe
from tokenreduce.train import teacher  # noqa: F401  (registers vit_digits_tiny with timm)

ROOT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"
METHODS = ["dense", "dtps", "dynamicvit", "etps", "evit"]


def _script():
    spec = importlib.util.spec_from_file_location("bench_script_training", ROOT / "training.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _positive(v):
    return isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def test_quick_run_every_method(tmp_path):
    out = tmp_path / "out"
    args = ["--device", "cpu", "--quick", "--model", "vit_digits_tiny", "--batch", "4", "--no-compile"]
    assert _script().main([*args, "--out", str(out)]) == 0
    data = json.loads((out / "training.json").read_text())
    rows = data["rows"]
    assert [r["variant"] for r in rows] == ["dense", "dtps@0.7", "dynamicvit@0.7", "etps@0.7", "evit@0.7"]
    assert [r["form"] for r in rows] == ["dense", "masked", "masked", "dropped", "dropped"]
    assert [r["loss_terms"] for r in rows] == [["ce"], ["ce", "ratio"], ["ce", "ratio"], ["ce"], ["ce"]]
    for r in rows:
        assert r["note"] is None and r["checks"]["ok"], r
        assert r["checks"]["moved"] == r["checks"]["with_grad"] == r["checks"]["trainable"] > 0
        assert all(math.isfinite(v) for v in r["checks"]["final_loss"].values())
        (t,) = r["timings"]
        assert t["mode"] == "eager" and t["batch"] == 4 and len(t["ms"]) == 2
        assert _positive(t["img_s"]) and _positive(t["median_ms"]) and all(_positive(ms) for ms in t["ms"])
    assert data["meta"]["protocol"]["batch"] == 4 and data["meta"]["device_type"] == "cpu"
    md = (out / "training.md").read_text()
    assert "| variant | form | tokens after sites | loss | eager img/s | ms/step | x dense |" in md
    assert md.count("\n| ") == 1 + len(METHODS)  # header + one line per variant (the rule starts with "|-")


def test_compiled_with_teacher(tmp_path):
    """The compiled path (aot_eager: quick on CPU) with the teacher: graphs recorded, no break."""
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--quick", "--model", "vit_digits_tiny", "--batch", "4", "--methods", "dtps"]
    argv += ["--compile", "--backend", "aot_eager", "--distill", "--out", str(out)]
    assert _script().main(argv) == 0
    rows = json.loads((out / "training.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["dense", "dtps@0.7"]
    assert rows[1]["loss_terms"] == ["ce", "ratio", "kl_cls", "token_kl"]
    for r in rows:
        assert r["checks"]["ok"]
        eager, compiled = r["timings"]
        assert compiled["mode"] == "default" and compiled["note"] is None
        assert compiled["graphs"] == 2 and compiled["graph_breaks"] == 0  # student and teacher
        assert _positive(compiled["img_s"]) and _positive(compiled["compile_s"])


def _dtps_step(distill):
    import timm

    dense = timm.create_model("vit_digits_tiny")
    x = torch.randn(4, 1, 8, 8)
    student = tokenreduce.apply(dense, method="dtps", aux=True, example_input=x[:2])
    return build_step(student, dense, "dtps", x, torch.tensor([0, 3, 5, 9]), 10, distill=distill)


def test_step_loss_equals_token_reduction_loss():
    step = _dtps_step(distill=True)
    with torch.no_grad():
        logits, aux = step.model(step.x)
        t_logits, t_tokens = step.teacher_net(step.x)
    P = step.num_prefix
    kw = dict(
        keeps=aux.keeps,
        targets=step.targets,
        teacher_logits=t_logits,
        tokens=aux.tokens[:, P:],
        teacher_tokens=t_tokens[:, P:],
        token_keep=aux.token_keep[:, P:],
    )
    total, parts = step_loss(step.criterion, logits, step.target, **kw)
    reference = step.criterion(logits, step.target, **kw)
    assert set(parts) == set(reference.parts) == {"ce", "ratio", "kl_cls", "token", "total"}
    torch.testing.assert_close(total, reference.total)
    for k, v in parts.items():
        assert float(v) == pytest.approx(reference.parts[k], rel=1e-6)


def test_check_step_finds_parameters_that_do_not_move():
    step = _dtps_step(distill=False)
    for group in step.optimizer.param_groups:
        group["lr"] = 0.0
    report = check_step(step)
    assert not report["ok"]
    assert any("did not change in the optimizer step" in p for p in report["problems"])


def test_check_step_finds_heads_without_gradient():
    step = _dtps_step(distill=False)
    heads = [p for n, p in step.model.named_parameters() if n.startswith("reduce_sites.")]
    assert heads
    for p in heads:  # as if the keep mask were detached from the heads
        p.register_hook(torch.zeros_like)
    report = check_step(step)
    assert not report["ok"]
    assert any(p.startswith("no gradient reached reduce_sites.") for p in report["problems"])


@pytest.mark.parametrize(
    "method,learned,distill,expect",
    [
        (None, False, False, ("deit", 0.0, 0.0, None)),
        (None, False, True, ("deit", 0.0, 0.5, None)),
        ("dtps", True, False, ("tps", 2.0, 0.0, None)),
        ("dtps", True, True, ("tps", 2.0, 0.5, "kl")),
        ("dynamicvit", True, True, ("dynamicvit", 2.0, 0.5, "mse")),
        ("etps", False, False, ("evit", 0.0, 0.0, None)),
        ("evit", False, True, ("evit", 0.0, 0.5, None)),
    ],
)
def test_train_recipe(method, learned, distill, expect):
    r = train_recipe(method, learned, distill)
    assert (r.name, r.ratio_weight, r.distill_weight, r.token_loss) == expect


def test_report_shows_kernel_and_host_time():
    from tokenreduce.bench.protocol import Timing
    from tokenreduce.bench.training import TrainResult, TrainRow
    from tokenreduce.bench.training_report import train_markdown

    def row(variant, ms, kernel_us, host):
        t = Timing(batch=8, mode="default", ms=[ms], peak_mib=100.0, host_ms=host, kernel_us=kernel_us)
        return TrainRow(model="m", variant=variant, timings=[t], checks={"ok": True, "problems": []})

    meta = {"device_type": "cuda", "protocol": {"batch": 8}}
    result = TrainResult(meta=meta, rows=[row("dense", 10.0, 4000.0, 9.5), row("etps@0.7", 8.0, None, 2.0)])
    md = train_markdown(result)
    assert "| GPU ms | host ms |" in md
    dense_line = next(line for line in md.splitlines() if line.startswith("| dense"))
    assert "| 4.00 | 9.50 |" in dense_line  # 4,000 us of kernels, 9.5 ms to launch: launch-bound
    etps_line = next(line for line in md.splitlines() if line.startswith("| etps"))
    assert "| 2.00 |" in etps_line  # host time shown; no kernel time recorded for this row
    without = TrainResult(meta=meta, rows=[row("dense", 10.0, None, 9.5)])
    assert "| GPU ms |" not in train_markdown(without)
