"""The ``tokenreduce`` command line: what each subcommand prints, and how a bad request fails."""

import json
import subprocess
import sys
import time
import types

import pytest
import torch

from tokenreduce.cli import main, parse_keep, parse_locs

TINY = "deit_tiny_patch16_224"


def test_help_imports_no_torch_and_is_fast():
    code = (
        "import sys, time; t = time.perf_counter(); from tokenreduce.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print('torch' in sys.modules, 'timm' in sys.modules, time.perf_counter() - t)"
    )
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    wall = time.perf_counter() - t0
    torch_loaded, timm_loaded, inside = out.split()[-3:]
    assert (torch_loaded, timm_loaded) == ("False", "False")
    assert float(inside) < 1.0 and wall < 5.0  # the process start included; measured ~0.05 s and ~0.3 s


def test_version_and_usage_errors(capsys):
    import tokenreduce

    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tokenreduce {tokenreduce.__version__}\n"
    assert main([]) == 2
    assert "give a command" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["summary", TINY, "--keep-ratio"])  # a flag without its value
    assert info.value.code == 2


def test_inspect_prints_the_model_map(capsys):
    assert main(["inspect", TINY, "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "VisionTransformer: 12 blocks, input (2, 3, 64, 64)" in out
    assert "blocks.3" in out and "sdpa" in out


def test_inspect_json(capsys):
    assert main(["inspect", TINY, "--img-size", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input_shape"] == [2, 3, 64, 64] and len(data["blocks"]) == 12
    assert data["blocks"][3] | {"path": "blocks.3"} == data["blocks"][3]
    assert data["blocks"][0]["tokens"] == 17 and data["blocks"][0]["sites"] == ["before", "after-attn"]


def test_summary_defaults_to_etps(capsys):
    assert main(["summary", TINY, "--locs", "3,6,9", "--keep-ratio", "0.7", "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "etps on VisionTransformer" in out
    assert "GFLOPs (multiply-adds, 1 image): dense" in out


def test_summary_json(capsys):
    assert main(["summary", TINY, "--method", "dtps", "--img-size", "64", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "dtps" and [s["block"] for s in data["sites"]] == [3, 6, 9]
    assert [s["keep"] for s in data["sites"]] == [11, 7, 5]  # int(16 * 0.7 ** s)
    assert data["gflops_reduced"] < data["gflops_dense"]


def test_bad_method_exits_2_with_one_line_on_stderr(capsys):
    assert main(["summary", TINY, "--method", "tome", "--img-size", "64"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("tokenreduce summary: error: method: unknown method 'tome'")
    assert captured.err.count("\n") == 1


def test_bad_locs_message_comes_from_the_library(capsys):
    assert main(["summary", TINY, "--method", "etps", "--locs", "3,12", "--img-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenreduce summary: error: locs: block index 12 is out of range")
    assert err.count("\n") == 1


def test_unknown_model_suggests_close_names(capsys):
    assert main(["inspect", "deit_tiny_patch16_22"]) == 2
    err = capsys.readouterr().err
    assert "model: timm has no model 'deit_tiny_patch16_22'; similar names: deit_tiny_patch16_224" in err


def test_tagged_names_are_accepted(capsys):
    assert main(["inspect", f"{TINY}.fb_in1k", "--img-size", "32"]) == 0
    assert "VisionTransformer: 12 blocks, input (2, 3, 32, 32)" in capsys.readouterr().out


def test_checkpoint_dense_weights_and_mismatch(tmp_path, capsys):
    import timm

    model = timm.create_model(TINY, pretrained=False, img_size=64)
    path = tmp_path / "dense.pth"
    torch.save(model.state_dict(), path)
    from tokenreduce.bench.models import load_model

    loaded = load_model(TINY, checkpoint=str(path), img_size=64)
    assert loaded.reduced is None
    key = "blocks.0.attn.qkv.weight"
    assert torch.equal(loaded.dense.state_dict()[key], model.state_dict()[key])
    assert main(["inspect", "deit_small_patch16_224", "--img-size", "64", "--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert "does not fit deit_small_patch16_224" in err and err.count("\n") == 1
    assert main(["inspect", TINY, "--checkpoint", str(tmp_path / "missing.pth")]) == 2
    assert "checkpoint: no file" in capsys.readouterr().err
    assert main(["inspect", TINY, "--pretrained", "--checkpoint", str(path)]) == 2
    assert "pass one of them" in capsys.readouterr().err


def test_tokenreduce_checkpoint_as_model_and_as_weights(tmp_path, capsys):
    import timm

    import tokenreduce

    dense = timm.create_model(TINY, pretrained=False, img_size=64).eval()
    reduced = tokenreduce.apply(dense, method="dtps", keep_ratio=0.5, example_input=torch.randn(2, 3, 64, 64))
    path = tmp_path / "dtps.pt"
    tokenreduce.save(reduced, path, model_kwargs={"img_size": 64})
    assert main(["summary", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "dtps" and [s["keep"] for s in data["sites"]] == [8, 4, 2]
    assert main(["summary", TINY, "--img-size", "64", "--checkpoint", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sites"] == data["sites"]


def test_export_wiring(monkeypatch, tmp_path, capsys):
    calls = []
    fake = types.ModuleType("tokenreduce.export")
    fake.export = lambda reduced, path, **kw: calls.append((reduced, path, kw)) or tmp_path / "m.onnx"
    monkeypatch.setitem(sys.modules, "tokenreduce.export", fake)
    assert (
        main(
            [
                "export",
                TINY,
                "--img-size",
                "64",
                "--method",
                "evit",
                "--format",
                "onnx",
                "--out",
                str(tmp_path / "m.onnx"),
                "--no-dynamic-batch",
                "--exporter",
                "torchscript",
            ]
        )
        == 0
    )
    ((reduced, path, kw),) = calls
    assert reduced.meta["tokenreduce"].plan.method.name == "evit" and not reduced.training
    assert path == str(tmp_path / "m.onnx")
    assert kw["format"] == "onnx" and kw["dynamic_batch"] is False and kw["exporter"] == "torchscript"
    assert tuple(kw["example_input"].shape) == (2, 3, 64, 64)
    assert capsys.readouterr().out.endswith(f"wrote {tmp_path / 'm.onnx'}\n")


def test_benchmark_json_cpu(capsys):
    assert (
        main(
            [
                "benchmark",
                TINY,
                "--img-size",
                "32",
                "--method",
                "etps,dynamicvit",
                "--device",
                "cpu",
                "--batch",
                "2",
                "--iters",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--json",
            ]
        )
        == 0
    )
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert "[benchmark]" in captured.err  # progress goes to stderr, the JSON alone to stdout
    names = [r["variant"] for r in data["rows"]]
    assert names == ["dense", "limit[dynamicvit]@0.7", "limit[etps]@0.7", "etps@0.7", "dynamicvit@0.7"]
    for row in data["rows"]:
        (timing,) = row["timings"]
        assert timing["batch"] == 2 and timing["mode"] == "eager" and timing["img_s"] > 0
    assert data["meta"]["device_type"] == "cpu" and data["meta"]["load_before"] is not None


def test_benchmark_refusals(capsys):
    assert main(["benchmark", TINY, "--device", "cpu", "--kernels", "--img-size", "32"]) == 2
    assert "drop --kernels" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["benchmark", TINY, "--batch", "0"])


def test_parsers():
    assert parse_locs("3, 6,9") == [3, 6, 9]
    assert parse_locs("stages.2.blocks.3,7") == ["stages.2.blocks.3", 7]
    assert parse_locs(None) is None
    assert parse_keep("0.7") == 0.7
    assert parse_keep("0.7,0.49,0.343") == [0.7, 0.49, 0.343]
    with pytest.raises(ValueError, match="--keep-ratio: expected a number"):
        parse_keep("seven")


def test_demo_runs_every_method(capsys):
    assert main(["demo", "--model", TINY, "--batch", "1", "--iters", "1", "--warmup", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "random weights (pretrained=False)" in out
    assert "] timing dense and 4 reduced models in turns on cpu" in out  # progress lines
    assert "CPU load average" in out
    assert "== tokenreduce.summary(tokenreduce.apply(model, method='etps'" in out
    table = out[out.index("== all methods") :]
    for method in ("dense", "etps", "evit", "dtps", "dynamicvit"):
        assert f"\n{method} " in table
    assert "139 / 98 / 69" in table  # eTPS tokens after blocks 3, 6, 9 of 197 (ceil(0.7 n) kept)


def test_benchmark_of_a_tokenreduce_checkpoint(tmp_path, capsys):
    import timm

    import tokenreduce

    dense = timm.create_model(TINY, pretrained=False, img_size=32).eval()
    reduced = tokenreduce.apply(dense, method="evit", keep_ratio=0.5, example_input=torch.randn(2, 3, 32, 32))
    path = tmp_path / "evit.pt"
    tokenreduce.save(reduced, path, model_kwargs={"img_size": 32})
    assert (
        main(
            [
                "benchmark",
                str(path),
                "--img-size",
                "32",
                "--device",
                "cpu",
                "--batch",
                "1",
                "--iters",
                "1",
                "--repeats",
                "1",
                "--warmup",
                "0",
                "--json",
            ]
        )
        == 0
    )
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["variant"] for r in rows] == ["dense", "limit[evit]@0.5", "evit@0.5"]
    # P + ceil(0.5 n) + the fused token; n = 4 patches, then 2 kept + 1 fused = 3, then again 3
    assert rows[2]["tokens"] == rows[1]["tokens"] == [1 + 2 + 1, 1 + 2 + 1, 1 + 2 + 1]
