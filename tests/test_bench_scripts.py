"""benchmarks/throughput.py and benchmarks/report.py on their CPU path (a tiny model, one call per variant)."""

import importlib.util
import json
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(f"bench_script_{name}", ROOT / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_throughput_cpu_then_report(tmp_path, capsys):
    out = tmp_path / "out"
    assert (
        _script("throughput").main(
            [
                "--device",
                "cpu",
                "--quick",
                "--models",
                "deit_tiny_patch16_224",
                "--img-size",
                "32",
                "--methods",
                "etps,dtps",
                "--timings",
                "2:eager,1:eager",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "throughput.json").read_text())
    assert [r["variant"] for r in data["rows"]] == [
        "dense",
        "limit[dtps]@0.7",
        "limit[etps]@0.7",
        "etps@0.7",
        "dtps@0.7",
    ]
    assert all([(t["batch"], t["mode"]) for t in r["timings"]] == [(2, "eager"), (1, "eager")] for r in data["rows"])
    assert data["meta"]["protocol"]["repeats"] == 2 and data["meta"]["models"][0]["model"] == "deit_tiny_patch16_224"
    capsys.readouterr()
    assert _script("report").main([str(out / "throughput.json")]) == 0
    md = capsys.readouterr().out
    assert md == (out / "throughput.md").read_text()
    assert "| variant | tokens after sites | GFLOPs | b2 eager img/s |" in md


def test_throughput_refuses_bad_timings():
    with pytest.raises(SystemExit):
        _script("throughput").parse_args(["--timings", "256:fast"])


def test_report_refuses_other_json(tmp_path, capsys):
    path = tmp_path / "x.json"
    path.write_text(json.dumps({"rows": []}))
    assert _script("report").main([str(path)]) == 2
    assert "expected a dict with 'meta' and 'rows'" in capsys.readouterr().err


def test_hf_throughput_cpu(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "out"
    argv = ["--device", "cpu", "--quick", "--models", "vit-tiny", "--img-size", "32", "--methods", "etps"]
    assert _script("hf_throughput").main(argv + ["--out", str(out)]) == 0
    (result,) = json.loads((out / "hf_throughput.json").read_text())
    names = [row["variant"] for row in result["rows"]]
    assert names == ["dense", "limit[etps]@0.7", "etps@0.7"]
    assert all(t["img_s"] > 0 for row in result["rows"] for t in row["timings"])
