"""``/v1/chat/completions`` served by a real (tiny, random-weight) transformers model loaded from a local
folder: the tokenizer's chat template is applied to ``messages`` and ``model.generate`` produces up to
``max_tokens`` tokens. Requests are served one at a time (a lock around generation)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from megatron_guided.models.tiny import build_tiny_qwen2, build_tokenizer, save_tiny
from tests.servers.base import BackgroundHTTPServer, RecordedRequest, _Handler

CORPUS = [
    "Step 1: 41 + 9 = 50. Step 2 is wrong. ###STOP### [SCORE] hallucination_detect=1",
    "You check a student's step-by-step solution. Point to the first wrong step.",
]


def build_tiny_verifier_model(out_dir: str | os.PathLike) -> Path:
    """A tiny Qwen2 (hidden 64, 2 layers, random weights) + byte-level tokenizer saved to `out_dir`."""
    tok = build_tokenizer(CORPUS)
    model = build_tiny_qwen2(tok, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                             intermediate_size=128, max_position_embeddings=4096, seed=0)
    return Path(save_tiny(model, tok, out_dir))


class TinyOpenAIServer(BackgroundHTTPServer):
    def __init__(self, model_dir: str | os.PathLike, *, api_key: str | None = None,
                 served_model_name: str = "verifier") -> None:
        super().__init__()
        self.api_key = api_key
        self.served_model_name = served_model_name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self._gen_lock = threading.Lock()

    def handle(self, h: _Handler, rec: RecordedRequest) -> None:
        if self.api_key is not None and rec.headers.get("authorization") != f"Bearer {self.api_key}":
            self.send(h, 401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return
        path = rec.path.split("?", 1)[0].rstrip("/")
        if rec.method == "GET" and path == "/v1/models":
            self.send(h, 200, {"object": "list", "data": [{"id": self.served_model_name, "object": "model"}]})
            return
        if rec.method != "POST" or path != "/v1/chat/completions":
            self.send(h, 404, {"error": {"message": f"no route {rec.method} {rec.path}"}})
            return
        body = rec.body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list) or not body["messages"]:
            self.send(h, 400, {"error": {"message": "body must be JSON with a non-empty 'messages' list"}})
            return
        try:
            self.send(h, 200, self._complete(body))
        except ValueError as exc:
            self.send(h, 400, {"error": {"message": str(exc)}})

    @torch.inference_mode()
    def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        tok, model = self.tokenizer, self.model
        text = tok.apply_chat_template(body["messages"], tokenize=False, add_generation_prompt=True)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        prompt_len = enc["input_ids"].shape[1]
        max_tokens = int(body.get("max_tokens") or 16)
        if prompt_len + max_tokens > model.config.max_position_embeddings:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) exceeds the context "
                             f"({model.config.max_position_embeddings})")
        temperature = float(body.get("temperature", 1.0))
        gen_kwargs: dict[str, Any] = {"max_new_tokens": max_tokens, "pad_token_id": tok.pad_token_id}
        if temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=temperature, top_p=float(body.get("top_p", 1.0)))
            if int(body.get("top_k", -1)) > 0:
                gen_kwargs["top_k"] = int(body["top_k"])
            else:
                gen_kwargs["top_k"] = None
        else:
            gen_kwargs["do_sample"] = False
        with self._gen_lock, torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(body.get("seed", 0)))
            out = model.generate(**enc, **gen_kwargs)
        new = out[0, prompt_len:].tolist()
        finish = "stop" if new and new[-1] == tok.eos_token_id else "length"
        content = tok.decode(new, skip_special_tokens=True)
        return self.completion_body(content, model=str(body.get("model", self.served_model_name)),
                                    finish_reason=finish, prompt_tokens=prompt_len, completion_tokens=len(new))
