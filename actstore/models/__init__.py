"""Causal language models: ``loading`` (the embedded default, Hugging Face ids and paths) and
``architecture`` (decoder blocks, MLP parts and norms per architecture)."""
from __future__ import annotations

from actstore.errors import ModelError
from actstore.models.architecture import (
                                          PRE_MLP_NORM,
                                          attention_module,
                                          context_length,
                                          decoder_layers,
                                          down_projection,
                                          mlp_module,
                                          mlp_parts,
                                          mlp_width,
                                          output_weights,
                                          pre_mlp_norm_name,
)
from actstore.models.loading import (
                                          COMPUTE_DTYPES,
                                          DEFAULT_MODEL,
                                          EMBEDDED,
                                          EMBEDDED_STORE_DTYPE,
                                          LoadedModel,
                                          default_store_dtype,
                                          embedded_model_file,
                                          load_model,
                                          load_tokenizer,
                                          resolve_device,
                                          wrap_model,
)

__all__ = ["ModelError", "PRE_MLP_NORM", "context_length", "decoder_layers", "down_projection",
           "attention_module", "mlp_module", "mlp_parts", "mlp_width", "output_weights",
           "pre_mlp_norm_name", "COMPUTE_DTYPES", "DEFAULT_MODEL", "EMBEDDED",
           "EMBEDDED_STORE_DTYPE", "LoadedModel", "default_store_dtype", "embedded_model_file",
           "load_model", "load_tokenizer", "resolve_device", "wrap_model"]
