"""bench/gpu_learner.py cannot rot: its dry run (tiny LLaDA on the CPU, the same functions as the
GPU run) writes every field the GPU run reports; its FLOP count and card lookup by hand."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
        assert x["finite"] and x["grad_norm"] > 0
        # [x_t ; x_0] cropped (dlrl.block_elbo.bd3_columns): a 12-token prompt is 3 blocks of 4, so the
        # noisy half starts at the response (16 columns) and the clean half drops its last block (24)
        assert (x["prompt_len"], x["gen_len"], x["input_tokens_per_forward"]) == (12, 16, 16 + 24)


HIDE_RAY = """
import runpy, sys
class HideRay:  # as on a lent GPU machine: Ray is not installed
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ModuleNotFoundError("No module named 'ray' (hidden by the test)")
sys.meta_path.insert(0, HideRay())
"""


def test_gpu_benchmarks_import_without_ray():
    """A lent GPU machine has no Ray: the GPU benchmarks (and learner.step and dlrl.weights under
    them) import without it; dlrl.weights imports Ray only in the functions that use it, so the
    object-store path still fails loudly there rather than running without it."""
    code = HIDE_RAY + """
import bench.gpu_block, bench.gpu_learner, bench.gpu_lean, learner.step
from dlrl.weights import object_store
try:
    object_store.publish(0, {})
except ImportError as exc:
    print("refused:", exc)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: No module named 'ray'" in proc.stdout


def test_lean_before_patches_every_elbo_caller():
    """BEFORE replaces the ELBO pass under every name the learner reaches it by; no module beyond
    those imports elbo_chunk (a new importer would escape the patch and make BEFORE a lie)."""
    import importlib

    from bench.elbo_logits import full_logit_elbo_chunk
    from bench.gpu_lean import ELBO_CALLERS, elbo_path

    importers = {f"{p.relative_to(ROOT).with_suffix('').as_posix().replace('/', '.')}.elbo_chunk"
                 for pkg in ("dlrl", "learner", "rollout", "services") for p in (ROOT / pkg).rglob("*.py")
                 if "elbo_chunk" in p.read_text()}
    assert importers == set(ELBO_CALLERS)
    modules = [importlib.import_module(t.rsplit(".", 1)[0]) for t in ELBO_CALLERS]
    with elbo_path("before"):
        assert all(m.elbo_chunk is full_logit_elbo_chunk for m in modules)
    assert all(m.elbo_chunk is not full_logit_elbo_chunk for m in modules)


@pytest.mark.slow
def test_lean_dry_run_without_ray(tmp_path):
    """bench/gpu_lean.py's dry run, with Ray hidden as on the GPU machine: every part reports, the
    bf16 wire moves half the fp32 bytes, and the engines agree with the reference where they must."""
    out = tmp_path / "gpu_lean.json"
    code = HIDE_RAY + f"""
sys.argv = ["bench/gpu_lean.py", "--dry-run", "--out", {str(out)!r}]
runpy.run_path("bench/gpu_lean.py", run_name="__main__")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "learner step" in proc.stdout and "weight sync per version" in proc.stdout  # the table
    r = json.loads(out.read_text())
    assert r["dry_run"] is True and r["date"] and len(r["commit"]) == 40
    assert {"card", "torch", "device"} <= r["machine"].keys() and r["machine"]["device"] == "cpu"
    pairs = r["learner"]["pairs"]
    assert [p["n_mc"] for p in pairs] == [1, 4]
    for p in pairs:
        for path in ("before", "after"):
            x = p[path]
            assert x["elbo_pass"] == path and x["finite"] and x["grad_norm"] > 0 and x["step_seconds"] > 0
        assert p["time_ratio_after_over_before"] > 0 and p["loss_abs_diff"] < 1e-2
    ro = r["rollout"]
    for row in ro["rows"] + ro["tiny_sudoku"]["rows"]:
        assert set(row["tokens_per_s"]) == {"reference", "cached_dual", "cached_dual_threshold0.9"}
        assert all(v > 0 for v in row["tokens_per_s"].values())
        assert row["agreement_with_reference"]["reference"] == 1.0
        assert all(0.0 <= v <= 1.0 for v in row["agreement_with_reference"].values())
    assert [row["batch"] for row in ro["rows"]] == [1, 2, 4]
    w = r["weight_sync"]
    params = r["learner"]["model"]["params"]
    assert w["fp32"]["device_to_host"]["bytes"] == 4 * params and w["bf16"]["device_to_host"]["bytes"] == 2 * params
    assert w["fp32"]["broadcast"]["bytes"] == 4 * params and w["bf16"]["broadcast"]["bytes"] == 2 * params
    assert w["device_to_host_bytes_ratio_bf16_over_fp32"] == 0.5 and w["broadcast_bytes_ratio_bf16_over_fp32"] == 0.5
