"""`dlrl eval`: a model (checkpoint or `builtin:` name), a task and a protocol file → a result
that cites the protocol's sha256, written so that a long run resumes where it stopped.

    from rollout.evaluation import EvalProtocol, evaluate_checkpoint
    summary = evaluate_checkpoint("builtin:tiny-sudoku", "sudoku",
                                  EvalProtocol.from_toml("deploy/eval/tiny-sudoku.toml"), out_dir="runs/eval")

Writes into `out_dir`:
  results.jsonl   one line per example (completions, the extracted answers, rewards), appended a
                  batch at a time and fsynced; a rerun keeps the complete batches and redoes the rest,
                  and a rerun with a larger --limit keeps the batches it shares with the smaller one
  summary.json    protocol (file, sha256, settings), model, task, data, n, mean reward, accuracy,
                  unbiased pass@k, seeds, dlrl commit; date, machine and wall time under "run"
                  (the only part that differs between two identical runs)
  summary.md      the same as a markdown table

Determinism: the eval set has a fixed order, batches are fixed slices of it, and the sampling
noise of batch b comes from a generator seeded with (protocol seed, b), so a resumed run redraws
exactly what the interrupted one would have; on the CPU two runs give the same bytes. A `--limit`
takes a prefix of that order, so a later run with a larger limit reuses every batch that has the
same extent in both (all but a short last batch of the smaller run, which a batch of another size
would decode differently: other padding, other noise) and gives the bytes a run with the larger
limit from scratch gives. manifest.json names the evaluation (protocol, model, task, data, first
example) and the eval-set size the stored results were computed under.

Best checkpoint (`evaluate_run`): BGPO reports the best checkpoint of a run, evaluated every 20
steps; every HF checkpoint folder under a run directory is evaluated with the same protocol and the
best by the protocol's metric wins, ties going to the earliest step.

Prompts, sampling, decoding and rewards are rollout.completion's, the code rollouts use.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

from dlrl.eval_protocol import EvalProtocol, ProtocolError, extract, file_sha256, load_examples
from dlrl.models import load_model, special_ids
from dlrl.tasks import Example, Task, get_task
from rollout.completion import decode_completion, encode_prompt, sample_completions, sample_record, score
from rollout.engines import make_engine

__all__ = ["EvalProtocol", "ProtocolError", "evaluate_checkpoint", "evaluate_model",
           "evaluate_run", "find_checkpoints", "pass_at_k", "read_samples", "run_metrics"]

RESULTS, SUMMARY, TABLE, MANIFEST = "results.jsonl", "summary.json", "summary.md", "manifest.json"
ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_MARKERS = ("config.json", "adapter_config.json")


class ResumeMismatch(ValueError):
    """`out_dir` holds results of a different evaluation (protocol, model, task or data)."""


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one example with `c` correct among `n` samples (Chen et al. 2021, eq. 1):
    1 - C(n-c, k) / C(n, k), computed as a product so large n cannot overflow."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def _batch_seed(seed: int, batch: int) -> int:
    digest = hashlib.sha256(f"dlrl-eval:{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _with_template(task: Task, template: str) -> Task:
    if template == "{prompt}":
        return task
    if not isinstance(task, Task):
        raise TypeError("a prompt template needs a dlrl.tasks.Task")
    inner = task.make_prompt
    return dataclasses.replace(task, make_prompt=lambda ex, style: template.replace("{prompt}", inner(ex, style)))


def dlrl_commit() -> str:
    """The repository's commit ("-dirty" with uncommitted changes), or "unknown" outside git."""
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("-dirty" if dirty else "")


# ------------------------------------------------------------------------------ resume

SIZED = ("n", "last_id")
"""Manifest fields that depend on --limit: the eval-set size the stored results were computed under."""


def reusable(n_done: int, n_then: int, n_now: int, batch_size: int) -> int:
    """How many of the first `n_done` stored results (computed with an eval set of `n_then`
    examples) a run over `n_now` examples keeps: the whole batches whose extent is the same in
    both runs, [b*bs, min((b+1)*bs, n)); the first batch that differs, and all after it, are redone."""
    keep = 0
    while keep < min(n_done, n_now):
        end_then, end_now = min(keep + batch_size, n_then), min(keep + batch_size, n_now)
        if end_then != end_now or end_then > n_done:
            break
        keep = end_now
    return keep


