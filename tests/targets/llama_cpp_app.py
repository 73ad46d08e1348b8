"""A user's llama-cpp-python program, unmodified by tracer: stream a completion, leave it after
0.3 s (the interrupt), and stream another to its end; then one chat call, streamed and left
after its first chunk, and one plain (non-streamed) completion.

Usage: llama_cpp_app.py MODEL.gguf [ITERATIONS]. ``LLAMA_CPP_LIB_PATH`` names the llama.cpp build to
load (the testbed's, which loads no CPU backend until asked: ``TARGET_LOAD_BACKENDS=1`` asks).
"""

import ctypes
import os
import sys
import time
from pathlib import Path


def main() -> None:
    model, iterations = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    import llama_cpp

    lib = os.environ.get("LLAMA_CPP_LIB_PATH")
    if lib and os.environ.get("TARGET_LOAD_BACKENDS") == "1":
        ggml = ctypes.CDLL(str(Path(lib) / "libggml.so"))
        if ggml.ggml_backend_dev_count() == 0:
            ggml.ggml_backend_load_all_from_path.argtypes = [ctypes.c_char_p]
            ggml.ggml_backend_load_all_from_path(lib.encode())
    llm = llama_cpp.Llama(model_path=model, n_ctx=2048, verbose=False)
    for index in range(iterations):
        started = time.monotonic()
        for _chunk in llm(f"{index}: tell me a long story about a river", max_tokens=512, stream=True):
            if time.monotonic() - started > 0.3:
                break  # the generator is dropped here: CPython closes it at once
        for _chunk in llm(f"{index}: and now another one", max_tokens=8, stream=True):
            pass
    for _chunk in llm.create_chat_completion(messages=[{"role": "user", "content": "hello"}], max_tokens=8,
                                             stream=True):
        break
    answer = llm("one more", max_tokens=4)
    print(f"target: done ({len(answer['choices'])} choice)")


if __name__ == "__main__":
    main()
