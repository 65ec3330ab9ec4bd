"""The three lse paths and their self-check, with kernel faults made to happen here.

Each fault is produced by substituting a torch function for the duration of a test: an lse in log2
units, an output off by 1e-3, an op that raises, ``torch._fused_sdp_choice`` answering cuDNN, an lse
with a trailing dim or padding. In every case the maps must stay within the float64 reference's
tolerance and the images must stay bit-identical to stock, and the verdicts must say what happened.
Path (b) runs here with the CPU flash op as its side kernel.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from attention_map_diffusers import StepAverageRecorder
from attention_map_diffusers.capture.kernels import call_aten, lse_rows
from attention_map_diffusers.capture.paths import KernelPaths
from reference import ReferenceTap, reference_aggregate
from test_capture import assert_matches

CPU_FLASH = "_scaled_dot_product_flash_attention_for_cpu"
REAL_CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
KW = dict(prompt="A rusty bicycle in front of a barn", num_inference_steps=2, height=64, width=64,
          max_sequence_length=16, guidance_scale=4.5, output_type="np")


def _cpu_flash(query, key, value, scale):
    return REAL_CPU_FLASH(query, key, value, 0.0, False, scale=scale)


def fault_in_cpu_flash(monkeypatch, fault, where="whole"):
    """Substitute the CPU flash op by one that applies ``fault`` (out, lse) -> (out, lse) to its calls
    on the whole joint sequence (path a), on the image rows only (the side call of path b), or both."""
    calls = {"whole": 0, "side": 0}

    def fake(query, key, value, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
        out, lse = _cpu_flash(query, key, value, scale)
        kind = "whole" if query.shape[-2] == key.shape[-2] else "side"
        calls[kind] += 1
        if where in (kind, "both"):
            return fault(out, lse)
        return out, lse

    monkeypatch.setattr(torch.ops.aten, CPU_FLASH, fake)
    return calls


def sdpa_choice(monkeypatch, backend):
    monkeypatch.setattr(torch, "_fused_sdp_choice", lambda *a, **k: backend)


def fake_cudnn(monkeypatch, fault=lambda out, lse: (out, lse)):
    """A cuDNN op for the CPU: the CPU flash kernel, its lse shaped (B, H, L, 1) as torch >= 2.9 returns it."""

    def fake(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False,
             return_debug_mask=False, *, scale=None):
        assert attn_bias is None and compute_log_sumexp and not return_debug_mask
        out, lse = fault(*_cpu_flash(query, key, value, scale))
        return (out, lse.unsqueeze(-1)) + (None,) * 7

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention", fake)


def fake_efficient(monkeypatch):
    """A memory-efficient op for the CPU: its lse padded to a multiple of 32 rows with +inf."""

    def fake(query, key, value, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
        out, lse = _cpu_flash(query, key, value, scale)
        pad = -lse.shape[-1] % 32
        lse = torch.cat([lse, lse.new_full((*lse.shape[:-1], pad), math.inf)], dim=-1)
        return out, lse, None, None

    monkeypatch.setattr(torch.ops.aten, "_scaled_dot_product_efficient_attention", fake)


def log2_units(out, lse):
    return out, lse / math.log(2)


def output_off(out, lse):
    return out + 1e-3, lse


def raises(out, lse):
    raise RuntimeError("simulated kernel failure\nsecond line")


def trailing_dim(out, lse):
    return out, lse.unsqueeze(-1)


def padded_end(out, lse):
    pad = -lse.shape[-1] % 32 or 32
    return out, torch.cat([lse, lse.new_full((*lse.shape[:-1], pad), math.inf)], dim=-1)


def padded_front(out, lse):
    return out, torch.cat([lse.new_full((*lse.shape[:-1], 5), math.inf), lse], dim=-1)


def transposed(out, lse):
    return out, lse.transpose(1, 2).contiguous()  # (B, L, H): a layout change


# case -> (set-up, expected path, the first verdict's reason (None: it passed))
CASES = {
    "lse-in-log2": (lambda mp: fault_in_cpu_flash(mp, log2_units), "sdpa+side-lse", "lse off"),
    "output-off-1e-3": (lambda mp: fault_in_cpu_flash(mp, output_off), "sdpa+side-lse", "output differs"),
    "op-raises": (lambda mp: fault_in_cpu_flash(mp, raises), "sdpa+side-lse", "raised RuntimeError"),
    "lse-trailing-dim": (lambda mp: fault_in_cpu_flash(mp, trailing_dim), "flash-lse", None),
    "lse-padded-at-end": (lambda mp: fault_in_cpu_flash(mp, padded_end), "flash-lse", None),
    "lse-padded-at-front": (lambda mp: fault_in_cpu_flash(mp, padded_front), "sdpa+side-lse", "lse off"),
    "lse-transposed": (lambda mp: fault_in_cpu_flash(mp, transposed), "sdpa+side-lse", "lse of shape"),
    "side-lse-in-log2-too": (lambda mp: fault_in_cpu_flash(mp, log2_units, "both"), "chunked", "lse off"),
    "every-call-raises": (lambda mp: fault_in_cpu_flash(mp, raises, "both"), "chunked", "raised"),
    "sdpa-picks-cudnn": (lambda mp: sdpa_choice(mp, 3), "sdpa+side-lse", "NotImplementedError"),
    "cudnn-lse-trailing-dim": (lambda mp: (sdpa_choice(mp, 3), fake_cudnn(mp)), "cudnn-lse", None),
    "cudnn-other-engine": (lambda mp: (sdpa_choice(mp, 3), fake_cudnn(mp, output_off)), "sdpa+side-lse",
                           "output differs"),
    "efficient-lse-padded": (lambda mp: (sdpa_choice(mp, 2), fake_efficient(mp)), "efficient-lse", None),
    "sdpa-picks-math": (lambda mp: sdpa_choice(mp, 0), "sdpa+side-lse", "SDPA picks the math backend"),
}


def run_case(pipe, case, caplog, tol, monkeypatch=None):
    """Stock, then recorded, under the case's substitutions; returns the recording."""
    setup, path, reason = CASES[case] if isinstance(case, str) else case
    if monkeypatch is not None:
        setup(monkeypatch)
    kw = dict(KW)
    prompt = kw.pop("prompt")
    plain = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    with caplog.at_level(logging.INFO, logger="attention_map_diffusers.capture.paths"):
        with ReferenceTap(pipe.transformer) as tap:
            with StepAverageRecorder(pipe) as rec:
                captured = pipe(prompt, generator=torch.Generator().manual_seed(0), **kw).images
    res = rec.result()
    assert np.array_equal(plain, captured), f"{case}: the image changed"
    assert_matches(res, reference_aggregate(tap, cfg=True), tol=tol)
    assert res.capture_path == path
    verdicts = res.capture_verdicts
    json.dumps(verdicts)  # JSON-ready, for metadata.json
    assert verdicts[-1]["ok"] and verdicts[-1]["path"] == path
    assert all(not v["ok"] for v in verdicts[:-1])
    if reason is None:
        assert len(verdicts) == 1
    else:
        assert reason in verdicts[0]["reason"], verdicts[0]
    # one message, naming the path taken (a warning when a path was passed over)
    msgs = [r for r in caplog.records if r.name.endswith("capture.paths")]
    assert len(msgs) == 1 and path in msgs[0].getMessage()
    assert msgs[0].levelno == (logging.INFO if reason is None else logging.WARNING)
    return res


