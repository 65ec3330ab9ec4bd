"""Where the row log-sum-exp comes from, checked once per configuration: :class:`KernelPaths`.

Paths, best first:

- (a) ``"flash-lse"`` / ``"efficient-lse"`` / ``"cudnn-lse"``: the kernel
  ``F.scaled_dot_product_attention`` picks, called through its lse-returning aten op; its output
  stands in for SDPA's.
- (b) ``"sdpa+side-lse"``: SDPA's own output, untouched, and the lse of the image rows of the
  recorded items from a side call of a fused kernel (flash, else memory-efficient; the CPU flash op
  on a CPU) on ``q[:, :, :N]`` against all keys, its output discarded. Costs about N / L of one
  attention over the recorded items (half the batch with classifier-free guidance).
- (c) ``"chunked"``: SDPA's own output; the lse computed exactly in float32 on the side
  (:func:`~.exact.image_text_probs_from_keys`).

The self-check, on the first call of each configuration (device, dtype, shape, image tokens,
recorded items, scale, and the backend SDPA picks): the output of (a) must equal SDPA's bit for bit
(``torch.equal``); for (a) and (b) the lse of a sample of image rows must match a float64
log-sum-exp over all keys, to a relative error ``|lse - ref| / max(1, |ref|)`` of 1e-5 for float32
inputs and 1e-4 for fp16 / bf16 (an lse off by d scales every probability of its row by exp(d), so
this keeps maps within the accuracy the tests ask of each dtype). A path that raises or fails a check
is not used and the next one is tried. That catches wrong units (log2), padding and layout changes
on hardware no test here reaches. The cost, one extra attention and a few rows of float64 logits, is
paid once per configuration for as long as the :class:`KernelPaths` lives.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch

from .exact import default_scale
from .layout import Layout
from .kernels import (
    CUDNN,
    KERNEL_PATHS,
    SIDE_OPS,
    Unavailable,
    backend_name,
    kernel_op,
    kernel_with_lse,
    lse_rows,
    sdpa_backend,
    side_kernels,
    side_lse,
)

logger = logging.getLogger(__name__)

METHODS = ("auto", "kernel-lse", "side-lse", "chunked")
SIDE = "sdpa+side-lse"
CHUNKED = "chunked"
_ANY_KERNEL = "kernel-lse"  # path (a) before we know which kernel SDPA picks

#: Largest accepted ``|lse - ref| / max(1, |ref|)`` on the sampled rows, by input dtype.
LSE_TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-4}


class Configuration(NamedTuple):
    """What a verdict holds for: one joint SDPA call's setting."""

    device: str
    dtype: str
    shape: tuple  # (B, H, L, D) of the query
    image_tokens: int  # N
    first_item: int  # first batch item whose lse is used (B // 2 when CFG's first half is dropped)
    scale: Optional[float]  # as given to SDPA
    sdpa_backend: int  # torch._fused_sdp_choice's answer (an SDPBackend value)
    text_first: bool = False  # image rows last ([text, image], FLUX.1) instead of first (SD3)


@dataclass
class Attended:
    """One joint SDPA call, answered by a path."""

    output: torch.Tensor  # (B, H, L, D): SDPA's output, bit for bit
    image_lse: Optional[torch.Tensor]  # (R, H, N) float32 of the recorded items; None on "chunked"
    path: str
    configuration: Configuration


@dataclass
class _Call:
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scale: Optional[float]
    n: int
    first: int
    sdpa: Callable[[], torch.Tensor]
    backend: int
    text_first: bool = False

    @property
    def image(self) -> slice:
        """The image rows on L (see :class:`~.layout.Layout`)."""
        L = self.query.shape[-2]
        return Layout(self.n, L - self.n, self.text_first).image

    def image_inputs(self):
        """(q_img (R, H, N, D), key (R, H, L, D), value (R, H, L, D)) of the recorded items."""
        f = self.first
        return self.query[f:, :, self.image], self.key[f:], self.value[f:]


