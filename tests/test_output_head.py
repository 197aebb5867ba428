"""The ELBO's vocabulary head on the masked rows only (dlrl.models.output_head): the terms and every
gradient (body, head, LoRA adapters) equal the full-logit computation it replaced, for a
full-attention family (LLaDA, tied and untied, scaled logits), Dream (logits lag one position)
and a block family (SDAR, the BD3 noisy half), at several mask rates and with the projection
split into many chunks; only masked rows ever reach the head; diffu-GRPO's one-step estimate
likewise; a bfloat16 autocast step agrees to bfloat16 rounding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from bench.elbo_logits import full_logit_elbo_chunk
from dlrl import diffusion
from dlrl import footprint as fp
from dlrl.batch import collate
from dlrl.block_elbo import bd3_logits, block_size_of
from dlrl.config import LoraSpec
from dlrl.elbo_terms import elbo_chunk
from dlrl.models import DreamConfig, DreamModel, LLaDAConfig, LLaDAModelLM, build_tiny_sdar
from dlrl.models.forward import diffusion_logits
from dlrl.models.lora import apply_lora
from dlrl.models.output_head import output_head
from dlrl.precision import autocast
from dlrl.trajectory import TrajectoryGroup
from learner.objectives.diffu_grpo import _prompt_noise, one_step_logprobs

MASK, PAD, EOS = 99, 0, 1
N_MC = 4


def _llada(**extra):
    torch.manual_seed(0)
    return LLaDAModelLM(LLaDAConfig(d_model=32, n_heads=4, n_kv_heads=2, n_layers=2, mlp_hidden_size=48,
                                    vocab_size=100, embedding_size=104, mask_token_id=MASK, **extra)).double()


def _dream():
    torch.manual_seed(0)
    return DreamModel(DreamConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                                  intermediate_size=48, vocab_size=104, mask_token_id=MASK, pad_token_id=PAD,
                                  bos_token_id=PAD, eos_token_id=EOS)).double()


def _sdar():
    model, tok = build_tiny_sdar(hidden=32, layers=2, heads=4, kv_heads=2, block_size=4)
    return model.double(), tok.mask_token_id


def _llada_lora():
    """LoRA on every block projection and on the head (LLaDA's head is also named ff_out), B moved
    off zero so the adapters' gradients are not trivially zero."""
    model = apply_lora(_llada(), LoraSpec(r=4, target_modules=["q_proj", "v_proj", "ff_out"]))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


BUILDS = {
    "llada": lambda: (_llada(), MASK),
    "llada-tied-scaled": lambda: (_llada(weight_tying=True, scale_logits=True), MASK),
    "llada-lora-head": lambda: (_llada_lora(), MASK),
    "dream": lambda: (_dream(), MASK),
    "sdar": _sdar,
}


def _batch(vocab: int, mask_id: int, n_mc: int = N_MC):
    """Two groups with different prompt lengths (left padding), stratified masks: n_mc mask rates
    from ~1/n_mc to ~1 per row."""
    rng = np.random.default_rng(0)
    groups = [TrajectoryGroup(group_id=f"g{k}", task="t", prompt_id=str(k),
                              prompt_ids=rng.integers(4, 90, size=5 + 2 * k),
                              completion_ids=rng.integers(4, 90, size=(3, 12)),
                              rewards=np.array([1.0, 0.0, 0.5]), policy_version=0, mask_seed=k)
              for k in range(2)]
    return collate(groups, pad_id=PAD, eos_ids=(EOS,), n_mc=n_mc)


def _full_logit_terms(model, batch, js: slice, mask_id: int, normalize: str = "token") -> torch.Tensor:
    """The computation the masked-row head replaced: every position projected onto the vocabulary,
    the response sliced, then the masked positions scored (dlrl/elbo_terms.py at 8f47b89, restated
    once, in the benchmark that measures the two against each other)."""
    return full_logit_elbo_chunk(model, batch, js, mask_id, normalize)


def _value_and_grads(model, fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    terms = fn()
    # Row- and sample-dependent weights: a wrong row's gradient cannot cancel out.
    w = torch.linspace(-1.0, 2.0, terms.numel(), dtype=terms.dtype).view_as(terms)
    (terms * w).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return terms.detach(), grads


@pytest.mark.parametrize("name", list(BUILDS))
@pytest.mark.parametrize("chunk_rows", [None, 3], ids=["one-chunk", "chunks-of-3-rows"])
def test_masked_row_elbo_equals_the_full_logit_elbo_in_value_and_gradient(name, chunk_rows, monkeypatch):
    model, mask_id = BUILDS[name]()
    vocab = output_head(model).vocab
    if chunk_rows is not None:
        monkeypatch.setattr(fp, "LOGIT_CHUNK", chunk_rows * vocab)  # many chunks, the last one short
    batch = _batch(vocab, mask_id)
    rates = batch.masks.float().mean(-1)
    assert rates.min() < 0.35 and rates.max() > 0.75  # several mask rates, low and high
    for js in (slice(0, 1), slice(1, 4)):
        want, want_grads = _value_and_grads(model, lambda: _full_logit_terms(model, batch, js, mask_id))
        got, got_grads = _value_and_grads(model, lambda: elbo_chunk(model, batch, js, mask_id, "token"))
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert want_grads.keys() == got_grads.keys() and want_grads
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert set(got_grads) == trainable  # the head's and the embedding's included
        for key in want_grads:
            torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-10, atol=1e-12, msg=key)
    if name == "llada-lora-head":
        assert any("transformer.ff_out.lora_A" in n for n in got_grads)  # the head's own adapter trained


@pytest.mark.parametrize("name", ["llada", "dream", "sdar"])
def test_only_masked_response_rows_reach_the_head(name):
    """Every row the vocabulary head projects is a masked response position: the model's own head
    call sees none, and the chunked head exactly mask.sum() rows, each the hidden state of its
    own masked position (so a leaked unmasked row, or Dream's off-by-one, changes the rows)."""
    model, mask_id = BUILDS[name]()
    batch = _batch(output_head(model).vocab, mask_id)
    head = model.get_output_embeddings()
    rows: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda mod, args, out: rows.append(args[0].detach().reshape(-1, args[0].shape[-1])))
    try:
        with torch.no_grad():
            terms = elbo_chunk(model, batch, slice(0, N_MC), mask_id, "sequence")
    finally:
        handle.remove()
    seen = torch.cat(rows)
    masked = int(batch.masks.sum())
    assert seen.shape[0] == masked
    # Those rows' logits alone give the terms: rebuild them from the full logits at masked positions.
    assert torch.allclose(terms, _full_logit_terms(model, batch, slice(0, N_MC), mask_id, "sequence"),
                          rtol=1e-12, atol=1e-12)
    # ...and a leak would show: scoring one unmasked position too changes the terms.
    leaky = batch.masks.clone()
    leaky[0, 0, (~leaky[0, 0]).nonzero()[0]] = True
    with torch.no_grad():
        moved = elbo_chunk(model, dataclasses.replace(batch, masks=leaky), slice(0, N_MC), mask_id, "sequence")
    assert not torch.allclose(moved[0, 0], terms[0, 0])
    torch.testing.assert_close(moved[1:], terms[1:], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["llada", "dream", "sdar"])
