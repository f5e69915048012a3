"""The finetune command under torchrun: two CPU processes (gloo), DDP on the student (dynamicvit's recipe:
frozen backbone epoch, frozen cls_token/pos_embed, EMA)."""

import json
import os
import subprocess
import sys

import torch

from tokenreduce.train.state import load_finetuned, read_checkpoint


def test_two_gloo_processes_train_and_the_checkpoint_reloads(tmp_path):
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tokenreduce.train.command",
        "finetune",
        "--dataset",
        "digits",
        "--model",
        "vit_digits_tiny",
        "--method",
        "dynamicvit",
        "--locs",
        "1,2,3",
        "--keep-ratio",
        "0.5",
        "--epochs",
        "1",
        "-b",
        "64",
        "--device",
        "cpu",
        "--output",
        str(out),
        "--no-progress",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(records) == 1  # rank 0 alone writes the log
    assert records[0]["eval"]["images"] == 359  # both ranks' halves of the held-out digits, summed
    assert records[0]["backbone_frozen"] and records[0]["eval_ema"]["images"] == 359  # the dynamicvit recipe
    run = read_checkpoint(out / "last.pth")["extra"]["run"]
    assert run["world_size"] == 2 and run["global_batch"] == 128
    model = load_finetuned(out / "last.pth")
    logits, aux = model(torch.randn(3, 1, 8, 8))
    assert logits.shape == (3, 10) and [int(k.sum(1)[0]) for k in aux.keeps] == [8, 4, 2]
