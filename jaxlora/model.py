"""The notebook/script face of jaxlora: ``model = jaxlora.load_model(...); logits = model(ids)``.

A :class:`Model` is a value: its verbs return a new Model (``apply_lora``, ``load_adapter``,
``merge``, ``replace``) or write files (``save_adapter``, ``save_merged``), built on the
functions of :mod:`jaxlora.lora` and :mod:`jaxlora.interop` below it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from jaxlora import lora
from jaxlora.dtypes import FLOAT_DTYPES
from jaxlora.interop import bnb, hf, merged, peft
from jaxlora.models.attention import AttentionImpl
from jaxlora.models.config import LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.stacking import stacked_runs
from jaxlora.weights import Kernels, kernels_for, prepare

log = logging.getLogger(__name__)


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """RoPE positions that restart after left padding: ``cumsum(mask) - 1`` (0 on padding).

    This is what ``transformers``' ``generate`` does, so a left-padded row gets the same logits
    as the same row unpadded.
    """
    return jnp.maximum(jnp.cumsum(attention_mask, axis=-1) - 1, 0).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("module",))
def _forward(module, params, input_ids, positions, segment_ids):
    return module.apply({"params": params}, input_ids, positions, segment_ids)[0]


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A loaded causal LM: architecture, parameter tree, tokenizer (if the checkpoint has one).

    ``params`` mirrors the Hugging Face key paths; its leaves are arrays or weight types
    (``NF4Tensor``, ``LoRAWeight``), all consumed by the same module through ``dense``.
    """

    config: LlamaConfig
    params: dict
    tokenizer: Any = None
    dtype: Any = jnp.float32  # compute dtype
    source: str | None = None
    lora: Any = None  # the LoraConfig applied, if any
    quant: str | None = None
    kernels: Kernels = Kernels()  # what its programs contain (kernels_for the devices)

    def module(self, remat: str = "none") -> LlamaForCausalLM:
        """The Flax module for :attr:`params`: scanning each run of layers when the tree holds
        them stacked (:func:`jaxlora.models.stacking.stack_layers`), unrolled otherwise."""
        param_dtype = self.params["model"]["embed_tokens"]["weight"].dtype
        k = self.kernels
        return LlamaForCausalLM(
            self.config,
            dtype=self.dtype,
            param_dtype=param_dtype,
            remat=remat,
            attn_impl=AttentionImpl(k.attention, k.interpret, k.attention_mesh),
            runs=stacked_runs(self.params),
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
    ) -> jax.Array:
        """``input_ids [B, S]`` int -> logits ``[B, S, vocab]``.

        ``attention_mask [B, S]`` (1 = token, 0 = padding; left or right) masks padded keys;
        positions default to :func:`default_positions` of the mask. Logits at padded query
        positions are finite but meaningless.
        """
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {input_ids.shape}")
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        attention_mask = jnp.asarray(attention_mask, jnp.int32)
        if position_ids is None:
            position_ids = default_positions(attention_mask)
        position_ids = jnp.asarray(position_ids, jnp.int32)
        params = self.prepared_params()
        return _forward(self.module(), params, input_ids, position_ids, attention_mask)

    def prepared_params(self) -> dict:
        """``params`` with every weight set to run on :attr:`kernels` (``weights.prepare``)."""
        return prepare(self.params, self.kernels)

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(self.params))

    def replace(self, **changes: Any) -> Model:
        """A new Model with ``changes`` (``params=``, ``tokenizer=``, ...)."""
        return dataclasses.replace(self, **changes)

    # ---- LoRA (thin wrappers over jaxlora.lora and jaxlora.interop) --------------------------

    def apply_lora(self, cfg: lora.LoraConfig, *, key: jax.Array | None = None) -> Model:
        """A new Model with LoRA injected per ``cfg`` (a :class:`jaxlora.lora.LoraConfig`)."""
        self._no_adapter_yet()
        key = jax.random.key(0) if key is None else key
        return self.replace(params=lora.inject(self.params, cfg, key), lora=cfg)

    def load_adapter(self, directory: str | Path) -> Model:
        """A new Model with the PEFT adapter in ``directory`` applied (see ``interop.peft``).

        An adapter a run saved carries the tokenizer with the run's prompt format as its chat
        template (:mod:`jaxlora.data.prompts`); when ``directory`` has tokenizer files they
        replace the base's (a model loaded without a tokenizer stays without one)."""
        self._no_adapter_yet(directory)
        params, cfg = peft.load_adapter(self.params, directory)
        tokenizer = self.tokenizer
        if tokenizer is not None and (own := _load_tokenizer(Path(directory))) is not None:
            log.info("tokenizer (and its chat template) from the adapter directory %s", directory)
            tokenizer = own
        return self.replace(params=params, lora=cfg, tokenizer=tokenizer)

    def save_adapter(
        self, directory: str | Path, base_model_name_or_path: str | None = None
    ) -> Path:
        """Write the applied adapter as a PEFT adapter directory (see ``interop.peft``), with
        the tokenizer files beside it when the model has a tokenizer. The base's name defaults
        to where the model was loaded from."""
        if self.lora is None:
            raise ValueError("save_adapter: the model has no LoRA adapter applied")
        base = self.source if base_model_name_or_path is None else base_model_name_or_path
        out = peft.save_adapter(self.params, self.lora, directory, base)
        self._save_tokenizer(out)
        return out

    def merge(self) -> Model:
        """A new Model with every LoRA weight folded into its base (float32 merge; NF4 bases
        come back dense)."""
        return self.replace(params=lora.merge(self.params), lora=None)

    def save_merged(self, directory: str | Path, dtype: str | None = None) -> Path:
        """Write a plain HF checkpoint with the adapter merged in (see ``interop.merged``),
        with the tokenizer files beside it."""
        out = merged.save_merged(self.params, self.config, directory, dtype=dtype)
        self._save_tokenizer(out)
        return out

    def _no_adapter_yet(self, directory: Any = None) -> None:
        if self.lora is None:
            return
        msg = "the model already has a LoRA adapter; merge() it first"
        if directory is None:
            raise lora.LoraError(msg)
        raise peft.UnsupportedAdapterError(f"{directory}: {msg}")

    def _save_tokenizer(self, directory: Path) -> None:
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(directory))


