"""Runs in the llama-cpp side environment (see sides.py): greedy generation in llama.cpp, plain and under control
vectors, for the interop tests.

A control vector file is read by llama.cpp's own GGUF parser (ggml's `gguf_init_from_file`, through ctypes on the
libggml-base that llama-cpp-python ships) into the buffer `--control-vector` builds, by the steps of
`common_control_vector_load_one` in llama.cpp's common/common.cpp: each `direction.N` tensor, f32 and 1-D, goes to
the slot of layer N (the buffer starts at layer 1; N = 0 is refused). The buffer is applied with
`llama_set_adapter_cvec` over layers 1..n_layer, as llama.cpp's tools do. Greedy: the argmax of the logits llama.cpp
returns, one token at a time, until an end token or max_new_tokens.

Request: {"model": gguf, "texts": [chat-formatted prompt], "runs": {name: control vector path | null},
"max_new_tokens": n, "eos": [token ids], "threads": n}.
Answer: {"version", "prompt_ids", "n_layer", "n_embd", "tokens": {run: [[ids]]}, "cvec": {run: {layer: norm}}};
arrays "first_<run>" [prompts, vocab]: the logits after each prompt.
"""

from __future__ import annotations

import ctypes
import json
import sys
from pathlib import Path

import llama_cpp
import numpy as np

GGML_TYPE_F32 = 0


class GgufInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, GgufInitParams]
    lib.gguf_get_n_tensors.restype = ctypes.c_int64
    lib.gguf_get_n_tensors.argtypes = [ctypes.c_void_p]
    lib.gguf_get_tensor_name.restype = ctypes.c_char_p
    lib.gguf_get_tensor_name.argtypes = [ctypes.c_void_p, ctypes.c_int64]
    lib.ggml_get_tensor.restype = ctypes.c_void_p
    lib.ggml_get_tensor.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.ggml_n_dims.restype = ctypes.c_int
    lib.ggml_n_dims.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_get_data_f32.restype = ctypes.POINTER(ctypes.c_float)
    lib.ggml_get_data_f32.argtypes = [ctypes.c_void_p]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    lib.ggml_free.argtypes = [ctypes.c_void_p]
    return lib


def load_control_vector(path: str) -> tuple[np.ndarray, int, dict[str, float]]:
    """(buffer from layer 1 on, n_embd, {layer: norm}) as llama.cpp's common_control_vector_load_one builds it."""
    lib = _ggml()
    ctx = ctypes.c_void_p()
    gguf = lib.gguf_init_from_file(path.encode(), GgufInitParams(False, ctypes.pointer(ctx)))
    if not gguf:
        raise SystemExit(f"llama.cpp cannot read control vector file {path}")
    n_embd, rows, norms = -1, {}, {}
    try:
        for i in range(lib.gguf_get_n_tensors(gguf)):
            name = lib.gguf_get_tensor_name(gguf, i).decode()
            prefix, _, index = name.partition(".")
            layer = int(index) if prefix == "direction" and index.isdigit() else -1
            if layer <= 0:
                raise SystemExit(f"llama.cpp refuses tensor {name}: invalid or zero direction layer index")
            tensor = lib.ggml_get_tensor(ctx, name.encode())
            if ctypes.c_int.from_address(tensor).value != GGML_TYPE_F32 or lib.ggml_n_dims(tensor) != 1:
                raise SystemExit(f"llama.cpp refuses tensor {name}: not a 1-D f32 tensor")
            size = lib.ggml_nelements(tensor)
            if n_embd not in (-1, size):
                raise SystemExit(f"llama.cpp refuses tensor {name}: size {size}, not {n_embd}")
            n_embd = size
            data = np.ctypeslib.as_array(lib.ggml_get_data_f32(tensor), shape=(size,)).copy()
            rows[layer] = rows.get(layer, 0) + data
            norms[str(layer)] = float(np.linalg.norm(rows[layer]))
    finally:
        lib.gguf_free(gguf)
        lib.ggml_free(ctx)
    buffer = np.zeros(n_embd * max(rows), dtype=np.float32)
    for layer, data in rows.items():
        buffer[n_embd * (layer - 1) : n_embd * layer] += data
    return buffer, n_embd, norms


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    stem = Path(sys.argv[2])
    llm = llama_cpp.Llama(
        model_path=request["model"],
        n_ctx=1024,
        n_batch=512,
        n_threads=request.get("threads", 1),
        n_threads_batch=request.get("threads", 1),
        type_k=GGML_TYPE_F32,  # f32 KV cache: the reference computes in float32 throughout
        type_v=GGML_TYPE_F32,
        verbose=False,
    )
    ctx, n_vocab = llm._ctx.ctx, llm.n_vocab()
    n_layer, n_embd = llama_cpp.llama_model_n_layer(llm._model.model), llm.n_embd()
    eos, max_new = set(request["eos"]), request["max_new_tokens"]
    prompt_ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in request["texts"]]

    def logits() -> np.ndarray:
        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy()

    answer = {"version": llama_cpp.__version__, "prompt_ids": prompt_ids, "n_layer": n_layer, "n_embd": n_embd,
              "tokens": {}, "cvec": {}}  # fmt: skip
    arrays = {}
    for run, cv_path in request["runs"].items():
        if cv_path is None:
            status = llama_cpp.llama_set_adapter_cvec(ctx, None, 0, n_embd, -1, -1)  # no control vector
        else:
            buffer, size, answer["cvec"][run] = load_control_vector(cv_path)
            data = buffer.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            status = llama_cpp.llama_set_adapter_cvec(ctx, data, buffer.size, size, 1, n_layer)
        if status != 0:
            raise SystemExit(f"llama_set_adapter_cvec failed ({status}) for run {run}")
        tokens, firsts = [], []
        for ids in prompt_ids:
            llm.reset()
            llm.eval(ids)
            step = logits()
            firsts.append(step)
            out: list[int] = []
            while len(out) < max_new:
                token = int(np.argmax(step))
                if token in eos:
                    break
                out.append(token)
                if len(out) < max_new:
                    llm.eval([token])
                    step = logits()
            tokens.append(out)
        answer["tokens"][run] = tokens
        arrays[f"first_{run}"] = np.stack(firsts)
    np.savez(stem.with_suffix(".npz"), **arrays)
    stem.with_suffix(".answer.json").write_text(json.dumps(answer))


if __name__ == "__main__":
    main()
