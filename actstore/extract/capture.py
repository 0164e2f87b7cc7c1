"""The forward passes: hooks on the decoder blocks and their attention / MLP modules that keep,
for every row, the vectors of the wanted tokens at every wanted site (:class:`_Capture`),
padded batch tensors with position ids from the mask (:func:`_batch_tensors`), the batch plan
of a window (:func:`plan_batches`) and the loop over a window's batches (:class:`BatchLoop`).
Only the (rows, d) vectors leave a hook: the full (batch, tokens, d) states of every layer are
never kept, and the forward stops after the deepest block needed. torch is imported by the
functions that need it, so that ``actstore --help`` stays fast."""
from __future__ import annotations

import time

import numpy as np

from actstore.extract.config import BATCH_TOKENS_PER_ROW
from actstore.extract.tokens import Selection
from actstore.extract.writer import Batch, Narrowing, Staging
from actstore.models import attention_module, decoder_layers, down_projection, mlp_module

__all__ = ["HOOK_POINT", "SITE_HOOKS", "TOKEN_RULE", "TOKEN_RULES", "BatchLoop", "plan_batches"]

# What version-1 stores record as meta "hook_point" (a paper extraction's header keeps it).
HOOK_POINT = ("residual stream after each decoder block, before the final norm "
              "(HF output_hidden_states indexing: 0 = embeddings, i = output of block i-1); "
              "neurons: input of the MLP down projection")
# Where each site is read (meta "hook_points"). attn_out / mlp_out are the outputs of the
# modules themselves: blocks with post-norms (Gemma 2/3, OLMo 2) add norm(attn_out) /
# norm(mlp_out) to the residual, so there they are not the exact residual update.
SITE_HOOKS = {
    "resid": HOOK_POINT.split("; neurons")[0],
    "attn_out": ("output of block i-1's attention module (forward hook; the first element of a "
                 "tuple output), before it is added to the residual stream; in blocks with a "
                 "post-attention norm (Gemma 2/3, OLMo 2) before that norm, so not the exact "
                 "residual update there"),
    "mlp_out": ("output of block i-1's MLP module (forward hook), before it is added to the "
                "residual stream; in blocks with a post-feedforward norm (Gemma 2/3, OLMo 2) "
                "before that norm, so not the exact residual update there"),
    "neurons": "input of the MLP down projection of block i-1 (forward pre-hook)",
}
TOKEN_RULE = "last token of the entity (last non-padding position of BOS + prompt + entity)"
TOKEN_RULES = {
    "last-entity": TOKEN_RULE,
    "first-entity": "first token of the entity (tokens found from the tokenizer's offsets)",
    "mean": ("mean over the entity's tokens (found from the tokenizer's offsets); without an "
             "entity, over the text's tokens (BOS excluded)"),
    "last": "last token of the text (last non-padding position)",
    "all": ("every token of every text, BOS included: one row per token, text i's rows "
            "tokens/offsets[i]..offsets[i+1], their ids in tokens/ids"),
}


class _Stop(Exception):
    """Raised by the last needed hook: blocks after it (and the LM head) need not run."""


