"""Run a GGUF in llama.cpp (llama-cpp-python) and print what the tests compare, as JSON.

Runs under the separate venv that has ``llama_cpp`` (``JAXLORA_LLAMA_CPP_PYTHON``), not jaxlora's:
``python _llama_cpp_run.py '{"model": ..., "lora": null, "ids": [...], "new": 8, "text": ...}'``.
Prints ``{"logits": [[...]] per prompt position, "greedy": [ids], "tokenized": [ids]}``.
"""

import json
import sys

import numpy as np
from llama_cpp import Llama

GGML_TYPE_F32 = 0  # the KV cache in float32 (llama.cpp's default is F16): f32 end to end


def main() -> None:
    req = json.loads(sys.argv[1])
    llm = Llama(
        model_path=req["model"],
        lora_path=req.get("lora"),
        n_ctx=64,
        n_batch=64,
        n_threads=1,
        logits_all=True,
        type_k=GGML_TYPE_F32,
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    ids = list(req["ids"])
    llm.eval(ids)
    logits = np.array(llm.scores[: len(ids)], np.float32)
    greedy = []
    for _ in range(req["new"]):
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        greedy.append(tok)
        if tok == llm.token_eos():
            break
        llm.eval([tok])
    tokenized = llm.tokenize(req["text"].encode(), add_bos=True, special=True)
    print(json.dumps({"logits": logits.tolist(), "greedy": greedy, "tokenized": tokenized}))


if __name__ == "__main__":
    main()
