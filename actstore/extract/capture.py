"""The forward passes: hooks on the decoder blocks that keep, for every row, the hidden state
at its last real token (:class:`_Capture`), padded batch tensors with position ids from the
mask (:func:`_batch_tensors`), the batch plan of a window (:func:`plan_batches`) and the loop
over a window's batches (:class:`BatchLoop`). Only the (rows, d) vectors leave a hook: the full
(batch, tokens, d) states of every layer are never kept. torch is imported by the functions
that need it, so that ``actstore --help`` stays fast."""
from __future__ import annotations

import time

from actstore.extract.config import BATCH_TOKENS_PER_ROW
from actstore.extract.writer import Narrowing, Staging
from actstore.models import decoder_layers, down_projection

__all__ = ["HOOK_POINT", "TOKEN_RULE", "BatchLoop", "plan_batches"]

HOOK_POINT = ("residual stream after each decoder block, before the final norm "
              "(HF output_hidden_states indexing: 0 = embeddings, i = output of block i-1); "
              "neurons: input of the MLP down projection")
TOKEN_RULE = "last token of the entity (last non-padding position of BOS + prompt + entity)"


class _Stop(Exception):
    """Raised by the last needed hook: blocks after it (and the LM head) need not run."""


class _Capture:
    """Forward hooks that copy the last-token vector of each wanted layer into ``resid`` (and
    the MLP down projection's input into ``neu``); ``idx`` is each row's last real token."""

    def __init__(self, model, layers: list[int], neurons: bool):
        import torch  # deferred: `actstore --help` imports this package
        self.blocks = decoder_layers(model)
        self.layers = layers
        self.neurons = neurons
        self.idx = None          # (B,) long: last real token of each row
        self.resid = None        # (L, B, d) filled by hooks
        self.neu = None
        self.handles = []
        self.last_block = max(layers) - 1   # stop after this block (-1: embeddings only)
        self._torch = torch
        pos = {layer: i for i, layer in enumerate(layers)}
        if 0 in pos:
            # hidden state 0 = input of block 0 (embeddings, scaled as the model scales them)
            self.handles.append(self.blocks[0].register_forward_pre_hook(
                self._pre_hook(pos[0]), with_kwargs=True))
        for layer, p in pos.items():
            if layer >= 1:
                self.handles.append(self.blocks[layer - 1].register_forward_hook(
                    self._post_hook(p, stop=(layer - 1 == self.last_block))))
        if neurons:
            for layer, p in pos.items():
                self.handles.append(down_projection(self.blocks[layer - 1])
                                    .register_forward_pre_hook(self._neuron_hook(p)))

    def _take(self, h):
        return h[self._torch.arange(h.shape[0], device=h.device), self.idx]

    def _pre_hook(self, p):
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            self.resid[p] = self._take(h)
            if self.last_block < 0:
                raise _Stop
        return hook

    def _post_hook(self, p, stop):
        def hook(module, args, output):
            h = output[0] if isinstance(output, (tuple, list)) else output
            self.resid[p] = self._take(h)
            if stop:  # the neuron hook of this block has already run
                raise _Stop
        return hook

    def _neuron_hook(self, p):
        def hook(module, args):
            self.neu[p] = self._take(args[0])
        return hook

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
    window buffers, in dataset order. On a GPU a batch is copied out asynchronously and checked
    one batch later, so the copy overlaps the next forward pass.

    ``lm``: a ``LoadedModel``; ``on_rows(n)``: called as rows are stored (a progress bar).
    """

    def __init__(self, lm, layers: list[int], d_mlp: int | None, *, dtype: str, batch_size: int,
                 side: str, entities: list[str], on_rows=None):
        net, tok = lm.model, lm.tokenizer
        self.device = next(net.parameters()).device
        self.compute_dtype = next(net.parameters()).dtype
        self.cap = _Capture(net, layers, d_mlp is not None)
        self.base = _forward_base(net)
        self.shape = (len(layers), lm.d_model, d_mlp)
        self.batch_size, self.side = batch_size, side
        self.max_slots = batch_size * BATCH_TOKENS_PER_ROW   # token slots of one forward pass
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.narrow = Narrowing(dtype, layers, entities, self.compute_dtype)
        self.staging = (Staging(len(layers), batch_size, lm.d_model, d_mlp, self.compute_dtype)
                        if self.device.type == "cuda" else None)
        self.on_rows = on_rows
        self.real_tokens = self.total_slots = 0
        self.forward_seconds = 0.0   # inside the forward calls (on a GPU: launch time only)

    @property
    def padding_fraction(self) -> float:
        """Padded / total token slots over the batches run so far (0 before any)."""
        return 1 - self.real_tokens / self.total_slots if self.total_slots else 0.0

    def window(self, seqs: list[list[int]], w0: int, bufs) -> None:
        """Run the token id lists ``seqs`` of the window starting at row ``w0`` and store their
        vectors into ``bufs`` (resid, neurons or None) rows 0..len(seqs)."""
        pending = None
        plan = plan_batches([len(q) for q in seqs], self.batch_size, self.max_slots)
        for k, rows in enumerate(plan):
            item = self._forward(k, [seqs[i] for i in rows], rows)
            if pending is not None:
                self._store(pending, bufs, w0)
            pending = item
        if pending is not None:
            self._store(pending, bufs, w0)

    def _forward(self, k: int, batch: list[list[int]], rows: list[int]):
        import torch  # deferred, as above
        ids, mask, pos, last = _batch_tensors(batch, self.pad_id, self.side, self.device)
        self.real_tokens += sum(len(s) for s in batch)
        self.total_slots += mask.numel()
        (L, d, d_mlp), B, cap = self.shape, len(rows), self.cap
        cap.idx = last
        cap.resid = torch.empty((L, B, d), dtype=self.compute_dtype, device=self.device)
        cap.neu = (torch.empty((L, B, d_mlp), dtype=self.compute_dtype, device=self.device)
                   if d_mlp is not None else None)
        t = time.perf_counter()
        with torch.inference_mode():
            try:
                self.base(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
            except _Stop:
                pass
        self.forward_seconds += time.perf_counter() - t
        if self.staging is not None:   # asynchronous copy out; checked one batch later
            return self.staging.copy_out(k, cap.resid, cap.neu, rows, self.device)
        return (cap.resid, cap.neu, rows, None)

    def _store(self, item, bufs, w0: int) -> None:
        self.narrow(item, bufs, w0)
        if self.on_rows is not None:
            self.on_rows(len(item[2]))

    def close(self) -> None:
        """Remove the hooks."""
        self.cap.remove()