class _Once:
    """Calls ``fn`` at most once."""

    def __init__(self, fn):
        self.fn, self.done, self.value = fn, False, None

    def __call__(self):
        if not self.done:
            self.value, self.done = self.fn(), True
        return self.value


class KernelPaths:
    """Chooses the path that gives the row log-sum-exp, checks it once, and keeps the verdicts.

    One object is one cache: each :class:`Configuration` is checked on its first call and never again
    while the object lives. A recorder makes its own unless given one; to check once per process,
    share one object between recorders::

        paths = KernelPaths()
        for prompt in prompts:
            with StepAverageRecorder(pipe, paths=paths) as rec:
                pipe(prompt)
            rec.result().capture_path          # e.g. "flash-lse"

    Verdicts are JSON-ready dicts: ``device``, ``device_name``, ``dtype``, ``shape`` (B, H, L, D),
    ``image_tokens``, ``recorded_items``, ``scale`` (as given to SDPA; None: 1/sqrt(D)), ``sdpa_backend``
    (the configuration), then ``path``,
    ``kernel`` (the aten op), ``ok``, ``reason``, ``output_bitwise_equal``, ``lse_max_rel_err`` and
    ``lse_tolerance`` (None where not measured).

    Args:
        check_rows: image rows (for every recorded item and head) whose lse is checked in float64.
    """

    def __init__(self, check_rows: int = 16):
        if int(check_rows) < 1:
            raise ValueError(f"check_rows must be at least 1, got {check_rows}")
        self.check_rows = int(check_rows)
        self._verdicts: dict[tuple, dict] = {}  # (configuration, candidate) -> verdict
        self._tried: dict[tuple, list] = {}  # (configuration, method) -> candidates tried, used one last
        self._chosen: dict[tuple, tuple] = {}  # (configuration, method) -> candidate in use

    def attend(self, method: str, query, key, value, scale: Optional[float], num_image_tokens: int,
               first_item: int, sdpa: Callable[[], torch.Tensor], *, text_first: bool = False) -> Attended:
        """Answer one joint SDPA call.

        Args:
            method: "auto" (the best path that passes its checks), "kernel-lse" (a), "side-lse" (b)
                or "chunked" (c).
            query, key, value: (B, H, L, D), image tokens first (last with ``text_first``).
            scale: the scale passed to SDPA (None: 1/sqrt(D)).
            num_image_tokens: N.
            first_item: the first batch item whose lse is wanted.
            sdpa: () -> SDPA's own output for this call (the call diffusers made).
            text_first: the sequence is ``[text, image]`` (FLUX.1): the image rows are the last N.
        Raises:
            RuntimeError: ``method`` is "kernel-lse" or "side-lse" and that path fails here.
        """
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        backend = sdpa_backend(query, key, value, scale)
        config = Configuration(str(query.device), str(query.dtype).replace("torch.", ""), tuple(query.shape),
                               int(num_image_tokens), int(first_item), scale, backend, bool(text_first))
        call = _Call(query, key, value, scale, int(num_image_tokens), int(first_item), sdpa, backend,
                     bool(text_first))
        chosen = self._chosen.get((config, method))
        if chosen is None:
            return self._choose(method, config, call)
        return self._run(chosen, config, call)

    def verdicts(self, configuration: Configuration, method: str) -> list[dict]:
        """The verdicts of the paths ``method`` tried for ``configuration``, the one in use last."""
        return [dict(self._verdicts[(configuration, c)]) for c in self._tried.get((configuration, method), [])]

    def report(self) -> list[dict]:
        """Every verdict reached so far, in the order they were reached."""
        return [dict(v) for v in self._verdicts.values()]

    # -- choosing ---------------------------------------------------------------------------------------
    def _candidates(self, method: str, call: _Call) -> list[tuple[str, Optional[str]]]:
        kernel = [(KERNEL_PATHS.get(call.backend, _ANY_KERNEL), None)]
        side = [(SIDE, name) for name in side_kernels(call.query)]
        return {
            "auto": kernel + side + [(CHUNKED, None)],
            "kernel-lse": kernel,
            "side-lse": side,
            "chunked": [(CHUNKED, None)],
        }[method]

    def _choose(self, method: str, config: Configuration, call: _Call) -> Attended:
        call.sdpa = _Once(call.sdpa)  # the reference output, computed at most once
        tried = []
        for cand in self._candidates(method, call):
            tried.append(cand)
            verdict = self._verdicts.get((config, cand))
            attended = None
            if verdict is None:
                verdict, attended = self._check(cand, config, call)
                self._verdicts[(config, cand)] = verdict
            if verdict["ok"]:
                self._chosen[(config, method)] = cand
                self._tried[(config, method)] = tried
                self._announce(method, config, tried)
                return attended if attended is not None else self._run(cand, config, call)
        self._tried[(config, method)] = tried
        reasons = "; ".join(_label(self._verdicts[(config, c)]) for c in tried) or (
            f"no side kernel is known for device {config.device}")
        raise RuntimeError(
            f"method={method!r} cannot be used for {_where(config)}: {reasons}. "
            "Use method='auto', which falls back to a path that passes its checks."
        )

    def _check(self, cand, config: Configuration, call: _Call) -> tuple[dict, Optional[Attended]]:
        path, side_kernel = cand
        verdict = _describe(config)
        verdict.update(path=path, kernel=None, ok=False, reason="", output_bitwise_equal=None,
                       lse_max_rel_err=None, lse_tolerance=None)
        if path == CHUNKED:
            verdict.update(ok=True, output_bitwise_equal=True,
                           reason="SDPA's own output; exact float32 log-sum-exp on the side, nothing to check")
            return verdict, None
        q_img, key, value = call.image_inputs()
        R, H, N, _ = q_img.shape
        try:  # an op we do not control may fail in any way: that is a verdict, not a crash
            if path == SIDE:
                verdict["kernel"] = "aten." + SIDE_OPS[side_kernel]
                image_lse = lse_rows(side_lse(side_kernel, q_img, key, value, call.scale), R, H, N)
                out = None
            else:
                verdict["kernel"] = "aten." + kernel_op(call.backend, call.query)
                out, lse = kernel_with_lse(call.backend, call.query, call.key, call.value, call.scale)
                B, _, L, _ = call.query.shape
                image_lse = lse_rows(lse, B, H, L)[call.first :, :, call.image]
        except Unavailable as exc:
            verdict["reason"] = str(exc)
            return verdict, None
        except Exception as exc:  # noqa: BLE001
            verdict["reason"] = f"the op raised {type(exc).__name__}: {_first_line(exc)}"
            return verdict, None
        reference = call.sdpa()
        problems = []
        if out is None:
            out, equal = reference, True
        else:
            equal = out.shape == reference.shape and out.dtype == reference.dtype and torch.equal(out, reference)
            if not equal:
                problems.append("output differs from F.scaled_dot_product_attention's" + _max_diff(out, reference))
        tol = LSE_TOLERANCE.get(call.query.dtype, 1e-4)
        err = _lse_error(q_img, key, image_lse, default_scale(q_img.shape[-1], call.scale), self.check_rows)
        if not err <= tol:
            problems.append(f"lse off: max relative error {err:.3g} > {tol:g} on sampled image rows")
        verdict.update(output_bitwise_equal=bool(equal), lse_max_rel_err=err if math.isfinite(err) else None,
                       lse_tolerance=tol, ok=not problems)
        if problems:
            verdict["reason"] = "; ".join(problems)
            return verdict, None
        own = "SDPA's own output" if path == SIDE else "output bit-identical to SDPA's"
        verdict["reason"] = f"{own}; lse within {tol:g} (max relative error {err:.2g})"
        return verdict, Attended(out, image_lse, path, config)

    def _run(self, cand, config: Configuration, call: _Call) -> Attended:
        path, side_kernel = cand
        if path == CHUNKED:
            return Attended(call.sdpa(), None, path, config)
        if path == SIDE:
            q_img, key, value = call.image_inputs()
            R, H, N, _ = q_img.shape
            lse = side_lse(side_kernel, q_img, key, value, call.scale)
            return Attended(call.sdpa(), lse_rows(lse, R, H, N), path, config)
        out, lse = kernel_with_lse(call.backend, call.query, call.key, call.value, call.scale)
        B, H, L, _ = call.query.shape
        return Attended(out, lse_rows(lse, B, H, L)[call.first :, :, call.image], path, config)

    def _announce(self, method: str, config: Configuration, tried: list) -> None:
        verdicts = [self._verdicts[(config, c)] for c in tried]
        used, failed = verdicts[-1], verdicts[:-1]
        if not failed:
            logger.info("attention capture, %s: path %s (%s)", _where(config), used["path"], used["reason"])
            return
        hint = ""
        if config.sdpa_backend == CUDNN and used["path"] != KERNEL_PATHS[CUDNN]:
            hint = (" SDPA runs cuDNN here; with TORCH_CUDNN_SDPA_DEPRIORITIZED=1 set before torch starts it "
                    "runs flash instead, whose lse path may pass.")
        logger.warning("attention capture, %s: path %s (method=%r), because %s.%s", _where(config),
                       used["path"], method, "; ".join(_label(v) for v in failed), hint)


