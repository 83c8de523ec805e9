"""jaxlora: LoRA and QLoRA fine-tuning of Llama-family models in JAX.

Interchangeable with the PyTorch stack: reads Hugging Face and bitsandbytes-4bit checkpoints and
writes what ``transformers`` and ``peft`` load with the same numbers. The packages follow the
stages of a run (docs/architecture.md): ``config`` -> ``kernels`` -> ``weights`` -> ``models``
-> ``lora`` -> ``data`` -> ``interop`` -> ``model`` / ``sampling`` -> ``training`` -> the
commands ``train``, ``export``, ``generate``.
"""

from jaxlora.interop.safetensors import CheckpointError
from jaxlora.model import Model, load_model
from jaxlora.models.config import LlamaConfig, UnsupportedConfigError

__all__ = ["CheckpointError", "LlamaConfig", "Model", "UnsupportedConfigError", "load_model"]
__version__ = "0.1.0"