@pytest.mark.parametrize("case", list(CASES))
def test_fault_float32(sd35m_pipe, monkeypatch, caplog, case):
    run_case(sd35m_pipe, case, caplog, 1e-5, monkeypatch)


@pytest.fixture(scope="module")
def sd35m_bf16(sd35m_dir):
    from conftest import load_pipeline

    return load_pipeline(sd35m_dir, dtype=torch.bfloat16)


@pytest.mark.parametrize("case", ["lse-in-log2", "output-off-1e-3", "cudnn-lse-trailing-dim", "side-lse-in-log2-too"])
def test_fault_bfloat16(sd35m_bf16, monkeypatch, caplog, case):
    res = run_case(sd35m_bf16, case, caplog, 1e-4, monkeypatch)
    assert res.capture_verdicts[-1]["dtype"] == "bfloat16"


def test_verdict_fields(sd35m_pipe, monkeypatch, caplog):
    res = run_case(sd35m_pipe, "sdpa-picks-cudnn", caplog, 1e-5, monkeypatch)
    first, used = res.capture_verdicts
    assert first["device"] == "cpu" and first["dtype"] == "float32" and first["sdpa_backend"] == "cudnn"
    assert first["shape"] == [2, 3, 256 + 77 + 16, 16] and first["image_tokens"] == 256
    assert first["recorded_items"] == 1  # CFG: the conditional half
    assert first["path"] == "cudnn-lse" and first["kernel"] == "aten._scaled_dot_product_cudnn_attention"
    assert first["ok"] is False and first["lse_max_rel_err"] is None
    assert used["path"] == "sdpa+side-lse" and used["kernel"] == "aten." + CPU_FLASH
    assert used["output_bitwise_equal"] is True and used["lse_max_rel_err"] <= used["lse_tolerance"] == 1e-5
    assert "TORCH_CUDNN_SDPA_DEPRIORITIZED=1" in caplog.records[-1].getMessage()