def load_model(
    path_or_id: str | Path,
    *,
    dtype: str = "float32",
    compute_dtype: str | None = None,
    quant: str | None = None,
    adapter: str | Path | None = None,
    revision: str | None = None,
    tokenizer: bool = True,
    quant_kwargs: dict[str, Any] | None = None,
    kernel: str = "auto",
) -> Model:
    """Load a Llama-family checkpoint (local HF directory or hub id) into a :class:`Model`.

    Args:
      path_or_id: a directory with ``config.json`` and ``*.safetensors``, or a hub id.
      dtype: ``"float32"`` or ``"bfloat16"`` for the (unquantized) parameters.
      compute_dtype: activations dtype; defaults to ``dtype``.
      quant: ``None`` | ``"nf4"`` | ``"fp4"``: quantize every decoder linear to 4 bits while
        streaming (embeddings, norms and ``lm_head`` stay in ``dtype``). A bitsandbytes 4-bit
        checkpoint is read as stored, whatever this says.
      adapter: a PEFT LoRA adapter directory to apply on top; its tokenizer files, when it has
        them (a jaxlora run's adapter does), replace the base's: they carry the run's prompt
        format as the chat template.
      kernel: the 4-bit matmul (``"auto"``, ``"dequant"``, ``"interpret"``), chosen for the
        devices the model runs on (``jax.devices()``); see ``weights.kernels_for``.
    """
    directory = hf.resolve(path_or_id, revision)
    config, raw = hf.read_config(directory)
    convert = None
    if quant not in (None, "none"):
        convert = bnb.quantizing_converter(quant, dtype=dtype, **(quant_kwargs or {}))
    params = hf.load_params(directory, config, dtype, convert=convert, raw_config=raw)
    is_bnb = bool(raw.get("quantization_config"))
    model = Model(
        config=config,
        params=params,
        tokenizer=_load_tokenizer(directory) if tokenizer else None,
        dtype=FLOAT_DTYPES[compute_dtype or dtype],
        source=str(path_or_id),
        quant=(raw["quantization_config"].get("bnb_4bit_quant_type", "fp4") if is_bnb else quant),
        kernels=kernels_for(
            jax.devices(), kernel, softcap=config.attn_logit_softcapping is not None
        ),
    )
    return model if adapter is None else model.load_adapter(adapter)


def _load_tokenizer(directory: Path):
    if not any(directory.glob("tokenizer*")):
        return None
    return AutoTokenizer.from_pretrained(str(directory))
