"""Independent float64 reference for ConceptAttention maps (test code, shares nothing with the package).

Forward pre-hooks collect, per transformer call, the timestep / guidance the transformer got and the
inputs of every joint block (image stream, text stream, conditioning vector), as float32 tensors of
the real run. From those and the blocks' weights alone, everything else is recomputed in float64
with the formulas written out here: the concepts' T5 first tokens (the pipeline's tokenizer and
encoder, called directly), ``context_embedder``, the conditioning vector with a pooled vector of
zeros (sinusoidal timestep projection, the two MLPs), adaLN-Zero / adaLN-continuous, the q/k/v
projections and RMS qk-norm, FLUX.1's rotary embedding, the image tokens' joint attention output,
the concepts' attention (the rule), the map (dot product, softmax over concepts), and the concepts'
residual update (output projection, gate, LayerNorm, tanh-GELU MLP).

``image_side="model"`` takes the image tokens' side instead as the model computed it in its own dtype
(the keys out of ``attn.norm_k`` with FLUX.1's rotary embedding applied as diffusers applies it,
float32 then rounded to the model's dtype; the values out of ``attn.to_v``; the attention outputs
going into ``attn.to_out[0]``): for a bfloat16 model, what the concepts must match is the float64
concept stream over the image tokens the generation produced, not a float64 re-run of the generation.
"""

from __future__ import annotations

import math

import torch


def _lin(mod, x):
    y = x @ mod.weight.detach().double().T
    return y if mod.bias is None else y + mod.bias.detach().double()


def _ln(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + norm.eps)
    if getattr(norm, "weight", None) is not None:
        y = y * norm.weight.detach().double()
    if getattr(norm, "bias", None) is not None:
        y = y + norm.bias.detach().double()
    return y


def _rms(x, norm):
    if norm is None:
        return x
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + norm.eps)
    return y * norm.weight.detach().double() if norm.weight is not None else y


def _silu(x):
    return x / (1 + torch.exp(-x))


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _ff(ff, x):
    proj = ff.net[0].proj
    return _lin(ff.net[2], _gelu_tanh(_lin(proj, x)))


def _timestep_proj(t, dim=256):
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    args = t.double().reshape(-1, 1) * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # flip_sin_to_cos=True


def _mlp_embed(emb, x):
    return _lin(emb.linear_2, _silu(_lin(emb.linear_1, x)))


def concept_temb(transformer, timestep, guidance):
    """(1, D) the concepts' conditioning vector: time (+ guidance) + text projection of zeros."""
    tte = transformer.time_text_embed
    out = _mlp_embed(tte.timestep_embedder, _timestep_proj(timestep))
    if guidance is not None and hasattr(tte, "guidance_embedder"):
        out = out + _mlp_embed(tte.guidance_embedder, _timestep_proj(guidance))
    te = tte.text_embedder
    zeros = torch.zeros(1, te.linear_1.in_features, dtype=torch.float64)
    return out + _lin(te.linear_2, _silu(_lin(te.linear_1, zeros)))