def test_checked_once_per_configuration(sd35m_pipe, monkeypatch):
    """The self-check runs on the first call only; a shared KernelPaths carries it across recorders;
    the side call sees the recorded (conditional) half of the batch only."""
    calls = fault_in_cpu_flash(monkeypatch, output_off)
    faulty = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    side_batches = []

    def spy(**kw):
        if kw["query"].shape[-2] != kw["key"].shape[-2]:
            side_batches.append(kw["query"].shape[0])
        return faulty(**kw)

    monkeypatch.setattr(torch.ops.aten, CPU_FLASH, spy)
    kw = dict(KW, output_type="latent")
    prompt = kw.pop("prompt")
    paths = KernelPaths()
    for _ in range(2):
        with StepAverageRecorder(sd35m_pipe, paths=paths) as rec:
            sd35m_pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)
        assert rec.result().capture_path == "sdpa+side-lse"
    joint_calls = 2 * 3 * 2  # recordings x blocks x steps
    assert calls["whole"] == 1, "path (a) is tried once, on the first call"
    assert len(side_batches) == joint_calls and set(side_batches) == {1}
    assert len(paths.report()) == 2  # (a) failed, (b) passed: one configuration


def test_forced_paths_raise_where_they_fail(sd35m_pipe, monkeypatch):
    fault_in_cpu_flash(monkeypatch, log2_units, "both")
    before = dict(sd35m_pipe.transformer.attn_processors)
    for method in ("kernel-lse", "side-lse"):
        with pytest.raises(RuntimeError, match=rf"method='{method}' cannot be used .*lse off.*method='auto'"):
            with StepAverageRecorder(sd35m_pipe, method=method):
                sd35m_pipe("a cat", num_inference_steps=1, height=64, width=64, max_sequence_length=16)
    after = sd35m_pipe.transformer.attn_processors
    assert all(after[k] is before[k] for k in before)


@pytest.mark.parametrize("method,path", [("kernel-lse", "flash-lse"), ("side-lse", "sdpa+side-lse"),
                                         ("chunked", "chunked"), ("auto", "flash-lse")])
def test_forced_paths_name_themselves(sd3_pipe, method, path):
    with StepAverageRecorder(sd3_pipe, method=method) as rec:
        sd3_pipe("a cat", num_inference_steps=1, height=64, width=64, max_sequence_length=16, output_type="latent")
    res = rec.result()
    assert res.capture_path == path and [v["path"] for v in res.capture_verdicts] == [path]


def test_unknown_method_explains(sd3_pipe):
    with pytest.raises(ValueError, match="'auto', 'kernel-lse', 'side-lse', 'chunked'"):
        StepAverageRecorder(sd3_pipe, method="flash")


def test_lse_rows_layouts():
    lse = torch.randn(2, 3, 40)
    assert torch.equal(lse_rows(lse.unsqueeze(-1), 2, 3, 40), lse)
    assert torch.equal(lse_rows(torch.cat([lse, torch.full((2, 3, 24), math.inf)], -1), 2, 3, 40), lse)
    assert lse_rows(lse.half(), 2, 3, 40).dtype == torch.float32
    for bad in (lse.transpose(1, 2), lse[..., :30], lse.unsqueeze(-1).expand(2, 3, 40, 2)):
        with pytest.raises(ValueError, match="lse of shape"):
            lse_rows(bad, 2, 3, 40)


def test_call_aten_binds_by_schema_names():
    q = torch.randn(1, 2, 8, 16)
    out, lse = call_aten(CPU_FLASH, query=q, key=q, value=q, is_causal=False, not_in_this_torch=1)[:2]
    assert torch.equal(out, F.scaled_dot_product_attention(q, q, q)) and lse.shape == (1, 2, 8)
    with pytest.raises(TypeError, match="requires 'value'"):
        call_aten(CPU_FLASH, query=q, key=q)


def test_sdpa_restricted_to_math_takes_the_side_path(sd35m_pipe, caplog):
    """Not simulated: under sdpa_kernel(MATH) SDPA has no lse to give, and the side call does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        res = run_case(sd35m_pipe, (None, "sdpa+side-lse", "math backend"), caplog, 1e-5)
    assert res.capture_verdicts[0]["reason"] == "SDPA picks the math backend, which returns no lse"
