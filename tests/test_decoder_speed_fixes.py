"""Decoder step-time fixes: subnormal logit gradients flushed at the source; OpenMP wait-policy default."""

import os
import subprocess
import sys

import torch

import medico_peft.models.sam as sam
from medico_peft.models import build_model

TINY = torch.finfo(torch.float32).tiny


def _grads(model, emb, sparse, dense, grad_out):
    emb = emb.clone().requires_grad_(True)
    masks, _ = model.decode_all_tokens(emb, sparse, dense)
    masks.backward(grad_out)
    return emb.grad, model.mask_decoder.output_upscaling[0].weight.grad.clone()


def test_subnormal_logit_gradients_are_flushed_and_nothing_else_changes():
    model = build_model("vit_tiny", seed=0)
    e = model.spec.embedding_size
    emb = torch.randn(1, model.spec.prompt_dim, e, e)
    with torch.no_grad():
        sparse, dense = model.embed_prompts(boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0]]))
    grad = torch.randn(1, 4, 4 * e, 4 * e) * 1e-3
    sub = torch.rand(grad.shape) < 0.3
    grad_sub = torch.where(sub, torch.full_like(grad, TINY / 8), grad)  # 30 % subnormal entries
    assert ((grad_sub != 0) & (grad_sub.abs() < TINY)).any()
    model.zero_grad()
    flushed = _grads(model, emb, sparse, dense, grad_sub)
    model.zero_grad()
    reference = _grads(model, emb, sparse, dense, torch.where(sub, torch.zeros_like(grad), grad))
    for a, b in zip(flushed, reference):
        assert torch.equal(a, b)  # exactly what a flush-to-zero CPU would compute
    sam.FLUSH_SUBNORMAL_GRADS = False
    try:
        model.zero_grad()
        unflushed = _grads(model, emb, sparse, dense, grad_sub)
    finally:
        sam.FLUSH_SUBNORMAL_GRADS = True
    assert (unflushed[1] - reference[1]).abs().max() < 1e-30  # the flushed values were negligible


def test_forward_outputs_unchanged_without_grad():
    model = build_model("vit_tiny", seed=0)
    e = model.spec.embedding_size
    emb = torch.randn(1, model.spec.prompt_dim, e, e)
    with torch.no_grad():
        sparse, dense = model.embed_prompts(boxes=torch.tensor([[4.0, 6.0, 40.0, 50.0]]))
        masks, _ = model.decode_all_tokens(emb, sparse, dense)
    assert masks.grad_fn is None and not masks._backward_hooks


def _env_after_import(env):
    code = "import os, medico_peft; print(os.environ.get('OMP_WAIT_POLICY', '(unset)'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_omp_wait_policy_default_is_passive_and_overridable():
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MEDICO_PEFT_OMP_DEFAULTS")}
    assert _env_after_import(base) == "PASSIVE"
    assert _env_after_import({**base, "OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
    assert _env_after_import({**base, "MEDICO_PEFT_OMP_DEFAULTS": "0"}) == "(unset)"