def concept_t5(pipe, concepts, max_length):
    """(C, D_t5) float64: T5's first token of each concept, each padded to ``max_length`` alone."""
    flux = hasattr(pipe.transformer, "single_transformer_blocks")
    tok = pipe.tokenizer_2 if flux else pipe.tokenizer_3
    enc = pipe.text_encoder_2 if flux else pipe.text_encoder_3
    rows = []
    for c in concepts:
        ids = tok(c, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            rows.append(enc(ids)[0][0, 0].double())
    return torch.stack(rows)


class BlockInputs:
    """Collects each transformer call's timestep / guidance and each joint block's inputs."""

    def __init__(self, transformer):
        self.tr = transformer
        self.calls: list[dict] = []
        self.handles = []

    def __enter__(self):
        self.handles.append(self.tr.register_forward_pre_hook(self._call, with_kwargs=True))
        self.handles.append(self.tr.time_text_embed.register_forward_pre_hook(self._times))
        for i, blk in enumerate(self.tr.transformer_blocks):
            self.handles.append(blk.register_forward_pre_hook(self._block(i), with_kwargs=True))
            attn = blk.attn
            norm_k = attn.norm_k if attn.norm_k is not None else attn.to_k  # SD3 without qk-norm: to_k
            self.handles.append(norm_k.register_forward_hook(self._out(i, "k_img")))
            self.handles.append(attn.to_v.register_forward_hook(self._out(i, "v_img")))
            self.handles.append(attn.to_out[0].register_forward_pre_hook(self._in(i, "o_img")))
        if hasattr(self.tr, "pos_embed") and hasattr(self.tr, "single_transformer_blocks"):
            self.handles.append(self.tr.pos_embed.register_forward_hook(self._rope))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def _call(self, module, args, kwargs):
        self.calls.append({"blocks": {}, "model": {}})

    def _times(self, module, args):
        # the timestep (and FLUX.1's guidance) as time_text_embed receives them (FLUX.1: x 1000 in the
        # model's dtype); the first call of each transformer call only (the capture calls it again)
        call = self.calls[-1]
        if "timestep" not in call:
            call["timestep"] = args[0].reshape(-1)[:1].double()
            call["guidance"] = args[1].reshape(-1)[:1].double() if len(args) == 3 else None

    def _out(self, i, name):
        def hook(module, args, output):
            self.calls[-1]["model"].setdefault(i, {})[name] = output.detach()
        return hook

    def _in(self, i, name):
        def hook(module, args):
            self.calls[-1]["model"].setdefault(i, {})[name] = args[0].detach()
        return hook

    def _rope(self, module, inputs, output):
        cos, sin = output
        self.calls[-1]["rope"] = (cos.detach().double(), sin.detach().double())

    def _block(self, i):
        def hook(module, args, kwargs):
            names = ("hidden_states", "encoder_hidden_states", "temb")
            vals = dict(zip(names, args))
            vals.update({k: kwargs[k] for k in names if k in kwargs})
            self.calls[-1]["blocks"][i] = {k: v.detach().double() for k, v in vals.items()}
        return hook


def _heads(x, D):  # (B, L, H*D) -> (B, H, L, D)
    return x.unflatten(-1, (-1, D)).transpose(1, 2)


def _rope(x, cos, sin):  # x (B, H, L, D); diffusers' apply_rotary_emb, use_real_unbind_dim=-1
    re, im = x.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-im, re], dim=-1).flatten(-2)
    return x * cos + rot * sin


def _rope_as_diffusers(x, cos, sin):
    """x (B, L, H, D) in the model's dtype: diffusers' apply_rotary_emb(sequence_dim=1), computed in
    float32 and rounded to the model's dtype as it does (the rounding the generation's keys carry)."""
    c, s = cos.float()[None, :, None], sin.float()[None, :, None]
    re, im = x.unflatten(-1, (-1, 2)).unbind(-1)
    rot = torch.stack([-im, re], dim=-1).flatten(3)
    return (x.float() * c + rot.float() * s).to(x.dtype)


def _model_image_side(call, i, D, T, flux, items):
    """(k, v, o) of block i's image tokens as the model computed them, (B, H, N, D) float64."""
    got = call["model"][i]
    k, v, o = got["k_img"], got["v_img"], got["o_img"]
    if items is not None:
        k, v, o = k[items], v[items], o[items]
    if k.dim() == 3:  # to_k's output (B, N, H*D)
        k = k.unflatten(-1, (-1, D))
    elif not flux:  # SD3's norm_k works on (B, H, N, D); FLUX.1's on (B, N, H, D)
        k = k.transpose(1, 2)
    if flux:  # the rotary embedding of the image positions
        cos, sin = call["rope"]
        k = _rope_as_diffusers(k, cos[T:], sin[T:])
    return k.transpose(1, 2).double(), _heads(v.double(), D), _heads(o.double(), D)


def _attend(q, k, v, scale):
    w = torch.softmax(q @ k.transpose(-1, -2) * scale, dim=-1)
    return w @ v


