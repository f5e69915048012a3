"""Reliability of capture: threads, failed traces, hooks, dead placeholders, errors that keep their cause."""

import threading
from pathlib import Path

import pytest
import timm
import torch
from torch import nn
from torch.fx import _symbolic_trace as fx_trace

import tokenreduce
from tokenreduce.capture import capture, hooked_modules

ORIGINAL_CALL = fx_trace._orig_module_call
ORIGINAL_GETATTR = fx_trace._orig_module_getattr


def tiny_vit(**kwargs):
    cfg = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2, "num_classes": 5}
    cfg.update(kwargs)
    return timm.models.vision_transformer.VisionTransformer(**cfg).eval()


def x32(batch=2):
    return torch.randn(batch, 3, 32, 32)


def assert_nn_module_unpatched():
    assert nn.Module.__dict__["__call__"] is ORIGINAL_CALL
    assert nn.Module.__dict__["__getattr__"] is ORIGINAL_GETATTR
    lin = nn.Linear(3, 2)
    assert lin(torch.ones(1, 3)).shape == (1, 2)


# --- threads ---------------------------------------------------------------------------------


def test_concurrent_applies_all_succeed_and_leave_nn_module_unpatched():
    models = [tiny_vit() for _ in range(4)]
    start = threading.Barrier(len(models))
    errors, results = [], {}

    def work(i):
        try:
            start.wait()
            for _ in range(2):
                results[i] = tokenreduce.apply(models[i], "etps", locs=[1], keep_ratio=0.5, example_input=x32())
        except Exception as exc:  # noqa: BLE001 - collected and asserted on below
            errors.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(models))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert_nn_module_unpatched()
    x = x32()
    for i, model in enumerate(models):  # each reduced model is its own model's
        with torch.no_grad():
            dense = tokenreduce.apply(model, "etps", locs=[1], keep_ratio=1.0, example_input=x).eval()
            assert torch.equal(dense(x), model(x))
            assert results[i](x).shape == (2, 5)


def test_apply_beside_a_thread_serving_another_model():
    served = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).eval()
    vit = tiny_vit()
    inp = torch.randn(3, 8)
    with torch.no_grad():
        expected = served(inp)
    stop = threading.Event()
    failures, during_trace = [], [0]

    def serve():
        while not stop.is_set():
            tracing = fx_trace.CURRENT_PATCHER is not None  # some trace has nn.Module patched now
            try:
                with torch.no_grad():
                    out = served(inp)
                if not torch.equal(out, expected):
                    failures.append("wrong output")
                during_trace[0] += tracing
            except Exception as exc:  # noqa: BLE001 - collected and asserted on below
                failures.append(repr(exc))

    server = threading.Thread(target=serve)
    server.start()
    try:
        for _ in range(20):  # until the server has demonstrably run during traces
            tokenreduce.apply(vit, "dtps", locs=[1, 2], keep_ratio=0.7, example_input=x32())
            if during_trace[0] >= 5:
                break
    finally:
        stop.set()
        server.join()
    assert failures == []
    assert during_trace[0] >= 5, "the serving thread never ran while a trace had nn.Module patched"
    assert_nn_module_unpatched()


class Boom(Exception):
    pass


class Interrupt(BaseException):
    pass


