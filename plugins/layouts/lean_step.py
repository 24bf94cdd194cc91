"""The native decode step of the lean decode path (hook ``sparsify_lean_step``): a llama model's layers handed to
``sparsify_kernels.decode.DecodeStep``, dense FFNs and activation-sparse ones (``ActivationSparseFFN``) alike.

One C++ call per new token computes every layer, the final norm, the LM head and the argmax, so the dense
baseline and the sparse model decode with the same attention, norms and head, and their ratio measures the
FFN's skipped bytes, not Python overhead. A model is covered when every module the step would compute is one
whose function it knows exactly: ``LlamaRMSNorm`` norms, plain ``nn.Linear`` projections and head (tied or
not, biases allowed) or TEAL's ``InputSparseLinear`` projections (in layers with a dense FFN), FFNs that are HF's ``LlamaMLP`` of plain Linears (the up projection may be dReLU's
``RectifiedLinear``) with an activation ``activation_spec`` knows, or ``ActivationSparseFFN`` (with or without
a predictor), no forward hooks, float32 on the CPU, and the native kernels built. Anything else gets a
one-phrase reason and the lean path's torch step.
"""
from __future__ import annotations

from torch import nn

from .modules import ActivationSparseFFN, InputSparseLinear, TransposedLinear, activation_spec


def _hooked(module: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks for m in module.modules())


def _linear(module, where: str, up: bool = False):
    """``(weight, bias, output_relu, input_threshold)`` of a plain Linear (or dReLU's rectified up projection),
    or of TEAL's ``InputSparseLinear`` (weight ``[in, out]``, its threshold; else ``None``), or a reason."""
    if type(module) is InputSparseLinear:
        return module.weight, module.bias, False, float(module.input_threshold)
    relu = bool(getattr(module, "output_relu", False)) and up
    if not (type(module) is nn.Linear or relu and isinstance(module, nn.Linear)):
        return f"{where} is a {type(module).__name__}"
    return module.weight, module.bias, relu, None


def _norm(module, where: str):
    if type(module).__name__ != "LlamaRMSNorm" or getattr(module, "variance_epsilon", None) is None:
        return f"{where} is a {type(module).__name__}"
    return module.weight, float(module.variance_epsilon)


def _ffn(mlp, where: str) -> dict | str:
    """The FFN's ``LayerWeights`` fields, or why the native step does not compute it."""
    spec = activation_spec(getattr(mlp, "act_fn", None))
    if spec is None:
        return f"{where}: activation {type(getattr(mlp, 'act_fn', None)).__name__}"
    parts = {n: getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")}
    gate = _linear(parts["gate_proj"], f"{where}.gate_proj")
    up = _linear(parts["up_proj"], f"{where}.up_proj", up=True)
    for r in (gate, up):
        if isinstance(r, str):
            return r
    fields = dict(w_gate=gate[0], b_gate=gate[1], w_up=up[0], b_up=up[1], up_relu=up[2], act=spec[0],
                  threshold=spec[1], cut=spec[2], input_thresholds={})
    for name, r in (("gate", gate), ("up", up)):
        if r[3] is not None:
            fields["input_thresholds"][name] = r[3]
    if isinstance(mlp, ActivationSparseFFN):
        if fields["input_thresholds"]:
            return f"{where}: an activation-sparse FFN with input-thresholded projections"
        if not isinstance(parts["down_proj"], TransposedLinear):
            return f"{where}.down_proj is a {type(parts['down_proj']).__name__}"
        fields.update(w_down=parts["down_proj"].weight, b_down=parts["down_proj"].bias, ffn="sparse")
        p = mlp.predictor
        if p is not None:
            fields.update(ffn="predicted", p_in=p.p_in, p_out=p.p_out, p_bias=p.p_bias,
                          p_threshold=float(p.threshold_value()))
        return fields
    if type(mlp).__name__ != "LlamaMLP":
        return f"{where} is a {type(mlp).__name__}"
    down = _linear(parts["down_proj"], f"{where}.down_proj")
    if isinstance(down, str):
        return down
    fields.update(w_down=down[0], b_down=down[1], ffn="dense")
    if down[3] is not None:
        fields["input_thresholds"]["down"] = down[3]
    return fields


def lean_step(model):
    """A ``sparsify_kernels.decode.DecodeStep`` computing ``model`` (llama-shaped), or a one-phrase reason why not."""
    from sparsify_kernels import decode as K
    from sparsify_kernels import native

    if not K.available():
        return f"native kernels unavailable ({native.failure() or 'SPARSIFY_NO_NATIVE=1'})"
    cfg = model.config
    inner = model.model
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    layers = []
    for i, layer in enumerate(inner.layers[: cfg.num_hidden_layers]):
        where = f"layer {i}"
        if _hooked(layer):
            return f"{where}: forward hooks"
        attn = layer.self_attn
        got = {n: _linear(getattr(attn, n), f"{where} {n}") for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        got["ln1"] = _norm(layer.input_layernorm, f"{where} input_layernorm")
        got["ln2"] = _norm(layer.post_attention_layernorm, f"{where} post_attention_layernorm")
        got["ffn"] = _ffn(layer.mlp, f"{where} mlp")
        bad = next((r for r in got.values() if isinstance(r, str)), None)
        if bad is not None:
            return bad
        (wq, bq, _, tq), (wk, bk, _, tk), (wv, bv, _, tv), (wo, bo, _, to) = (
            got[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        ffn = dict(got["ffn"])
        thresholds = {n: t for n, t in (("q", tq), ("k", tk), ("v", tv), ("o", to)) if t is not None}
        thresholds.update(ffn.pop("input_thresholds"))
        layers.append(K.LayerWeights(ln1=got["ln1"][0], eps1=got["ln1"][1], ln2=got["ln2"][0], eps2=got["ln2"][1],
                                     wq=wq, bq=bq, wk=wk, bk=bk, wv=wv, bv=bv, wo=wo, bo=bo,
                                     input_thresholds=thresholds or None, **ffn))
    if len({L.dff for L in layers}) != 1:
        return "FFN widths differ between layers"
    norm = _norm(inner.norm, "the final norm")
    head = _linear(model.lm_head, "lm_head")
    for r in (norm, head):
        if isinstance(r, str):
            return r
    if head[3] is not None:
        return "lm_head thresholds its input"
    if _hooked(model.lm_head) or _hooked(inner.norm):
        return "forward hooks on the final norm or the LM head"
    try:
        return K.DecodeStep(layers, norm[0].detach(), norm[1], head[0].detach(),
                            None if head[1] is None else head[1].detach(), heads, kv, hd)
    except (ValueError, RuntimeError) as exc:
        return str(exc)