def reference_concept_maps(pipe, inputs: BlockInputs, concepts, *, max_length, rule="concept", items=None,
                           blocks=None, steps=None, image_side="recompute"):
    """The ConceptAttention maps of a recorded pipeline call, in float64.

    Args:
        inputs: the :class:`BlockInputs` of the call.
        items: the batch items to compute (default: the conditional half when the batch is even and
            CFG was on: pass ``slice`` explicitly).
        blocks / steps: averaged (default all joint blocks / all calls).
        image_side: "recompute" (the image tokens' keys, values and attention outputs in float64 from
            the block inputs) or "model" (as the model computed them, in its dtype).
    Returns:
        dict: ``mean_map`` (B, N, C), ``per_block_step_mean`` (B, Bk_joint, S, C), ``per_step_sum``
        (B, S, N, C): per step, the sum over ``blocks`` of the maps.
    """
    tr = pipe.transformer
    flux = hasattr(tr, "single_transformer_blocks")
    E = _lin(tr.context_embedder, concept_t5(pipe, concepts, max_length))  # (C, D)
    n_joint = len(tr.transformer_blocks)
    blocks = list(range(n_joint)) if blocks is None else list(blocks)
    steps = list(range(len(inputs.calls))) if steps is None else list(steps)
    sums, n, means, step_sums = None, 0, [], []
    for s, call in enumerate(inputs.calls):
        c = None
        step_means, step_sum = [], 0.0
        for i in range(n_joint):
            blk = tr.transformer_blocks[i]
            attn = blk.attn
            got = call["blocks"][i]
            x, ctx, temb = got["hidden_states"], got["encoder_hidden_states"], got["temb"]
            if items is not None:
                x, ctx, temb = x[items], ctx[items], temb[items]
            B = x.shape[0]
            if c is None:
                c = E[None].expand(B, *E.shape).clone()
            D = attn.to_q.out_features // attn.heads
            # image / text streams of the block (adaLN-Zero; SD3.5's MMDiT-X has 9 chunks, same first 6)
            emb = _lin(blk.norm1.linear, _silu(temb))
            shift, scale_ = emb.chunk(emb.shape[1] // x.shape[-1], dim=1)[:2]
            nx = _ln(x, blk.norm1.norm) * (1 + scale_[:, None]) + shift[:, None]
            pre_only = bool(getattr(blk, "context_pre_only", False))

            def ctx_norm(h, t):
                e = _lin(blk.norm1_context.linear, _silu(t))
                if pre_only:  # adaLN-continuous: scale first
                    sc, sh = e.chunk(2, dim=1)
                    return _ln(h, blk.norm1_context.norm) * (1 + sc[:, None]) + sh[:, None], None
                sh, sc, g1, sh2, sc2, g2 = e.chunk(6, dim=1)
                return _ln(h, blk.norm1_context.norm) * (1 + sc[:, None]) + sh[:, None], (g1, sh2, sc2, g2)

            nctx, _ = ctx_norm(ctx, temb)
            qi = _rms(_heads(_lin(attn.to_q, nx), D), attn.norm_q)
            ki = _rms(_heads(_lin(attn.to_k, nx), D), attn.norm_k)
            vi = _heads(_lin(attn.to_v, nx), D)
            qt = _rms(_heads(_lin(attn.add_q_proj, nctx), D), attn.norm_added_q)
            kt = _rms(_heads(_lin(attn.add_k_proj, nctx), D), attn.norm_added_k)
            vt = _heads(_lin(attn.add_v_proj, nctx), D)
            T = qt.shape[2]
            if flux:
                cos, sin = call["rope"]
                qi, ki = _rope(qi, cos[T:], sin[T:]), _rope(ki, cos[T:], sin[T:])
                kt = _rope(kt, cos[:T], sin[:T])
            sc = 1.0 / math.sqrt(D)
            o_img = _attend(qi, torch.cat([ki, kt], 2), torch.cat([vi, vt], 2), sc)
            if image_side == "model":
                ki, vi, o_img = _model_image_side(call, i, D, T, flux, items)
            # the concepts
            ct = concept_temb(tr, call["timestep"], call["guidance"]).expand(B, -1)
            nc, gates = ctx_norm(c, ct)
            qc = _rms(_heads(_lin(attn.add_q_proj, nc), D), attn.norm_added_q)
            kc = _rms(_heads(_lin(attn.add_k_proj, nc), D), attn.norm_added_k)
            vc = _heads(_lin(attn.add_v_proj, nc), D)
            if rule == "concept":
                oc = _attend(qc, torch.cat([kc, ki], 2), torch.cat([vc, vi], 2), sc)
            elif rule == "cross":
                oc = _attend(qc, ki, vi, sc)
            elif rule == "self":
                oc = _attend(qc, kc, vc, sc)
            else:
                oc = vc
            scores = torch.einsum("bhnd,bhcd->bnc", o_img, oc)
            p = torch.softmax(scores, dim=-1)  # (B, N, C)
            step_means.append(p.mean(1))
            if i in blocks:
                step_sum = step_sum + p
            if s in steps and i in blocks:
                sums = p if sums is None else sums + p
                n += 1
            if not pre_only:
                g1, sh2, sc2, g2 = gates
                c = c + g1[:, None] * _lin(attn.to_add_out, oc.transpose(1, 2).flatten(2))
                h = _ln(c, blk.norm2_context) * (1 + sc2[:, None]) + sh2[:, None]
                c = c + g2[:, None] * _ff(blk.ff_context, h)
        means.append(torch.stack(step_means, 1))  # (B, Bk, C)
        step_sums.append(step_sum)
    return {"mean_map": (sums / n).numpy(), "N": n,
            "per_block_step_mean": torch.stack(means, 2).numpy(),  # (B, Bk, S, C)
            "per_step_sum": torch.stack(step_sums, 1).numpy()}
