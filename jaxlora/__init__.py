"""jaxlora: LoRA and QLoRA fine-tuning of Llama-family models in JAX.

Interchangeable with the PyTorch stack: reads Hugging Face and bitsandbytes-4bit checkpoints and
writes what ``transformers`` and ``peft`` load with the same numbers.
"""

from jaxlora.model import Model, load_model
from jaxlora.models.config import LlamaConfig, UnsupportedConfigError
from jaxlora.safetensors_io import CheckpointError

__all__ = ["CheckpointError", "LlamaConfig", "Model", "UnsupportedConfigError", "load_model"]
__version__ = "0.1.0"
