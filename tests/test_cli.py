"""The ``tokenreduce`` command line: what each subcommand prints, and how a bad request fails."""

import pytest

from tokenreduce.cli import main, parse_keep, parse_locs

TINY = "deit_tiny_patch16_224"


def test_inspect_prints_the_model_map(capsys):
    assert main(["inspect", TINY, "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "VisionTransformer: 12 blocks, input (2, 3, 64, 64)" in out
    assert "blocks.3" in out and "sdpa" in out


def test_summary_prints_plan_tokens_and_gflops(capsys):
    assert main(["summary", TINY, "--method", "etps", "--locs", "3,6,9", "--keep-ratio", "0.7",
                 "--img-size", "64"]) == 0
    out = capsys.readouterr().out
    assert "etps on VisionTransformer" in out
    assert "GFLOPs (multiply-adds, 1 image): dense" in out


def test_bad_method_exits_2_with_one_line_on_stderr(capsys):
    assert main(["summary", TINY, "--method", "tome", "--img-size", "64"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        "tokenreduce summary: error: method: unknown method 'tome'; known methods: dtps, dynamicvit, etps, evit\n"
    )


def test_bad_locs_message_comes_from_the_library(capsys):
    assert main(["summary", TINY, "--method", "etps", "--locs", "3,12", "--img-size", "64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tokenreduce summary: error: locs: block index 12 is out of range")
    assert err.count("\n") == 1


def test_unknown_model_suggests_close_names(capsys):
    assert main(["inspect", "deit_tiny_patch16_22"]) == 2
    err = capsys.readouterr().err
    assert "model: timm has no model 'deit_tiny_patch16_22'; similar names: deit_tiny_patch16_224" in err


def test_argparse_usage_errors_exit_2():
    with pytest.raises(SystemExit) as info:
        main(["summary", TINY])  # --method is required
    assert info.value.code == 2


def test_parsers():
    assert parse_locs("3, 6,9") == [3, 6, 9]
    assert parse_locs("stages.2.blocks.3,7") == ["stages.2.blocks.3", 7]
    assert parse_locs(None) is None
    assert parse_keep("0.7") == 0.7
    assert parse_keep("0.7,0.49,0.343") == [0.7, 0.49, 0.343]
    with pytest.raises(ValueError, match="--keep-ratio: expected a number"):
        parse_keep("seven")


def test_demo_runs_every_method(capsys):
    assert main(["demo", "--model", TINY, "--batch", "1", "--iters", "1", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "random weights (pretrained=False)" in out
    assert "== tokenreduce.summary(tokenreduce.apply(model, method='etps'" in out
    table = out[out.index("== all methods"):]
    for method in ("dense", "etps", "evit", "dtps", "dynamicvit"):
        assert f"\n{method} " in table
    assert "139 / 98 / 69" in table  # eTPS tokens after blocks 3, 6, 9 of 197 (ceil(0.7 n) kept)
