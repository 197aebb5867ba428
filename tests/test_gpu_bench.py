"""bench/gpu_learner.py cannot rot: its dry run (tiny LLaDA on the CPU, the same functions as the
GPU run) writes every field the GPU run reports; its FLOP count and card lookup by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.gpu_learner import LLADA_1B, PEAK_BF16, peak_flops, step_flops
from dlrl import footprint as fp
from dlrl.models import LLaDAConfig

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_the_full_report(tmp_path):
    out = tmp_path / "gpu_learner.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_learner.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "s/step" in proc.stdout and "weights device->host" in proc.stdout  # the table
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["date"] and len(r["commit"]) == 40
    assert {"hostname", "card", "torch", "device", "gpus_visible"} <= r["machine"].keys()
    assert r["machine"]["device"] == "cpu" and r["peak_bf16_tflops"] is None
    assert "6P" in r["flops_formula"]
    rows = r["rows"]
    combos = {(x["precision"], x["n_mc"], x["activation_checkpointing"]) for x in rows}
    assert len(rows) == len(combos) == 7
    assert {x["precision"] for x in rows} == {"fp32_masters_bf16_autocast", "bf16_weights"}
    assert sum(x["activation_checkpointing"] for x in rows) == 1
    for x in rows:
        assert "skipped" not in x and x["finite"] and x["grad_norm"] > 0
        assert x["step_seconds"] > 0 and x["model_tflops_per_step"] > 0 and x["train_tokens_per_s"] > 0
        assert x["mfu"] is None and x["peak_memory_bytes"] is None  # CPU: no peak to divide by, no CUDA stats
    w = r["weight_transfer"]
    state_bytes = 4 * r["model"]["params"]  # float32 masters, every parameter once (untied head)
    assert w["device_to_host"]["bytes"] == state_bytes and w["device_to_host"]["gb_per_s"] > 0
    assert w["broadcast"]["backend"] == "gloo" and w["broadcast"]["bytes"] == state_bytes


def test_flops_and_peaks_by_hand():
    shape = fp.shape_from_config(LLaDAConfig(**LLADA_1B).to_dict())
    assert 1.55e9 < shape.params() < 1.65e9  # >= 1 B, as the benchmark promises
    p = shape.layers * shape.block_params() + shape.vocab * shape.hidden
    n, d, T, rows = shape.layers, shape.hidden, 512, 8
    assert step_flops(shape, rows, T, 16) == 16 * rows * T * (8 * p + 16 * n * T * d)
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H200") == 989e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("Some Future Card") is None
    assert len({name for name, _ in PEAK_BF16}) == len(PEAK_BF16)


def test_block_dry_run_writes_the_full_report(tmp_path):
    """bench/gpu_block.py (the block engine and the block learner step, for a lent GPU) runs the
    same calls on a tiny SDAR model on the CPU and reports every row."""
    out = tmp_path / "gpu_block.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench/gpu_block.py"), "--dry-run", "--steps", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "engine batch" in proc.stdout and "learner n_t" in proc.stdout
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["date"] and r["machine"]["device"] == "cpu"
    assert [x["batch"] for x in r["engine"]] == [1, 2, 4]
    for x in r["engine"]:
        assert x["tokens_per_s"] > 0 and x["forwards"] > 0 and x["committed"] == x["batch"] * x["gen_len"]
    assert [x["n_mc"] for x in r["learner"]] == [1, 4]
    for x in r["learner"]:
        assert x["finite"] and x["grad_norm"] > 0 and x["input_tokens_per_forward"] == 2 * (x["prompt_len"] + x["gen_len"])
