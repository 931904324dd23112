"""The strong peer for bench/serve.py: what a competent user would deploy instead of early exit.

The fine-tuned model exported as ONE ONNX graph (full depth, `romebert export --monolithic`,
extras.full), on the CPU backend of choice, behind a small FastAPI app with a plain dynamic
batcher: requests queue up, a batcher takes whatever is there (up to --max-batch, waiting at most
--max-wait-ms for more), runs one padded batch in a worker thread, and answers every request.
An afternoon's work, done carefully; it lives in bench/ because only the benchmark needs it.

    python bench/peer_server.py BUNDLE --port 8001 [--backend onnxruntime|openvino] [--precision f32|bf16]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import AsyncIterator

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from tokenizers import Tokenizer

from romebert.core.engine import OpenVinoSession, open_openvino_session


class Body(BaseModel):
    text: str


def session(path: Path, backend: str, precision: str, threads: int) -> ort.InferenceSession | OpenVinoSession:
    if backend == "openvino":  # onnxruntime's OpenVINO plugin on Intel, OpenVINO's own runtime elsewhere, as the project opens it
        return open_openvino_session(path, precision, threads)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def make_app(bundle: Path, backend: str, precision: str, max_batch: int, max_wait_ms: float) -> FastAPI:
    manifest = json.loads((bundle / "manifest.json").read_text())
    labels = manifest["labels"]
    tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=manifest["max_length"])
    tokenizer.enable_padding()
    model = session(bundle / manifest["extras"]["full"]["file"], backend, precision, len(os.sched_getaffinity(0)))
    executor = ThreadPoolExecutor(1)  # one batch at a time, off the event loop
    queue: asyncio.Queue = asyncio.Queue()

    def run(texts: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        (logits,) = model.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})
        z = logits - logits.max(-1, keepdims=True)
        return np.exp(z) / np.exp(z).sum(-1, keepdims=True)

    async def batcher() -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + max_wait_ms / 1000
            while len(batch) < max_batch:
                try:
                    batch.append(queue.get_nowait() if max_wait_ms == 0 else await asyncio.wait_for(queue.get(), deadline - loop.time()))
                except (asyncio.QueueEmpty, asyncio.TimeoutError):
                    break
            try:
                probabilities = await loop.run_in_executor(executor, run, [text for text, _ in batch])
                for (_, future), p in zip(batch, probabilities):
                    future.set_result(p)
            except Exception as err:  # noqa: BLE001 - every waiting request gets the error
                for _, future in batch:
                    future.set_exception(err)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        run(["warm up"] * max_batch)
        task = asyncio.create_task(batcher())
        yield
        task.cancel()

    app = FastAPI(lifespan=lifespan)

    @app.post("/classify")
    async def classify(body: Body) -> JSONResponse:
        future = asyncio.get_running_loop().create_future()
        await queue.put((body.text, future))
        p = await future
        return JSONResponse({"results": [{"label": labels[int(p.argmax())], "probabilities": dict(zip(labels, p.tolist()))}]})

    @app.get("/readyz")
    async def readyz() -> dict:
        return {"status": "ready"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--backend", choices=("onnxruntime", "openvino"), default="onnxruntime")
    parser.add_argument("--precision", choices=("f32", "bf16"), default="f32", help="OpenVINO's inference precision")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    args = parser.parse_args()
    app = make_app(args.bundle, args.backend, args.precision, args.max_batch, args.max_wait_ms)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