def _read_done(path: Path, examples: list[Example]) -> list[dict]:
    """The stored records at the head of `path` that are in order and of these examples (a torn
    last line, or a record of another example, ends them)."""
    if not path.is_file():
        return []
    records: list[dict] = []
    with path.open("rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                break
            i = len(records)
            if (not line.endswith(b"\n") or rec.get("index") != i
                    or (i < len(examples) and rec.get("id") != examples[i].id)):
                break
            records.append(rec)
    return records


def _check_manifest(out_dir: Path, manifest: dict, resume: bool) -> int | None:
    """The eval-set size the results in `out_dir` were computed under, if they are of this
    evaluation (None: nothing to resume, the folder is started afresh); ResumeMismatch when they
    are of another one. A different --limit is the same evaluation."""
    path = out_dir / MANIFEST
    if resume and path.is_file():
        old = json.loads(path.read_text())
        same = {k: v for k, v in manifest.items() if k not in SIZED}
        if {k: v for k, v in old.items() if k not in SIZED} != same:
            diff = sorted(k for k in set(old) | set(same) if k not in SIZED and old.get(k) != manifest.get(k))
            raise ResumeMismatch(f"{out_dir} holds results of another evaluation (differs in {diff}); "
                                 "use another --out or delete it")
        return int(old.get("n", 0))
    (out_dir / RESULTS).unlink(missing_ok=True)
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return None


# ------------------------------------------------------------------------------ running

Progress = Callable[[int, int, int, float], None]
"""(items done, items in all, items reused from an earlier run, seconds so far) after each batch."""


def evaluate_model(model: torch.nn.Module, tokenizer, task: Task, protocol: EvalProtocol, *,
                   model_name: str, out_dir: str | Path | None = None, resume: bool = True,
                   limit: int | None = None, examples: list[Example] | None = None,
                   progress: Progress | None = None) -> dict:
    """Run `protocol` with an already loaded model (the driver's periodic evaluation calls this);
    returns the summary, also written to `out_dir` when one is given. `progress` is told after
    every batch (and once before the first, with what was reused)."""
    t0 = time.perf_counter()
    task = _with_template(task, protocol.prompt.template)
    examples = examples if examples is not None else load_examples(protocol, task, limit)
    dec, smp = protocol.decoding, protocol.sampling
    ids = special_ids(model, tokenizer)
    try:
        engine = make_engine(dec, model, ids)
    except ValueError as e:
        raise ProtocolError(f"protocol {protocol.path}: decoding: {e}") from None
    data_file = protocol.data_path()
    data = {"format": protocol.data.format, "path": protocol.data.path,
            "sha256": file_sha256(data_file) if data_file else None,
            "seed": protocol.data.seed if protocol.data.format == "task" else None}
    manifest = {"protocol_sha256": protocol.sha256, "model": model_name, "task": task.name,
                "data": data, "n": len(examples), "first_id": examples[0].id, "last_id": examples[-1].id}
    out = Path(out_dir) if out_dir is not None else None
    records: list[dict] = []
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        n_then = _check_manifest(out, manifest, resume)
        stored = _read_done(out / RESULTS, examples) if n_then is not None else []
        records = stored[:reusable(len(stored), n_then or 0, len(examples), smp.batch_size)]
        if len(records) < len(examples):  # more to decode: the file becomes this run's, from what is kept
            with (out / RESULTS).open("w", encoding="utf-8") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in records)
            (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    reused = len(records)
    if progress is not None:
        progress(reused, len(examples), reused, time.perf_counter() - t0)
    device = next(model.parameters()).device
    for b in range(len(records) // smp.batch_size, math.ceil(len(examples) / smp.batch_size)):
        chunk = examples[b * smp.batch_size:(b + 1) * smp.batch_size]
        prompts = [encode_prompt(tokenizer, task, ex, protocol.prompt.style) for ex in chunk for _ in range(smp.n_samples)]
        gen = torch.Generator(device=device).manual_seed(_batch_seed(smp.seed, b))
        completions, _, _ = sample_completions(engine, prompts, dec, smp.batch_size * smp.n_samples, gen)
        batch = []
        for j, ex in enumerate(chunk):
            texts = [decode_completion(tokenizer, c, ids) for c in completions[j * smp.n_samples:(j + 1) * smp.n_samples]]
            answers = [extract(t, protocol.answer.extraction) for t in texts]
            rewards = [score(task, a, ex) for a in answers]
            batch.append({"index": b * smp.batch_size + j, "id": ex.id, "completions": texts,
                          "answers": answers, "rewards": rewards})
        records.extend(batch)
        if out is not None:
            with (out / RESULTS).open("a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, sort_keys=True) + "\n" for r in batch)
                f.flush()
                os.fsync(f.fileno())
        if progress is not None:
            progress(len(records), len(examples), reused, time.perf_counter() - t0)
    summary = _summary(protocol, manifest, records, time.perf_counter() - t0)
    if out is not None:
        (out / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
        (out / TABLE).write_text(markdown_table([summary]))
    return summary


def read_samples(out_dir: str | Path, task: Task, protocol: EvalProtocol, examples: list[Example],
                 n: int) -> list[dict]:
    """The first `n` examples of the evaluation written to `out_dir` as logged samples (prompt as the
    protocol renders it, first completion, its reward): the driver's samples.jsonl (services.driver.samples)."""
    if n <= 0 or not (Path(out_dir) / RESULTS).is_file():
        return []
    rendered = _with_template(task, protocol.prompt.template)
    out = []
    with (Path(out_dir) / RESULTS).open(encoding="utf-8") as f:
        for line, _ in zip(f, range(n)):
            rec = json.loads(line)
            ex = examples[rec["index"]]
            out.append(sample_record(ex, rendered.prompt(ex, protocol.prompt.style), rec["completions"][0],
                                     rec["rewards"][0]))
    return out


def run_metrics(summary: dict) -> dict[str, float]:
    """A summary as the run's eval record in metrics.jsonl: `eval_score` (the protocol's headline
    metric, what best.json maximises) beside the keys the built-in periodic evaluation logs
    (eval_reward: mean reward, eval_solved: accuracy, eval_seconds)."""
    return {"eval_score": summary["score"], "eval_reward": summary["mean_reward"],
            "eval_solved": summary["accuracy"], "eval_seconds": summary["run"]["seconds"],
            "eval_n": summary["n"],
            **{f"eval_pass_at_{k}": v for k, v in summary["pass_at_k"].items()}}


def _summary(protocol: EvalProtocol, manifest: dict, records: list[dict], seconds: float) -> dict:
    rewards = [r for rec in records for r in rec["rewards"]]
    n_samples = protocol.sampling.n_samples
    correct = [sum(1 for r in rec["rewards"] if r >= 1.0) for rec in records]
    pass_k = {str(k): sum(pass_at_k(n_samples, c, k) for c in correct) / len(records) for k in protocol.sampling.k}
    metrics = {"mean_reward": sum(rewards) / len(rewards),
               "accuracy": sum(1 for r in rewards if r >= 1.0) / len(rewards), "pass_at_k": pass_k}
    headline = pass_k[str(protocol.sampling.k[0])] if protocol.metric == "pass@k" else metrics[protocol.metric]
    return {
        "protocol": {"name": protocol.name, "file": _shown_path(protocol.path),
                     "sha256": protocol.sha256, "settings": protocol.model_dump(mode="json")},
        "model": manifest["model"], "task": manifest["task"], "data": manifest["data"],
        "n": len(records), "n_samples": n_samples, "metric": protocol.metric, "score": headline,
        **metrics, "seeds": {"sampling": protocol.sampling.seed, "data": manifest["data"]["seed"]},
        "dlrl_commit": dlrl_commit(),
        "run": {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''}".strip(),
                "python": platform.python_version(), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "seconds": round(seconds, 3)},
    }


def _shown_path(path: str | None) -> str | None:
    """A protocol path relative to the repository when it lies inside it (stable across clones)."""
    if path is None:
        return None
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else full.name


def resolve_task(task_name: str | None, protocol: EvalProtocol) -> Task:
    """The protocol's task; `task_name` (the --task of the CLI) must agree with it."""
    if task_name is not None and task_name != protocol.task.name:
        raise ProtocolError(f"protocol {protocol.path} is written for task {protocol.task.name!r}, "
                            f"not {task_name!r}: task.name")
    return get_task(protocol.task.name, **protocol.task.options)


def evaluate_checkpoint(model_path_or_builtin: str | Path, task: str | None, protocol: EvalProtocol, *,
                        out_dir: str | Path, resume: bool = True, limit: int | None = None,
                        device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
                        progress: Progress | None = None) -> dict:
    """Load a checkpoint folder or `builtin:` model and run `protocol` on `task` (see module doc)."""
    task_obj = resolve_task(task, protocol)
    examples = load_examples(protocol, _with_template(task_obj, protocol.prompt.template), limit)
    model, tokenizer = load_model(str(model_path_or_builtin), dtype=dtype, device=device,
                                  trust_remote_code=trust_remote_code)
    model.requires_grad_(False)
    summary = evaluate_model(model, tokenizer, task_obj, protocol, model_name=str(model_path_or_builtin),
                             out_dir=out_dir, resume=resume, examples=examples, progress=progress)
    return summary


# ------------------------------------------------------------------------------ best checkpoint

def find_checkpoints(run_dir: str | Path) -> list[tuple[int | None, Path]]:
    """(learner step, folder) of every HF checkpoint under `run_dir` (half-written `.tmp-*` and
    `.old` folders skipped), by step (unknown steps last) then path."""
    run_dir = Path(run_dir)
    found = []
    for marker in CHECKPOINT_MARKERS:
        for cfg in run_dir.rglob(marker):
            folder = cfg.parent
            if any(".tmp-" in p or p.endswith(".old") for p in folder.relative_to(run_dir).parts):
                continue
            try:
                step = json.loads((folder / "trainer_state.json").read_text()).get("step")
            except (OSError, ValueError, AttributeError):
                step = None
            found.append((step if isinstance(step, int) else None, folder))
    unique = {f: s for s, f in found}
    return sorted(((s, f) for f, s in unique.items()), key=lambda x: (x[0] is None, x[0] or 0, str(x[1])))


def evaluate_run(run_dir: str | Path, task: str | None, protocol: EvalProtocol, *, out_dir: str | Path,
                 resume: bool = True, limit: int | None = None, device: str = "cpu",
                 dtype: str = "float32", trust_remote_code: bool = False, progress: Progress | None = None) -> dict:
    """Evaluate every checkpoint of a run and name the best by the protocol metric (ties: earliest)."""
    run_dir, out = Path(run_dir), Path(out_dir)
    checkpoints = find_checkpoints(run_dir)
    if not checkpoints:
        raise FileNotFoundError(f"no checkpoint (a folder with config.json) under {run_dir}")
    rows = []
    for step, folder in checkpoints:
        rel = folder.relative_to(run_dir)
        name = "_".join(rel.parts) if rel.parts else "root"
        s = evaluate_checkpoint(folder, task, protocol, out_dir=out / name, resume=resume, limit=limit,
                                device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                progress=progress)
        rows.append({"checkpoint": str(rel), "step": step, "score": s["score"], "summary": s})
    best = max(rows, key=lambda r: r["score"])  # max keeps the first of equals: the earliest step
    summary = {**{k: v for k, v in best["summary"].items() if k != "model"}, "run_dir": str(run_dir),
               "best_checkpoint": best["checkpoint"], "best_step": best["step"], "model": best["summary"]["model"],
               "checkpoints": [{"checkpoint": r["checkpoint"], "step": r["step"], "score": r["score"]} for r in rows]}
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    (out / TABLE).write_text(markdown_table([r["summary"] for r in rows], best=best["summary"]["model"]))
    return summary


def markdown_table(summaries: list[dict], best: str | None = None) -> str:
    """One row per evaluated model: the headline metric, mean reward, accuracy, pass@k, protocol."""
    ks = list(summaries[0]["pass_at_k"])
    head = ["model", "task", "n", "metric", "score", "mean reward", "accuracy", *[f"pass@{k}" for k in ks], "protocol"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s in summaries:
        model = f"**{s['model']}** (best)" if best is not None and s["model"] == best else s["model"]
        cells = [model, s["task"], str(s["n"]), s["metric"], f"{s['score']:.4f}", f"{s['mean_reward']:.4f}",
                 f"{s['accuracy']:.4f}", *[f"{s['pass_at_k'][k]:.4f}" for k in ks],
                 f"{Path(s['protocol']['file'] or '-').name} ({s['protocol']['sha256'][:12]})"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
