"""How far bf16 rollout weights move the behaviour ELBO terms from the learner's: the on-policy d.

In an asynchronous run (runtime.max_staleness >= 1) a rollout worker ships l_old, the ELBO terms of
each completion under the group's MC masks, measured by the weights that generated it
(rollout/behaviour.py). Workers now hold those weights in the rollout dtype (bf16 on GPUs,
dlrl.precision.rollout_dtype) while the learner measures l_new from float32 masters under bf16
autocast. So even an on-policy group (made by the learner's current version) starts with
d = l_new - l_old != 0. This script measures that d on the same completions and masks:

* behaviour: bf16 weights, the worker's pass (rollout_pass: compute_dtype bf16, its chunk);
* learner "autocast": float32 masters under bf16 autocast (what the learner computes);
* learner "fp32": float32 masters, no autocast;
* "today": float32 worker weights under autocast (the behaviour terms before this change).

For each pair it reports mean and max |d|, the spread of the terms themselves for scale, and what
d does to BGPO's per-sample ratio (learner.losses.bgpo_ratio: 1 + d for A >= 0, exp(d) for A < 0;
their quotient (1 + d) / exp(d) = 1 - d^2/2 + ...), and the share of terms whose ratio would
already sit past clip_eps = 0.2 on-policy.

Models: the tiny LLaDA Sudoku checkpoint (builtin:tiny-sudoku, completions sampled by a real
RolloutWorker holding bf16 weights, exactly as a worker ships them), and a random LLaDA-shaped
model with LLaDA's 126,464-token vocabulary (random completions; its logits are those of a fresh
init, so its figure is only indicative of the rounding at that vocabulary).

    python bench/rollout_dtype.py                  # about 3 minutes on 2 cores
    python bench/rollout_dtype.py --skip-random    # the tiny checkpoint only

Writes bench/results/rollout_dtype.json (machine, date, commit).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dlrl.batch import collate_for  # noqa: E402
from dlrl.config import JobSpec, TrainSpec  # noqa: E402
from dlrl.elbo_terms import ElboPass, elbo_terms, micro_batches, rollout_pass  # noqa: E402
from dlrl.models import SpecialIds, load_model, special_ids  # noqa: E402
from dlrl.models.families import model_family  # noqa: E402
from dlrl.models.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402
from dlrl.trajectory import TrajectoryGroup  # noqa: E402
from rollout.behaviour import behaviour_terms  # noqa: E402
from rollout.worker import RolloutWorker  # noqa: E402

CLIP_EPS = 0.2  # the paper job's train.clip_eps


def learner_terms(model: torch.nn.Module, groups: list[TrajectoryGroup], train: TrainSpec, compute: str,
                  ids) -> np.ndarray:
    """The learner's l for the groups: collate_for + elbo_terms, matmuls in `compute`."""
    batch = collate_for(groups, train, ids, model_family(model))
    p = dataclasses.replace(ElboPass.of(train), compute_dtype=compute)
    with torch.no_grad():
        return elbo_terms(model, micro_batches(batch, train.micro_batch), p, ids.mask_id).double().numpy()


def mismatch(learner: np.ndarray, behaviour: np.ndarray) -> dict[str, float]:
    """|d| and BGPO's ratios for d = learner - behaviour, over every (completion, MC sample)."""
    d = learner - behaviour
    up, down = 1 + d, np.exp(d)  # bgpo_ratio for A >= 0 / A < 0
    return {
        "mean_abs_d": float(np.abs(d).mean()),
        "max_abs_d": float(np.abs(d).max()),
        "mean_d": float(d.mean()),
        "mean_abs_ratio_minus_1_exp": float(np.abs(down - 1).mean()),
        "max_abs_ratio_minus_1_exp": float(np.abs(down - 1).max()),
        "max_abs_weight_1pd_over_exp_minus_1": float(np.abs(up / down - 1).max()),
        "frac_past_clip_0.2": float((np.abs(d) > CLIP_EPS).mean()),
        "n_terms": int(d.size),
    }


def compare(fp32: torch.nn.Module, groups: list[TrajectoryGroup], spec: JobSpec, ids) -> dict:
    """All the pairs of one model: behaviour (bf16 weights, and fp32 as today) vs the learner."""
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    worker = rollout_pass(spec)  # compute_dtype bfloat16 (the spec asks for it on the CPU)
    t0 = time.perf_counter()
    beh = np.concatenate(behaviour_terms(bf16, groups, spec.train, worker, ids, "cpu"))
    beh_today = np.concatenate(behaviour_terms(fp32, groups, spec.train, worker, ids, "cpu"))
    autocast = learner_terms(fp32, groups, spec.train, "bfloat16", ids)
    pure = learner_terms(fp32, groups, spec.train, "float32", ids)
    return {
        "terms": {"mean": float(autocast.mean()), "std": float(autocast.std()),
                  "mean_abs": float(np.abs(autocast).mean())},
        "bf16_behaviour_vs_learner_autocast": mismatch(autocast, beh),
        "bf16_behaviour_vs_learner_fp32": mismatch(pure, beh),
        "fp32_behaviour_vs_learner_autocast_today": mismatch(autocast, beh_today),
        "learner_autocast_vs_learner_fp32": mismatch(autocast, pure),
        "seconds": time.perf_counter() - t0,
    }


