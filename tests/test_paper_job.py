"""The paper's job (deploy/jobs/llada-gsm8k.toml) at tiny shape, end to end on the CPU, and the
chat prompts it depends on.

The spec is the shipped one with the model swapped for a tiny random-init native LLaDA checkpoint
(written here in the published layout, with LLaDA's chat template) and the sizes shrunk; GSM8K
prompts come from tests/data/gsm8k_slice.jsonl (6 rows of the GSM8K test split). `dlrl train`
runs it on a real local Ray cluster: chat prompts, rollout, reward, BGPO step, checkpoint; the
checkpoint then reloads with plain transformers.

Run: .venv/bin/pytest tests/test_paper_job.py -q
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import AutoModel

from dlrl.models import LLaDAConfig, LLaDAModelLM, load_model, save_checkpoint, special_ids
from dlrl.models.published import check_checkpoint
from dlrl.tasks import get_task
from rollout.completion import encode_prompt
from services.driver.progress import read_metrics
from tests.chat_tokenizers import dream_tokenizer, llada_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "deploy/jobs/llada-gsm8k.toml"
GSM8K = ROOT / "tests/data/gsm8k_slice.jsonl"


@pytest.fixture(scope="module")
def gsm8k():
    task = get_task("gsm8k", path=str(GSM8K))
    return task, task.examples("test", n=2, seed=0)[0]


# --- chat prompts -------------------------------------------------------------------------------


def chars(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_llada_chat_prompt_has_the_published_token_ids(gsm8k):
    """Would have caught `list(apply_chat_template(tokenize=True))` == ['input_ids', 'attention_mask']."""
    task, ex = gsm8k
    tok = llada_tokenizer(published_ids=True)
    ids = encode_prompt(tok, task, ex, "chat")
    text = task.prompt(ex, "chat").strip()
    expected = ([126080, 126346] + chars(tok, "user") + [126347] + chars(tok, "\n\n") + chars(tok, text)
                + [126348, 126346] + chars(tok, "assistant") + [126347] + chars(tok, "\n\n"))
    assert ids == expected
    assert ids.count(126080) == 1  # BOS once: the template writes it, the tokenizer adds none
    assert tok.decode(ids).startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n")


def test_dream_chat_prompt_has_the_published_token_ids(gsm8k):
    task, ex = gsm8k
    tok = dream_tokenizer(published_ids=True)
    ids = encode_prompt(tok, task, ex, "chat")
    text = task.prompt(ex, "chat")
    im_start, im_end, nl = 151644, 151645, chars(tok, "\n")
    expected = ([im_start] + chars(tok, "system\nYou are a helpful assistant.") + [im_end] + nl
                + [im_start] + chars(tok, "user\n" + text) + [im_end] + nl
                + [im_start] + chars(tok, "assistant\n"))
    assert ids == expected


def test_compact_prompt_bypasses_the_template(gsm8k):
    task, ex = gsm8k
    tok = llada_tokenizer()
    assert encode_prompt(tok, task, ex, "compact") == chars(tok, task.prompt(ex, "compact"))


# --- the paper job at tiny shape ----------------------------------------------------------------

TINY = {  # every size the paper spec sets, shrunk; everything else (bgpo, lr, clip, chat) as shipped
    "rollout.prompts_per_step": 2, "rollout.group_size": 2, "rollout.gen_length": 16,
    "rollout.block_length": 8, "rollout.steps": 4, "rollout.batch_size": 4,
    "train.steps": 2, "train.n_mc": 2, "train.micro_batch": 2,
    "task.eval_size": 2, "eval.every": 2, "eval.steps": 4,
    "runtime.device": "cpu", "runtime.checkpoint_every": 1, "runtime.num_cpus": 2,
}


def tiny_llada_checkpoint(path: Path) -> tuple[Path, LLaDAModelLM]:
    """A random-init native LLaDA in the published layout, with LLaDA's chat template."""
    tok = llada_tokenizer()
    config = LLaDAConfig(d_model=32, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=64,
                         vocab_size=len(tok), embedding_size=128, max_sequence_length=1024,
                         mask_token_id=tok.convert_tokens_to_ids("<|mdm_mask|>"),
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LLaDAModelLM(config)
    return save_checkpoint(model, tok, path), model


@pytest.mark.slow
def test_paper_job_runs_end_to_end_at_tiny_shape(tmp_path):
    ckpt, start = tiny_llada_checkpoint(tmp_path / "tiny-llada")
    shipped = tomllib.loads(SPEC.read_text())
    assert shipped["model"]["path"] == "GSAI-ML/LLaDA-8B-Instruct" and shipped["task"]["style"] == "chat"
    assert "trust_remote_code" not in shipped["model"]  # native: no remote code needed or allowed
    overrides = {"model.path": str(ckpt), "model.dtype": "float32", "task.options": {"path": str(GSM8K)},
                 "runtime.out_dir": str(tmp_path / "runs"), "name": "paper-tiny", **TINY}
    cmd = [sys.executable, "-m", "services.cli", "train", str(SPEC)]
    for key, value in overrides.items():
        cmd += ["--set", f"{key}={value if isinstance(value, str) else json.dumps(value)}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    run = tmp_path / "runs" / "paper-tiny"
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2]
    assert all(0.0 <= r["reward"] <= 1.0 for r in train)  # GSM8K reward ran (math_verify)
    assert any(r["kind"] == "eval" for r in records)

    # The BGPO step ran: old-policy ELBO and gradient norm measured. (A random-init model earns
    # reward 0 on every completion, so its group advantages and the update are zero: this run
    # checks the path, tests/test_bgpo.py and test_train_step.py check that updates learn.)
    assert all(torch.isfinite(torch.tensor([r["elbo_old"], r["grad_norm"], r["loss"]])).all() for r in train)

    # The checkpoint reloads with plain transformers (classes registered by `import dlrl.models`)
    # and is still the native LLaDA in the published layout.
    out = run / "checkpoint"
    reloaded = AutoModel.from_pretrained(out)
    assert type(reloaded) is LLaDAModelLM
    check_checkpoint(out, reloaded.config)
    assert json.loads((out / "config.json").read_text())["model_type"] == "llada"
    assert reloaded.state_dict().keys() == start.state_dict().keys()
    model, tok = load_model(out)
    assert tok.chat_template == llada_tokenizer().chat_template  # the template travels with it
    assert special_ids(model, tok).mask_id == tok.convert_tokens_to_ids("<|mdm_mask|>")
