"""Where things sit inside a causal LM: decoder blocks, their attention and MLP modules, the
MLP's parts, per architecture.

Used by extraction (hooks on blocks, attention / MLP modules and MLP down projections) and by
the neuron analyses (the norm in front of each block's MLP, the MLP's input and output
weights). Unknown layouts
raise :class:`~actstore.errors.ModelError`: guessing gives silently wrong activations.
"""
from __future__ import annotations

import numpy as np

from actstore.errors import ModelError

__all__ = ["decoder_layers", "down_projection", "attention_module", "mlp_module", "mlp_width",
           "PRE_MLP_NORM", "pre_mlp_norm_name", "mlp_parts", "output_weights", "context_length"]

# Where configs keep the number of positions a model was made for (Llama, Mistral, Qwen, Gemma,
# NeoX, OPT: max_position_embeddings; GPT-2: n_positions; GPT-J/older: n_ctx; others below).
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                 "seq_length")


def context_length(model) -> int | None:
    """The longest token sequence a causal LM's positions cover, from its config (also a
    multimodal model's ``text_config``), or None when the config does not say."""
    cfg = getattr(model, "config", None)
    for c in (cfg, getattr(cfg, "text_config", None)):
        for key in _CONTEXT_KEYS:
            v = getattr(c, key, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def decoder_layers(model) -> list:
    """The decoder blocks of a causal LM, in order (Llama, Mistral, Qwen, Gemma, GPT-2/J, NeoX,
    OPT...)."""
    import torch.nn as nn  # deferred: torch is slow to import
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for path in ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                 "model.decoder.layers", "transformer.blocks", "transformer.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return list(obj)
    # fallback: the longest ModuleList that has one entry per layer
    best = None
    for mod in model.modules():
        if isinstance(mod, nn.ModuleList) and (n is None or len(mod) == n):
            if best is None or len(mod) > len(best):
                best = mod
    if best is None:
        raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}")
    return list(best)


def down_projection(block):
    """The MLP's output projection of one block; its input is the neuron activation vector."""
    mlp = getattr(block, "mlp", None)
    for owner, name in ((mlp, "down_proj"), (mlp, "c_proj"), (mlp, "dense_4h_to_h"),
                        (mlp, "fc_out"), (mlp, "fc2"), (block, "fc2")):
        mod = getattr(owner, name, None) if owner is not None else None
        if mod is not None:
            return mod
    raise ModelError(f"cannot find the MLP down projection in {type(block).__name__} "
                     "(needed for --neurons)")


def attention_module(block):
    """The attention module of one decoder block (Llama/Mistral/Qwen/Gemma/OPT ``self_attn``,
    GPT-2/J ``attn``, NeoX ``attention``...): its output (first element when it returns a
    tuple) is the block's attention output before it is added to the residual stream (before
    any post-attention norm, in blocks that have one)."""
    for name in ("self_attn", "attn", "attention", "self_attention"):
        mod = getattr(block, name, None)
        if mod is not None:
            return mod
    raise ModelError(f"cannot find the attention module in {type(block).__name__} "
                     "(needed for --sites attn_out); known names: self_attn, attn, attention, "
                     "self_attention")


def mlp_module(block):
    """The MLP of one decoder block (``mlp``, ``feed_forward``, ``ffn``; OPT has none: its
    ``fc2``, whose output is the MLP's): its output is the block's MLP output before it is
    added to the residual stream (before any post-feedforward norm)."""
    for owner, name in ((block, "mlp"), (block, "feed_forward"), (block, "ffn"), (block, "fc2")):
        mod = getattr(owner, name, None)
        if mod is not None:
            return mod
    raise ModelError(f"cannot find the MLP module in {type(block).__name__} "
                     "(needed for --sites mlp_out); known names: mlp, feed_forward, ffn, fc2")


def mlp_width(block) -> int:
    """Number of MLP neurons (input features of the down projection)."""
    mod = down_projection(block)
    if hasattr(mod, "in_features"):
        return int(mod.in_features)
    return int(mod.weight.shape[0])  # GPT-2 Conv1D stores (in, out)