def _lse_error(q_img, key, image_lse, scale: float, rows: int) -> float:
    """max ``|lse - ref| / max(1, |ref|)`` over ``rows`` image rows spread over [0, N), every item and
    head; ``ref`` is the log-sum-exp over all L keys in float64 (float32 where a device lacks it)."""
    N = q_img.shape[2]
    idx = torch.linspace(0, N - 1, steps=min(rows, N)).round().long().unique().to(q_img.device)
    dt = torch.float64 if q_img.device.type in ("cpu", "cuda") else torch.float32
    logits = torch.matmul(q_img[:, :, idx].to(dt), key.to(dt).transpose(-1, -2)) * scale  # (R, H, r, L)
    ref = torch.logsumexp(logits, dim=-1)
    err = ((image_lse[:, :, idx].to(dt) - ref).abs() / ref.abs().clamp_min(1.0)).max()
    return float(err)


def _describe(config: Configuration) -> dict:
    name = None
    if config.device.startswith("cuda") and torch.cuda.is_available():
        name = torch.cuda.get_device_name(torch.device(config.device))
    return {
        "device": config.device,
        "device_name": name,
        "dtype": config.dtype,
        "shape": list(config.shape),
        "image_tokens": config.image_tokens,
        "image_rows": "last" if config.text_first else "first",
        "recorded_items": config.shape[0] - config.first_item,
        "scale": config.scale,
        "sdpa_backend": backend_name(config.sdpa_backend),
    }


def _where(config: Configuration) -> str:
    return f"{config.device} {config.dtype} {tuple(config.shape)} (SDPA picks {backend_name(config.sdpa_backend)})"


def _label(verdict: dict) -> str:
    kernel = f" [{verdict['kernel']}]" if verdict.get("kernel") else ""
    return f"{verdict['path']}{kernel}: {verdict['reason']}"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else "")[:200]


def _max_diff(out, reference) -> str:
    if out.shape != reference.shape:
        return f" (shape {tuple(out.shape)} vs {tuple(reference.shape)})"
    if out.dtype != reference.dtype:
        return f" (dtype {out.dtype} vs {reference.dtype})"
    return f" (max abs difference {float((out.float() - reference.float()).abs().max()):.3g})"
