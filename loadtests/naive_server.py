"""The baseline most people write first: PEFT + `generate()`, one request at a time.

    python -m loadtests.naive_server --adapters name=folder,... --port 8100

Same model (the embedded SmolLM2, NF4, float32 compute) and the same adapters as loraplex;
each request takes a lock, calls `set_adapter` (or disables adapters for the base) and
`generate()`. It speaks just enough of /v1/chat/completions for loadtests/loadgen.py: a
streaming request gets its whole answer in one chunk when generation is done.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
import time
import uuid

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from models.base_model import EMBEDDED_BASE, EMBEDDED_NAME, load_model, resolve_base_folder


def build_app(adapters: dict[str, str]) -> FastAPI:
    from peft import PeftModel
    from transformers import AutoTokenizer

    folder, _ = resolve_base_folder(EMBEDDED_BASE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = load_model(folder, "nf4", torch.float32).eval()  # the NF4 base as the server loads it
    names = list(adapters)
    if names:
        model = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
        for name in names[1:]:
            model.load_adapter(adapters[name], adapter_name=name)
    lock = threading.Lock()
    app = FastAPI()

    def generate(body: dict) -> tuple[str, int, int]:
        ids = tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        max_tokens = body.get("max_tokens") or 64
        extra = {"min_new_tokens": max_tokens} if body.get("ignore_eos") else {}
        with lock, torch.inference_mode():  # one request at a time, as a plain generate() loop serves them
            model_name = body["model"]
            if names and model_name in adapters:
                model.set_adapter(model_name)
                out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, **extra)
            elif names:
                with model.disable_adapter():
                    out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, **extra)
            else:
                out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False, **extra)
        new = out[0, ids["input_ids"].shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True), ids["input_ids"].shape[1], int(new.shape[0])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        if body["model"] not in adapters and body["model"] != EMBEDDED_NAME:
            return JSONResponse({"error": {"message": "unknown model", "type": "invalid_request_error",
                                           "param": "model", "code": None}}, status_code=404)
        text, prompt_tokens, tokens = await asyncio.to_thread(generate, body)
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": tokens, "total_tokens": prompt_tokens + tokens}
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body["model"]}
        if not body.get("stream"):
            return {**base, "object": "chat.completion", "usage": usage, "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"}]}

        async def frames():
            chunk = {**base, "object": "chat.completion.chunk"}
            yield f"data: {json.dumps({**chunk, 'choices': [{'index': 0, 'delta': {'role': 'assistant', 'content': text}, 'finish_reason': 'length'}]})}\n\n"
            yield f"data: {json.dumps({**chunk, 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(frames(), media_type="text/event-stream")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapters", default="", help="name=folder,name=folder")
    parser.add_argument("--port", type=int, default=8100)
    args = parser.parse_args()
    adapters = dict(item.split("=", 1) for item in args.adapters.split(",") if item)
    uvicorn.run(build_app(adapters), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