def tiny(n_groups: int) -> dict:
    spec = JobSpec.from_toml(ROOT / "deploy/jobs/tiny-sudoku.toml").model_copy(deep=True)
    spec = JobSpec.model_validate({
        **spec.model_dump(), "train": {**spec.train.model_dump(), "compute_dtype": "bfloat16"},
        "runtime": {**spec.runtime.model_dump(), "max_staleness": 1},
    })
    worker = RolloutWorker(spec, behaviour=rollout_pass(spec))
    assert next(worker.model.parameters()).dtype == torch.bfloat16
    groups = worker.rollout(n_groups, batch=0)  # sampled with bf16 weights, as a worker ships them
    shipped = np.concatenate([g.behaviour_elbo for g in groups])
    fp32, tokenizer = load_model(spec.model.path, dtype="float32")
    fp32.requires_grad_(False)
    ids = special_ids(fp32, tokenizer)
    out = compare(fp32, groups, spec, ids)
    # the worker's shipped terms are the bf16 behaviour terms computed here (same weights, masks)
    out["shipped_equals_recomputed"] = bool(np.array_equal(
        shipped, np.concatenate(behaviour_terms(copy.deepcopy(fp32).to(torch.bfloat16), groups, spec.train,
                                                rollout_pass(spec), ids, "cpu"))))
    out["setup"] = {"model": spec.model.path, "groups": n_groups, "group_size": spec.rollout.group_size,
                    "gen_length": spec.rollout.gen_length, "n_mc": spec.train.n_mc,
                    "normalize": spec.train.normalize, "rewards_mean": float(np.mean([g.rewards for g in groups]))}
    return out


def random_llada(hidden: int, layers: int, vocab: int, n_groups: int, prompt: int, gen: int) -> dict:
    torch.manual_seed(0)
    mask = vocab - 128  # LLaDA's mask id 126336 sits 128 below its vocabulary's end
    cfg = LLaDAConfig(d_model=hidden, n_heads=hidden // 64, n_kv_heads=hidden // 64, n_layers=layers,
                      mlp_hidden_size=hidden * 8 // 3 // 8 * 8, vocab_size=vocab, embedding_size=vocab,
                      mask_token_id=mask, pad_token_id=0, eos_token_id=1, max_sequence_length=prompt + gen)
    model = LLaDAModelLM(cfg).eval().requires_grad_(False)
    paper = JobSpec.from_toml(ROOT / "deploy/jobs/llada-gsm8k.toml")
    spec = JobSpec.model_validate({
        "model": {"path": "builtin:tiny-sudoku"},  # unused: the model is built here
        "rollout": {"batch_size": 8, "group_size": 4},
        "train": {"n_mc": 4, "mc_chunk": 1, "micro_batch": 8, "compute_dtype": "bfloat16",
                  "normalize": paper.train.normalize},
        "runtime": {"max_staleness": 1},
    })
    rng = np.random.default_rng(0)
    groups = [TrajectoryGroup(group_id=f"g{k}", task="bench", prompt_id=str(k),
                              prompt_ids=rng.integers(4, mask, size=prompt),
                              completion_ids=rng.integers(4, mask, size=(4, gen)),
                              rewards=rng.random(4), policy_version=0, mask_seed=k)
              for k in range(n_groups)]
    ids = SpecialIds(mask_id=mask, pad_id=0, eos_ids=(1,))
    out = compare(model, groups, spec, ids)
    out["setup"] = {"hidden": hidden, "layers": layers, "vocab": vocab, "groups": n_groups, "group_size": 4,
                    "prompt": prompt, "gen_length": gen, "n_mc": 4, "normalize": spec.train.normalize,
                    "init": "LLaDAModelLM fresh init (random weights, random tokens)"}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--groups", type=int, default=8, help="tiny checkpoint: prompts (G = 8 completions each)")
    p.add_argument("--skip-random", action="store_true")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=126_464)
    p.add_argument("--out", default=str(ROOT / "bench/results/rollout_dtype.json"))
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"tiny_sudoku": tiny(args.groups)}
    if not args.skip_random:
        results["random_llada"] = random_llada(args.hidden, args.layers, args.vocab, 2, 32, 64)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    out = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "machine": {"device": "cpu", "name": platform.machine(), "cpus": os.cpu_count(),
                    "torch": torch.__version__, "python": platform.python_version()},
        "clip_eps": CLIP_EPS,
        **results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for name, r in results.items():
        print(f"{name}: terms mean {r['terms']['mean']:.4f} std {r['terms']['std']:.4f}")
        for key in ("bf16_behaviour_vs_learner_autocast", "bf16_behaviour_vs_learner_fp32",
                    "fp32_behaviour_vs_learner_autocast_today", "learner_autocast_vs_learner_fp32"):
            m = r[key]
            print(f"  {key:42s} mean|d| {m['mean_abs_d']:.2e}  max|d| {m['max_abs_d']:.2e}  "
                  f"max|exp(d)-1| {m['max_abs_ratio_minus_1_exp']:.2e}  past clip {m['frac_past_clip_0.2']:.3f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
