"""The model whose MLP weights the projection method and the probe cosines read, and the checks
that it is the model the store was extracted with. A model named in a store's metadata is loaded
only when the caller asks for it (``model="store"``, ``--model store``), never by default."""
from __future__ import annotations

import os

from actstore.errors import ModelError
from actstore.models import LoadedModel, decoder_layers, load_model, mlp_width
from actstore.store import ActivationStore
from probes.errors import NeuronReportError

__all__ = ["resolve_model", "hf_model", "store_model_meta", "WEIGHT_KEYS", "STORE_MODEL"]

WEIGHT_KEYS = ("file_sha256", "files_sha256")   # weight-file hashes recorded by both sides
STORE_MODEL = "store"   # --model store: load the model the store's metadata records


def hf_model(model):
    """The HF model inside a ``LoadedModel`` (anything with .model and .tokenizer), else
    ``model`` itself."""
    return model.model if hasattr(model, "tokenizer") and hasattr(model, "model") else model


def store_model_meta(store: ActivationStore) -> dict:
    """The store's ``meta["model"]`` record ({} when it has none)."""
    meta = store.meta if isinstance(store.meta, dict) else {}
    m = meta.get("model")
    return m if isinstance(m, dict) else {}


def _recorded(meta: dict) -> str:
    """The model a store records, in words ("the model in the local directory PATH")."""
    if meta.get("source") == "local" and meta.get("path"):
        return f"the model in the local directory {meta['path']}"
    where = {"hub": "a Hugging Face id", "embedded": "embedded"}.get(meta.get("source"))
    return f"model {meta.get('id')!r}" + (f" ({where})" if where else "")


def _store_model(store, meta: dict):
    """The name or path of the model the store records (``model="store"``)."""
    if not meta.get("id"):
        raise NeuronReportError(f"{store.path}: the store records no model; pass the model it "
                                "was extracted with (--model NAME_OR_PATH)")
    if meta.get("source") == "in-memory":
        raise NeuronReportError(
            f"{store.path}: the store was extracted from an in-memory model "
            f"({meta.get('id')!r}) that cannot be reloaded by name; pass --model NAME_OR_PATH "
            "(or model=<the HF model> in Python)")
    return meta.get("path") if meta.get("source") == "local" and meta.get("path") else meta["id"]


def _no_model(store, meta: dict) -> NeuronReportError:
    """No model given: a model named in a store's metadata is never loaded implicitly."""
    _store_model(store, meta)   # raises first when the store records no reloadable model
    return NeuronReportError(
        f"{store.path}: --method projection and --probe read the model's MLP weights and no "
        f"model was given; the store records {_recorded(meta)}: pass --model {STORE_MODEL} to "
        f"load that one, or --model NAME_OR_PATH (in Python model={STORE_MODEL!r} or a name, "
        "path or loaded model)")


def _load(name: str):
    """``load_model(name)`` on CPU in float32; any failure is one line naming the model."""
    try:
        return load_model(name, device="cpu", compute_dtype="float32")
    except ModelError as exc:   # every load failure is one (actstore.models.loading)
        raise NeuronReportError(f"{exc}; the neuron weights need it") from None


def resolve_model(store: ActivationStore, model=None) -> tuple:
    """The HF model and its info dict, for the projection method and the probe cosines.

    Parameters
    ----------
    store : ActivationStore
        The store the model must belong to.
    model : str, os.PathLike, LoadedModel or HF model
        "store": the model named in the store's metadata (an explicit choice: None is refused,
        naming that model); a name/path for :func:`actstore.models.load_model` (loaded on CPU
        in float32); a ``LoadedModel``; or a loaded HF model.

    Returns
    -------
    (net, info) : (torch.nn.Module, dict)
        The HF model and its info ("id", "source", weight hashes where known).

    Raises
    ------
    NeuronReportError
        No model given, the model cannot be loaded, or it disagrees with the store (d_model,
        blocks, architecture, MLP width, weight file hashes where both sides record them).
    """
    meta = store_model_meta(store)
    if model is None:
        raise _no_model(store, meta)
    if isinstance(model, str) and model == STORE_MODEL:
        model = _store_model(store, meta)
    if isinstance(model, (str, os.PathLike)):
        lm = _load(str(model))
        net, info = lm.model, lm.info
    elif isinstance(model, LoadedModel):
        net, info = model.model, dict(model.info)
    elif hasattr(model, "config") and hasattr(model, "modules"):
        net, info = model, {"id": getattr(model.config, "_name_or_path", None) or
                            type(model).__name__, "source": "in-memory"}
    else:
        raise NeuronReportError(f"model must be a name/path or a loaded model, got "
                                f"{type(model).__name__}")
    _check_model(store, net, info, meta)
    return net, info


def _check_model(store, net, info, meta) -> None:
    blocks = decoder_layers(net)
    have = {"architecture": type(net).__name__, "n_layers": len(blocks),
            "d_model": int(net.config.hidden_size)}
    diffs = []
    if have["d_model"] != store.d_model:
        diffs.append(f"d_model {have['d_model']} vs the store's {store.d_model}")
    for k in ("architecture", "n_layers"):
        if meta.get(k) is not None and meta[k] != have[k]:
            diffs.append(f"{k} {have[k]} vs the store's {meta[k]}")
    if max(store.layers) > len(blocks):
        diffs.append(f"{len(blocks)} blocks but the store has hidden state {max(store.layers)}")
    if store.d_mlp is not None and not diffs:
        try:
            m = mlp_width(blocks[0])
        except ValueError:
            m = None
        if m is not None and m != store.d_mlp:
            diffs.append(f"d_mlp {m} vs the store's {store.d_mlp}")
    for k in WEIGHT_KEYS:
        if info.get(k) and meta.get(k) and info[k] != meta[k]:
            diffs.append("different weight files (sha256)")
    if diffs:
        raise NeuronReportError(
            f"model mismatch: {info.get('id')!r} is not the model {store.path} was extracted with "
            f"({meta.get('id')!r}): {'; '.join(diffs)}")