class FailingBlock(nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.exc = exc

    def forward(self, x):
        self.fc(x)  # traced: a module call before the failure
        raise self.exc("failed midway through the trace")


class FailingModel(nn.Module):
    def __init__(self, exc):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = FailingBlock(exc)

    def forward(self, x):
        return self.block(self.pre(x))


def test_a_trace_failing_midway_restores_nn_module():
    with pytest.raises(tokenreduce.TokenReduceError, match=r"could not trace module 'block' \(FailingBlock\).*Boom"):
        tokenreduce.apply(FailingModel(Boom), example_input=torch.randn(2, 4))
    assert_nn_module_unpatched()


def test_a_trace_interrupted_by_a_base_exception_restores_nn_module():
    with pytest.raises(Interrupt):
        tokenreduce.apply(FailingModel(Interrupt), example_input=torch.randn(2, 4))
    assert_nn_module_unpatched()


def test_a_foreign_patch_of_nn_module_is_refused_not_stacked_on():
    def foreign(mod, *args, **kwargs):  # what torch.fx installs during a trace outside tokenreduce
        return ORIGINAL_CALL(mod, *args, **kwargs)

    nn.Module.__call__ = foreign
    try:
        with pytest.raises(tokenreduce.TokenReduceError, match=r"nn\.Module\.__call__ is patched.*TRACE_LOCK"):
            tokenreduce.apply(tiny_vit(), "etps", locs=[1], example_input=x32())
        assert nn.Module.__dict__["__call__"] is foreign  # left as found
    finally:
        nn.Module.__call__ = ORIGINAL_CALL
    assert_nn_module_unpatched()


def test_a_dispatcher_put_back_by_a_foreign_revert_is_cleared():
    from tokenreduce._tracing_lock import _Confinement

    finished = _Confinement()  # what a foreign trace that started during ours restores on exit
    stale = finished.dispatcher("__call__", ORIGINAL_CALL, ORIGINAL_CALL)
    finished.active = False
    nn.Module.__call__ = stale
    try:
        assert nn.Linear(3, 2)(torch.ones(1, 3)).shape == (1, 2)  # inert: falls through
        tokenreduce.apply(tiny_vit(), "etps", locs=[1], example_input=x32())
    finally:
        if nn.Module.__dict__["__call__"] is stale:
            nn.Module.__call__ = ORIGINAL_CALL
    assert_nn_module_unpatched()


# --- hooks -----------------------------------------------------------------------------------


def test_hooks_on_traced_through_modules_are_refused_by_path():
    model = tiny_vit()
    h1 = model.blocks[1].register_forward_hook(lambda m, i, o: None)
    h2 = model.blocks[2].attn.register_forward_pre_hook(lambda m, i: None)
    with pytest.raises(tokenreduce.TokenReduceError) as info:
        tokenreduce.apply(model, "etps", locs=[1], example_input=x32())
    msg = str(info.value)
    assert "blocks.1 (Block): forward hook" in msg
    assert "blocks.2.attn (Attention): forward pre-hook" in msg
    assert "handle.remove()" in msg
    with pytest.raises(tokenreduce.TokenReduceError, match=r"blocks\.1 \(Block\)"):
        tokenreduce.inspect(model, example_input=x32())
    h1.remove()
    h2.remove()
    assert tokenreduce.apply(model, "etps", locs=[1], example_input=x32())(x32()).shape == (2, 5)


def test_a_hook_on_the_root_is_refused():
    model = tiny_vit()
    model.register_forward_hook(lambda m, i, o: None)
    assert hooked_modules(model) == ["<root> (VisionTransformer): forward hook"]
    with pytest.raises(tokenreduce.TokenReduceError, match=r"<root> \(VisionTransformer\): forward hook"):
        tokenreduce.apply(model, "etps", locs=[1], example_input=x32())


def test_a_global_module_hook_is_refused():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        with pytest.raises(tokenreduce.TokenReduceError, match="register_module_forward_hook"):
            tokenreduce.apply(tiny_vit(), "etps", locs=[1], example_input=x32())
    finally:
        handle.remove()


def test_hooks_on_leaf_modules_keep_firing_on_the_reduced_model():
    model = tiny_vit()
    seen = []
    model.blocks[2].mlp.fc2.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    assert hooked_modules(model) == []
    reduced = tokenreduce.apply(model, "etps", locs=[1], keep_ratio=0.5, example_input=x32()).eval()
    seen.clear()
    with torch.no_grad():
        reduced(x32(3))
    assert seen == [(3, 1 + 8, 32)]  # class token + ceil(0.5 * 16) patches: the reduced count


# --- placeholders ----------------------------------------------------------------------------


def test_a_timm_vit_graph_has_exactly_one_placeholder():
    model = tiny_vit()
    gm = capture(model, x32())
    assert [n.op for n in gm.graph.nodes].count("placeholder") == 1
    assert not any(getattr(n.target, "__name__", "") == "_assert_is_none" for n in gm.graph.nodes)
    assert not any("attn_mask" in n.name or "is_causal" in n.name for n in gm.graph.nodes)
    reduced = tokenreduce.apply(model, "etps", locs=[1], example_input=x32())
    assert [n.target for n in reduced.graph.nodes if n.op == "placeholder"] == ["x"]


class ExtraArgs(nn.Module):
    def __init__(self, required):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.required = required

    def forward(self, x, scale=None, *rest, flag=True):
        return self.fc(x)


def test_defaulted_and_unused_arguments_leave_no_placeholder():
    gm = capture(ExtraArgs(False), torch.randn(2, 4))
    assert [n.target for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    assert torch.equal(gm(torch.ones(2, 4)), gm.fc(torch.ones(2, 4)))


class NeedsTwo(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x, mask):
        return self.fc(x) * mask


def test_a_second_required_input_is_refused():
    with pytest.raises(tokenreduce.TokenReduceError, match=r"needs argument\(s\) 'mask' besides the image batch 'x'"):
        capture(NeedsTwo(), torch.randn(2, 4))


# --- errors keep their cause ------------------------------------------------------------------


def test_a_wrong_dtype_example_names_the_node_and_the_cause():
    with pytest.raises(tokenreduce.TokenReduceError) as info:
        tokenreduce.apply(tiny_vit(), "etps", locs=[1], example_input=x32().double())
    msg = str(info.value)
    assert "in module 'patch_embed.proj' (Conv2d)" in msg
    assert "Input type (double) and bias type (float)" in msg
    assert "pass example_input.to(torch.float32)" in msg
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "ShapeProp" not in msg


def test_a_wrong_rank_example_names_the_node_and_the_cause():
    with pytest.raises(tokenreduce.TokenReduceError) as info:
        tokenreduce.apply(tiny_vit(), "etps", locs=[1], example_input=torch.randn(3, 32, 32))
    msg = str(info.value)
    assert "IndexError" in msg and "in module 'patch_embed' (PatchEmbed)" in msg
    assert "example_input has 3 dimension(s)" in msg and "(B, C, H, W)" in msg
    assert isinstance(info.value.__cause__, IndexError)


def test_a_failing_example_prints_nothing(capfd):
    with pytest.raises(tokenreduce.TokenReduceError):
        tokenreduce.apply(tiny_vit(), "etps", locs=[1], example_input=torch.randn(2, 1, 32, 32))
    out, err = capfd.readouterr()
    assert out == "" and "Traceback" not in err


# --- the bad-input table in docs/bad-input.md -------------------------------------------------

DOC = Path(__file__).resolve().parent.parent / "docs" / "bad-input.md"
ERRORS = {"TypeError": TypeError, "ValueError": ValueError, "TokenReduceError": tokenreduce.TokenReduceError}


def _doc_rows():
    rows = {}
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`"):
            rows[cells[0].strip("`")] = (cells[2], cells[3].strip("`"))
    return rows


class Gate(nn.Module):
    def forward(self, x):
        return x if x.sum() > 0 else -x  # data-dependent: untraceable


class GatedModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.vit = tiny_vit()
        self.gate = Gate()

    def forward(self, x):
        return self.vit(self.gate(x))


def _with_global_hook():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: None)
    try:
        tokenreduce.apply(tiny_vit(), example_input=x32())
    finally:
        handle.remove()


def _with_foreign_patch():
    nn.Module.__call__ = lambda mod, *a, **k: ORIGINAL_CALL(mod, *a, **k)
    try:
        tokenreduce.apply(tiny_vit(), example_input=x32())
    finally:
        nn.Module.__call__ = ORIGINAL_CALL


def _hooked():
    model = tiny_vit()
    model.blocks[1].register_forward_hook(lambda m, i, o: None)
    tokenreduce.apply(model, example_input=x32())


def _apply(**kwargs):
    return lambda: tokenreduce.apply(tiny_vit(), **{"example_input": x32(), "locs": [1], **kwargs})


BAD_INPUTS = {
    "model-not-module": lambda: tokenreduce.apply("vit", example_input=x32()),
    "inspect-not-module": lambda: tokenreduce.inspect(3),
    "unknown-method": _apply(method="tps"),
    "loc-out-of-range": _apply(locs=[7]),
    "loc-negative": _apply(locs=[-1]),
    "loc-float": _apply(locs=[1.5]),
    "loc-unknown-path": _apply(locs=["blocks.9"]),
    "loc-duplicate": _apply(locs=[1, 1]),
    "loc-empty": _apply(locs=[]),
    "ratio-zero": _apply(keep_ratio=0.0),
    "ratio-above-one": _apply(keep_ratio=1.5),
    "ratio-nan": _apply(keep_ratio=float("nan")),
    "ratio-string": _apply(keep_ratio="0.7"),
    "ratio-bool": _apply(keep_ratio=True),
    "ratio-count": _apply(locs=[1, 2], keep_ratio=[0.5]),
    "ratio-increasing": _apply(method="dtps", locs=[1, 2], keep_ratio=[0.5, 0.7]),
    "aux-not-bool": _apply(aux="yes"),
    "example-not-tensor": _apply(example_input=[1, 2]),
    "example-missing": lambda: tokenreduce.apply(nn.Sequential(nn.Linear(2, 2))),
    "example-dtype": _apply(example_input=x32().double()),
    "example-rank": _apply(example_input=torch.randn(3, 32, 32)),
    "example-channels": _apply(example_input=torch.randn(2, 1, 32, 32)),
    "example-size": _apply(example_input=torch.randn(2, 3, 48, 48)),
    "example-device": _apply(example_input=x32().to("meta")),
    "not-a-transformer": lambda: tokenreduce.apply(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), example_input=x32()),
    "no-class-token": lambda: tokenreduce.apply(
        tiny_vit(class_token=False, global_pool="avg"), method="etps", example_input=x32()
    ),
    "untraceable": lambda: tokenreduce.apply(GatedModel(), example_input=x32()),
    "second-input": lambda: tokenreduce.apply(NeedsTwo(), example_input=torch.randn(2, 4)),
    "hooked-block": _hooked,
    "global-hook": _with_global_hook,
    "foreign-trace": _with_foreign_patch,
    "summary-not-reduced": lambda: tokenreduce.summary(tiny_vit()),
}


def test_the_bad_input_table_lists_every_case():
    assert set(_doc_rows()) == set(BAD_INPUTS)


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_gets_what_the_table_says(case):
    error, fragment = _doc_rows()[case]
    with pytest.raises(ERRORS[error]) as info:
        BAD_INPUTS[case]()
    assert type(info.value) is ERRORS[error] or error == "TokenReduceError"
    assert fragment in str(info.value)
    assert_nn_module_unpatched()


@pytest.mark.parametrize("method", ["etps", "evit", "dtps", "dynamicvit"])
def test_a_meta_device_model_reduces_and_runs_on_meta(method):
    with torch.device("meta"):
        model = tiny_vit()
    reduced = tokenreduce.apply(model, method=method, example_input=x32().to("meta")).eval()
    with torch.no_grad():
        out = reduced(x32().to("meta"))
    assert out.device.type == "meta" and out.shape == model(x32().to("meta")).shape


def test_a_meta_device_model_is_inspected_and_a_cpu_example_named():
    with torch.device("meta"):
        model = tiny_vit()
    found = tokenreduce.inspect(model, example_input=x32().to("meta"))
    assert len(found.blocks) == 4
    with pytest.raises(
        tokenreduce.TokenReduceError,
        match=r"example_input is on cpu but the model's parameters are on "
        r"meta: pass example_input.to\('meta'\)",
    ):
        tokenreduce.inspect(model, example_input=x32())