# Which norm module feeds each architecture's MLP, by decoder-block class (read from the
# installed transformers' modeling_*.py): "post_attention_layernorm" in the pre-norm blocks
# (Llama, SmolLM2 = Llama, Mistral, Qwen2/3, Gemma 1, OLMo 1), "pre_feedforward_layernorm" in
# Gemma 2/3 (whose post_attention_layernorm normalises the attention OUTPUT), None in OLMo 2/3
# (post-norm: post_attention_layernorm normalises the attention output and the MLP reads the
# raw residual). Unknown blocks are refused: guessing a norm gives silently wrong neurons.
PRE_MLP_NORM = {
    "LlamaDecoderLayer": "post_attention_layernorm",
    "MistralDecoderLayer": "post_attention_layernorm",
    "Qwen2DecoderLayer": "post_attention_layernorm",
    "Qwen3DecoderLayer": "post_attention_layernorm",
    "SmolLM3DecoderLayer": "post_attention_layernorm",
    "GemmaDecoderLayer": "post_attention_layernorm",
    "OlmoDecoderLayer": "post_attention_layernorm",
    "Gemma2DecoderLayer": "pre_feedforward_layernorm",
    "Gemma3DecoderLayer": "pre_feedforward_layernorm",
    "Olmo2DecoderLayer": None,
    "Olmo3DecoderLayer": None,
}


def pre_mlp_norm_name(block):
    """Attribute name of the norm in front of ``block``'s MLP (None: the MLP reads the raw
    residual), from :data:`PRE_MLP_NORM` by the block's class (or a base class); unknown layouts
    raise ModelError."""
    for cls in type(block).__mro__:
        if cls.__name__ in PRE_MLP_NORM:
            return PRE_MLP_NORM[cls.__name__]
    raise ModelError(
        f"--method projection does not know which norm feeds the MLP of {type(block).__name__} "
        f"blocks (known: {', '.join(sorted(PRE_MLP_NORM))}); refusing to guess. Extract the "
        "neurons instead (`actstore extract --neurons`, method stored)")


def mlp_parts(block):
    """(norm or None, gate_proj, up_proj, act_fn) of a gated-MLP decoder block of a known
    architecture (:data:`PRE_MLP_NORM`): the norm is the module in front of the MLP, None where
    the MLP reads the raw residual (OLMo 2)."""
    norm_name = pre_mlp_norm_name(block)
    mlp = getattr(block, "mlp", None)
    parts = {"mlp.gate_proj": getattr(mlp, "gate_proj", None),
             "mlp.up_proj": getattr(mlp, "up_proj", None),
             "mlp.act_fn": getattr(mlp, "act_fn", None)}
    if norm_name is not None:
        parts[norm_name] = getattr(block, norm_name, None)
    missing = [k for k, v in parts.items() if v is None]
    if missing:
        raise ModelError(
            f"--method projection needs a gated MLP (Llama, Mistral, Qwen2, Gemma, OLMo 2...); "
            f"{type(block).__name__} has no {', '.join(missing)}")
    norm = None if norm_name is None else parts[norm_name]
    return norm, parts["mlp.gate_proj"], parts["mlp.up_proj"], parts["mlp.act_fn"]


def output_weights(block, d_model: int) -> np.ndarray:
    """(d_model, d_mlp) float64 output weights of ``block``'s MLP: column j is neuron j's
    direction in residual space. The orientation comes from the module type, never from the
    shape (which is ambiguous when d_model == d_mlp): ``nn.Linear`` stores (out, in), GPT-2's
    ``Conv1D`` (in, out); other module types are refused."""
    import torch

    mod = down_projection(block)
    w = mod.weight.detach().to(torch.float64).cpu().numpy()
    if isinstance(mod, torch.nn.Linear):
        out = w
    elif any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers")
             for c in type(mod).__mro__):
        out = w.T
    else:
        raise ModelError(f"unknown MLP output projection type {type(mod).__name__} in "
                                f"{type(block).__name__}: cannot tell its weight orientation")
    if out.shape[0] != d_model:
        raise ModelError(f"the MLP output projection of {type(block).__name__} maps to "
                                f"width {out.shape[0]}, the probes have width {d_model}")
    return out
