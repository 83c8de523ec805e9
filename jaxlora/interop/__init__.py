"""The ecosystem's formats in and out: Hugging Face safetensors checkpoints (dense and
bitsandbytes 4-bit), PEFT adapters, merged exports.

``safetensors`` resolves and streams checkpoint files; ``hf`` turns a checkpoint directory into a
parameter tree and back; ``bnb`` is bitsandbytes' per-tensor 4-bit layout; ``peft`` /
``peft_config`` are PEFT's adapter files; ``merged`` folds adapters in for a plain export.
"""
