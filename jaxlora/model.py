"""The notebook/script face of jaxlora: ``model = jaxlora.load_model(...); logits = model(ids)``.

A :class:`Model` is a value: its verbs return a new Model (``apply_lora``, ``load_adapter``,
``merge``, ``replace``; with adapters by name, PEFT's ``set_adapter``, ``disable_adapter``,
``delete_adapter``, ``merge_adapter``) or write files (``save_adapter``, ``save_merged``), built
on the functions of :mod:`jaxlora.lora`, :mod:`jaxlora.adapters` and :mod:`jaxlora.interop`.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

from jaxlora import lora
from jaxlora.adapters import AdapterSet, check_name, read_adapter
from jaxlora.dtypes import FLOAT_DTYPES
from jaxlora.interop import bnb, hf, merged, peft
from jaxlora.models.attention import AttentionImpl
from jaxlora.models.config import LlamaConfig
from jaxlora.models.llama import LlamaForCausalLM
from jaxlora.models.registry import embedding, family
from jaxlora.models.stacking import StackingSink, stacked_runs
from jaxlora.weights import Kernels, kernels_for, prepare

log = logging.getLogger(__name__)

# The models whose adapters a ``with model.disable_adapter() as base:`` block has switched off.
# PEFT's idiom switches in place (``with model.disable_adapter(): model(ids)``); a Model is a
# value, so that spelling would run the adapter inside the block: it raises instead.
_DISABLED: contextvars.ContextVar[frozenset[int]] = contextvars.ContextVar(
    "jaxlora_disabled_adapters", default=frozenset()
)


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
    adapter_set: AdapterSet | None = None  # adapters loaded by name (load_adapter(..., name=))
    # config.json's token ids and generation_config.json: where generate stops, what exports keep
    generation: hf.Generation = dataclasses.field(default_factory=hf.Generation)

    def module(self, remat: str = "none", mlp_chunk: int = 0) -> LlamaForCausalLM:
        """The Flax module for :attr:`params`: scanning each run of layers when the tree holds
        them stacked (:func:`jaxlora.models.stacking.stack_layers`), unrolled otherwise;
        ``remat`` and ``mlp_chunk`` as ``train.remat`` and ``train.mlp_chunk``."""
        if id(self) in _DISABLED.get():
            raise lora.LoraError(
                "this model's adapters are disabled inside `with model.disable_adapter() as "
                "base:` — run `base`, the value the with-statement gives (a Model is a value: "
                "the model itself keeps its adapter)"
            )
        param_dtype = embedding(self.config, self.params).dtype
        k = self.kernels
        return family(self.config).module(
            self.config,
            dtype=self.dtype,
            param_dtype=param_dtype,
            remat=remat,
            attn_impl=AttentionImpl(k.attention, k.interpret, k.attention_mesh),
            runs=stacked_runs(self.params),
            mlp_chunk=mlp_chunk,
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

    def load_adapter(self, directory: str | Path, name: str | None = None) -> Model:
        """A new Model with the PEFT adapter in ``directory`` applied (see ``interop.peft``).

        An adapter a run saved carries the tokenizer with the run's prompt format as its chat
        template (:mod:`jaxlora.data.prompts`); when ``directory`` has tokenizer files they
        replace the base's (a model loaded without a tokenizer stays without one).

        With ``name``, the adapter joins the others loaded by name over the same base (PEFT's
        ``load_adapter(path, adapter_name)``, see :mod:`jaxlora.adapters`): the first becomes
        active, later ones wait for :meth:`set_adapter`; ranks and targets may differ."""
        if name is not None:
            return self._load_named(directory, name)
        self._no_adapter_yet(directory)
        params, cfg = peft.load_adapter(self.params, directory)
        tokenizer = self.tokenizer
        if tokenizer is not None and (own := _load_tokenizer(Path(directory))) is not None:
            log.info("tokenizer (and its chat template) from the adapter directory %s", directory)
            tokenizer = own
        return self.replace(params=params, lora=cfg, tokenizer=tokenizer)

    # ---- several adapters by name (PEFT's vocabulary; jaxlora.adapters) ----------------------

    @property
    def adapters(self) -> tuple[str, ...]:
        """The names of the adapters loaded by name, in load order."""
        return () if self.adapter_set is None else tuple(self.adapter_set.named)

    @property
    def active_adapter(self) -> str | None:
        """The adapter by name that runs (``None``: none, or the adapter has no name)."""
        return None if self.adapter_set is None else self.adapter_set.active

    def set_adapter(self, name: str) -> Model:
        """A new Model running the adapter ``name`` (its tokenizer too, if it brought one)."""
        return self._with_adapters(self._named("set_adapter").activate(name))

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[Model]:
        """``with model.disable_adapter() as base:`` — ``base`` runs the base alone.

        A Model is a value, so unlike PEFT's in-place switch the base is the model the
        context gives; ``model`` itself keeps its adapter inside and after the block."""
        base = self._with_adapters(self._named("disable_adapter").activate(None))
        token = _DISABLED.set(_DISABLED.get() | {id(self)})
        try:
            yield base
        finally:
            _DISABLED.reset(token)

    def delete_adapter(self, name: str) -> Model:
        """A new Model without the adapter ``name``; deleting the active one activates the first
        one left (PEFT's rule), deleting the last leaves the base alone."""
        return self._with_adapters(self._named("delete_adapter").remove(name))

    def merge_adapter(self, name: str) -> Model:
        """The adapter ``name`` folded into the weights, the other adapters dropped: PEFT's
        ``set_adapter(name)`` then ``merge_and_unload()`` (:meth:`merge`)."""
        return self.set_adapter(name).merge()

    def _load_named(self, directory: str | Path, name: str) -> Model:
        if self.adapter_set is None and self.lora is not None:
            raise lora.LoraError(
                f"{directory}: the model has an adapter without a name; merge() it first, or "
                "load every adapter with a name"
            )
        adapters = self.adapter_set or AdapterSet.over(self.params, self.tokenizer)
        check_name(name, adapters.named)  # before reading any file
        own = _load_tokenizer(Path(directory)) if self.tokenizer is not None else None
        adapter = read_adapter(adapters.base, directory, own)
        return self._with_adapters(adapters.add(name, adapter))

    def _named(self, verb: str) -> AdapterSet:
        if self.adapter_set is None:
            raise lora.LoraError(f"{verb}: no adapter is loaded by name (load_adapter(path, name))")
        return self.adapter_set

    def _with_adapters(self, adapters: AdapterSet) -> Model:
        """This model running ``adapters``' active adapter (or, with none loaded, the base)."""
        return self.replace(
            params=adapters.params(),
            lora=adapters.config(),
            tokenizer=adapters.tokenizer(),
            adapter_set=adapters if adapters.named else None,
        )

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
        come back dense): PEFT's ``merge_and_unload``; of adapters loaded by name, the active
        one is folded in and the others are dropped."""
        return self.replace(params=lora.merge(self.params), lora=None, adapter_set=None)

    def save_merged(self, directory: str | Path, dtype: str | None = None) -> Path:
        """Write a plain HF checkpoint with the adapter merged in (see ``interop.merged``),
        with the tokenizer files beside it."""
        out = merged.save_merged(
            self.params, self.config, directory, dtype=dtype, generation=self.generation
        )
        self._save_tokenizer(out)
        return out

    def _no_adapter_yet(self, directory: Any = None) -> None:
        if self.lora is None and self.adapter_set is None:
            return
        msg = "the model already has a LoRA adapter; merge() it first"
        if self.adapter_set is not None:
            fix = "give this one a name too, or " if directory is not None else ""
            msg = (
                f"the model holds adapters by name {list(self.adapters)}; {fix}"
                "merge_adapter(name) one first"
            )
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
    sink: StackingSink | None = None,
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
      sink: where the leaves go as they stream in: a
        :class:`~jaxlora.models.stacking.StackingSink` stacks the layers for scan on the way
        (the train step's layout, on its shardings) instead of loading them one by one.
    """
    directory = hf.resolve(path_or_id, revision)
    config, raw = hf.read_config(directory)
    convert = None
    if quant not in (None, "none"):
        convert = bnb.quantizing_converter(quant, dtype=dtype, **(quant_kwargs or {}))
    params = hf.load_params(directory, config, dtype, convert=convert, raw_config=raw, sink=sink)
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
        generation=hf.read_generation(directory, raw),
    )
    return model if adapter is None else model.load_adapter(adapter)


def _load_tokenizer(directory: Path):
    if not any(directory.glob("tokenizer*")):
        return None
    return AutoTokenizer.from_pretrained(str(directory))