class _Capture:
    """Forward hooks that copy the kept vectors of each wanted layer and site into
    ``out[site]`` (L, K, d): gathered at the flat (batch x token) indices ``sel``, or, for
    ``--position mean``, averaged with the (B, T) weights ``weights``."""

    def __init__(self, model, layers: list[int], sites: tuple[str, ...]):
        import torch  # deferred: `actstore --help` imports this package
        self.blocks = decoder_layers(model)
        self.layers = layers
        self.sel = None          # (K,) long: flat index into (B * T) of each kept vector
        self.weights = None      # (B, T) float32: mean weights (--position mean)
        self.out = {}            # site -> (L, K, d) filled by hooks
        self.handles = []
        self.last_block = max(layers) - 1   # stop after this block (-1: embeddings only)
        self._torch = torch
        pos = {layer: i for i, layer in enumerate(layers)}
        if "resid" in sites and 0 in pos:
            # hidden state 0 = input of block 0 (embeddings, scaled as the model scales them)
            self.handles.append(self.blocks[0].register_forward_pre_hook(
                self._pre_hook(pos[0]), with_kwargs=True))
        for layer, p in pos.items():
            if layer < 1:
                continue
            block = self.blocks[layer - 1]
            # the hooks of a block run before its own forward hook (the stop, registered last)
            if "attn_out" in sites:
                self.handles.append(attention_module(block).register_forward_hook(
                    self._post_hook("attn_out", p)))
            if "mlp_out" in sites:
                self.handles.append(mlp_module(block).register_forward_hook(
                    self._post_hook("mlp_out", p)))
            if "neurons" in sites:
                self.handles.append(down_projection(block).register_forward_pre_hook(
                    self._neuron_hook(p)))
            if "resid" in sites:
                self.handles.append(block.register_forward_hook(self._post_hook("resid", p)))
        if self.last_block >= 0:
            self.handles.append(self.blocks[self.last_block].register_forward_hook(self._stop))

    def _take(self, h):
        if self.weights is not None:   # float32 sums: a sum of fp16 states may overflow
            return self._torch.bmm(self.weights.unsqueeze(1), h.float()).squeeze(1).to(h.dtype)
        return h.reshape(-1, h.shape[-1])[self.sel]

    def _pre_hook(self, p):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.out["resid"][p] = self._take(h)
            if self.last_block < 0:
                raise _Stop
        return hook

    def _post_hook(self, site, p):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self.out[site][p] = self._take(h)
        return hook

    def _neuron_hook(self, p):
        def hook(module, args):
            self.out["neurons"][p] = self._take(args[0])
        return hook

    @staticmethod
    def _stop(module, args, output):
        raise _Stop

    def remove(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def _batch_tensors(seqs: list[list[int]], pad_id: int, side: str, device):
    """input_ids, attention_mask, position_ids (from the mask), last-token index."""
    import torch  # deferred, as above
    T = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            ids[i, T - len(s):] = torch.tensor(s)
            mask[i, T - len(s):] = 1
        else:
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    # last position whose mask is 1, whichever side the padding is on
    last = T - 1 - mask.flip(1).argmax(1)
    return ids.to(device), mask.to(device), pos.to(device), last.to(device)


def plan_batches(lengths: list[int], batch_size: int,
                 max_slots: int | None = None) -> list[list[int]]:
    """Batches of row positions for one window: longest first (stable, so equal lengths keep
    dataset order and the plan is deterministic), ``batch_size`` rows each. A batch whose
    token slots (rows x its longest row) exceed ``max_slots`` is split into batches as large
    as ``max_slots`` allows (at least one row), its longest rows first; batches within
    ``max_slots`` stay exactly as they were, and with them their values (a batch's shape
    changes them at rounding level)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    plan = []
    for b in range(0, len(order), batch_size):
        batch = order[b:b + batch_size]
        while batch:   # batch[0] is the longest row of what is left
            k = len(batch) if max_slots is None else max(
                1, min(len(batch), max_slots // max(1, lengths[batch[0]])))
            plan.append(batch[:k])
            batch = batch[k:]
    return plan


def _forward_base(model):
    """The decoder without the LM head (its logits are never needed)."""
    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    return base if base is not None and base is not model else model


class BatchLoop:
    """The forward passes of one run. :meth:`window` runs a window's batches (sorted by token
    length inside the window, which cuts padding) and narrows each batch's vectors into the
    window buffers. On a GPU a batch is copied out asynchronously and checked one batch later,
    so the copy overlaps the next forward pass.

    ``lm``: a ``LoadedModel``; ``sites``: {site: width}; ``labels``: each text's entity (or
    text), for error messages; ``on_rows(n)``: called as rows are stored (a progress bar).
    """

    def __init__(self, lm, layers: list[int], sites: dict[str, int], *, dtype: str,
                 batch_size: int, side: str, labels: list[str], ragged: bool = False,
                 on_rows=None):
        net, tok = lm.model, lm.tokenizer
        self.device = next(net.parameters()).device
        self.compute_dtype = next(net.parameters()).dtype
        self.cap = _Capture(net, layers, tuple(sites))
        self.base = _forward_base(net)
        self.n_layers, self.sites = len(layers), dict(sites)
        self.batch_size, self.side = batch_size, side
        self.max_slots = batch_size * BATCH_TOKENS_PER_ROW   # token slots of one forward pass
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.narrow = Narrowing(dtype, layers, labels, self.compute_dtype, ragged)
        self.staging = (Staging(len(layers), batch_size, self.sites, self.compute_dtype)
                        if self.device.type == "cuda" else None)
        self.on_rows = on_rows
        self.real_tokens = self.total_slots = 0
        self.forward_seconds = 0.0   # inside the forward calls (on a GPU: launch time only)

    @property
    def padding_fraction(self) -> float:
        """Padded / total token slots over the batches run so far (0 before any)."""
        return 1 - self.real_tokens / self.total_slots if self.total_slots else 0.0

    def window(self, sel: Selection, w0: int, bufs: dict) -> None:
        """Run the texts of the window ``sel`` (its rows start at store row ``w0``) and store
        the kept vectors into ``bufs`` ({site: (L, R, d)})."""
        pending = None
        plan = plan_batches([len(q) for q in sel.seqs], self.batch_size, self.max_slots)
        for k, idx in enumerate(plan):
            item = self._forward(k, sel, idx)
            if pending is not None:
                self._store(pending, bufs, w0)
            pending = item
        if pending is not None:
            self._store(pending, bufs, w0)

    def _index(self, sel: Selection, idx: list[int], T: int):
        """What the hooks keep of a (B, T) batch of the texts ``sel[idx]``: flat indices (or
        mean weights), and the window row and text of each kept vector."""
        import torch  # deferred, as above
        seqs, toks = [sel.seqs[i] for i in idx], [sel.tokens[i] for i in idx]
        shift = [T - len(q) if self.side == "left" else 0 for q in seqs]   # padding in front
        dest = np.concatenate([sel.dest[i] for i in idx])
        texts = np.concatenate([np.full(len(sel.dest[i]), sel.texts[i]) for i in idx])
        if sel.mean:
            w = torch.zeros((len(idx), T), dtype=torch.float32)
            for r, (s, tk) in enumerate(zip(shift, toks)):
                w[r, torch.from_numpy(s + tk)] = 1.0 / len(tk)
            return None, w.to(self.device), dest, texts
        flat = np.concatenate([r * T + s + tk for r, (s, tk) in enumerate(zip(shift, toks))])
        return torch.from_numpy(flat).to(self.device), None, dest, texts

    def _forward(self, k: int, sel: Selection, idx: list[int]) -> Batch:
        import torch  # deferred, as above
        batch = [sel.seqs[i] for i in idx]
        ids, mask, pos, _ = _batch_tensors(batch, self.pad_id, self.side, self.device)
        self.real_tokens += sum(len(s) for s in batch)
        self.total_slots += mask.numel()
        cap = self.cap
        cap.sel, cap.weights, dest, texts = self._index(sel, idx, ids.shape[1])
        K = len(dest)
        cap.out = {site: torch.empty((self.n_layers, K, d), dtype=self.compute_dtype,
                                     device=self.device) for site, d in self.sites.items()}
        t = time.perf_counter()
        with torch.inference_mode():
            try:
                self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            except _Stop:
                pass
        self.forward_seconds += time.perf_counter() - t
        item = Batch(cap.out, dest, texts)
        if self.staging is not None:   # asynchronous copy out; checked one batch later
            return self.staging.copy_out(k, item, self.device)
        return item

    def _store(self, item: Batch, bufs: dict, w0: int) -> None:
        self.narrow(item, bufs, w0)
        if self.on_rows is not None:
            self.on_rows(len(item.dest))

    def close(self) -> None:
        """Remove the hooks."""
        self.cap.remove()