def test_one_step_logprobs_equal_the_full_logit_ones(name, monkeypatch):
    """diffu-GRPO scores every response position of its fully masked input: the same per-token
    log-probs and gradients as projecting the whole forward."""
    model, mask_id = BUILDS[name]()
    vocab = output_head(model).vocab
    monkeypatch.setattr(fp, "LOGIT_CHUNK", 5 * vocab)
    batch = _batch(vocab, mask_id, n_mc=1)
    P = batch.prompt_len
    response = batch.tokens[:, P:]

    def full():
        inputs = diffusion.one_step_input(batch.tokens[:, :P], batch.attention[:, :P].bool(), response, mask_id,
                                          0.3, _prompt_noise(batch, 0))
        block = block_size_of(model)
        if block is None:
            logits = diffusion_logits(model, inputs, batch.attention)[:, P:]
        else:
            clean = torch.cat([inputs[:, :P], response], dim=1)
            logits = bd3_logits(model, inputs, clean, batch.attention, block, slice(P, inputs.shape[1]))
        return diffusion.token_logprobs(logits, response)

    want, want_grads = _value_and_grads(model, full)
    got, got_grads = _value_and_grads(model, lambda: one_step_logprobs(model, batch, mask_id, 0.3, 0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for key in want_grads:
        torch.testing.assert_close(got_grads[key], want_grads[key], rtol=1e-10, atol=1e-12, msg=key)


def test_bfloat16_autocast_agrees_with_the_full_logit_step(monkeypatch):
    """The learner's compute dtype on a GPU: float32 masters under bfloat16 autocast. The chunked
    backward re-enters the forward's autocast, so values and gradients agree with the full-logit
    computation to bfloat16 rounding (the same matmuls in the same dtype, reordered sums)."""
    model = _llada().float()
    vocab = output_head(model).vocab
    monkeypatch.setattr(fp, "LOGIT_CHUNK", 4 * vocab)
    batch = _batch(vocab, MASK)
    js = slice(0, N_MC)

    def old():
        with autocast(torch.device("cpu"), "bfloat16"):
            return _full_logit_terms(model, batch, js, MASK)

    want, want_grads = _value_and_grads(model, old)
    got, got_grads = _value_and_grads(model, lambda: elbo_chunk(model, batch, js, MASK, "token", "bfloat16"))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
    for key in want_grads:
        scale = want_grads[key].abs().max().item()
        assert (got_grads[key] - want_grads[key]).abs().max().item() <= 2e-2 * scale + 1e-6, key
