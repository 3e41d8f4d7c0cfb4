"""A torch-free stand-in with the Engine's seam, so the HTTP layer is tested fast and exactly.

Bytes are tokens (ids 0..255). Output token ``i`` of a prompt is ``a..z`` chosen from the prompt's
byte sum, so every prompt has a known continuation. KV is counted in 16-token blocks; a request is
admitted FIFO when its blocks fit, holds them until it finishes or is aborted. A prompt that starts
with ``hang`` never finishes on its own (only an abort or a stop string ends it), for disconnect tests;
one that starts with ``fail`` is failed by the engine at its second token (finish_reason "error"), as
the real engine fails a request hit by a fault while the others go on.
Text and stop strings come from the engine's own :class:`TextStream`, as in the real engine.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from types import SimpleNamespace

from kvsched.core.errors import DuplicateRequestError, InvalidRequestError, UnknownRequestError
from kvsched.core.request import SamplingParams
from kvsched.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput, StepOutput
from kvsched.engine.text_stream import TextStream

TPB = 16


def expected_text(prompt_ids: list[int], n: int) -> str:
    base = sum(prompt_ids)
    return "".join(chr(97 + (base + i) % 26) for i in range(n))


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


@dataclass
class _Req:
    ids: list[int]
    params: SamplingParams
    stream: TextStream
    metrics: RequestMetrics
    out: list[int] = field(default_factory=list)
    blocks: int = 0

    def result(self, rid: object, reason: str) -> RequestOutput:
        self.metrics.finished_time = time.monotonic()
        self.metrics.num_generation_tokens = len(self.out)
        done = CompletionOutput(0, self.stream.text, self.out, reason)
        return RequestOutput(rid, None, self.ids, [done], True, self.metrics)


class FakeEngine:
    def __init__(
        self,
        num_device_blocks: int = 4096,
        max_batch_size: int = 64,
        max_model_len: int = 512,
        step_delay_s: float = 0.0,
    ) -> None:
        self.step_delay_s = step_delay_s
        self.tokenizer = ByteTokenizer()
        self.parts = SimpleNamespace(apply_chat_template=self._chat)
        self.max_model_len = max_model_len
        self.max_batch_size = max_batch_size
        self.kv = SimpleNamespace(
            stats=self._stats, num_device_blocks=num_device_blocks, tokens_per_block=TPB
        )
        self.stats = SimpleNamespace(num_preempted=0)
        self._reqs: dict[object, _Req] = {}
        self._finished: dict[object, RequestOutput] = {}
        self.used_blocks = 0
        self.num_aborted = 0
        self.step_gate = threading.Event()  # tests may clear it to hold the engine
        self.step_gate.set()
        self.fail_next_step = False

    @staticmethod
    def _chat(messages, add_generation_prompt: bool = True) -> list[int]:
        text = "".join(f"<{m['role']}>{m['content']}\n" for m in messages)
        return list((text + ("<assistant>" if add_generation_prompt else "")).encode())

    def _stats(self) -> SimpleNamespace:
        running = sum(1 for r in self._reqs.values() if r.blocks)
        return SimpleNamespace(
            num_device_blocks=self.kv.num_device_blocks,
            num_host_blocks=0,
            used_device_blocks=self.used_blocks,
            used_host_blocks=0,
            num_requests=running,
            num_active_requests=running,
            reuse_hit_tokens_device=0,
            reuse_hit_tokens_host=0,
            reuse_miss_tokens=0,
            num_suspends=0,
            num_resumes=0,
        )

    @property
    def num_unfinished_requests(self) -> int:
        return len(self._reqs)

    def add_request(self, prompt, sampling_params=None, request_id=None, arrival_time=None, **_: object):
        params = sampling_params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if request_id in self._reqs:
            raise DuplicateRequestError(f"request id {request_id!r} is already in use")
        if not ids or min(ids) < 0 or max(ids) > 255:
            raise InvalidRequestError(f"request {request_id!r}: prompt token ids must be in [0, 256)")
        if len(ids) + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(f"request {request_id!r}: exceeds max_model_len={self.max_model_len}")
        stream = TextStream(self.tokenizer, ids, params.stop)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._reqs[request_id] = _Req(ids, params, stream, RequestMetrics(arrival_time=arrival))
        return request_id

    def abort_request(self, request_id) -> None:
        req = self._reqs.pop(request_id, None)
        if req is None:
            raise UnknownRequestError(f"unknown request id {request_id!r}")
        self.used_blocks -= req.blocks
        self.num_aborted += 1
        self._finished[request_id] = req.result(request_id, "abort")

    def pop_output(self, request_id):
        try:
            return self._finished.pop(request_id)
        except KeyError:
            raise UnknownRequestError(f"no finished request {request_id!r}") from None

    def has_unfinished_requests(self) -> bool:
        return bool(self._reqs)

    def step(self) -> list[StepOutput]:
        self.step_gate.wait()
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("injected engine failure")
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        outputs = []
        for rid, req in list(self._reqs.items())[: self.max_batch_size]:
            need = -(-(len(req.ids) + len(req.out) + 1) // TPB)
            if need > req.blocks:
                if self.used_blocks + need - req.blocks > self.kv.num_device_blocks:
                    continue
                self.used_blocks += need - req.blocks
                req.blocks = need
            tok = 97 + (sum(req.ids) + len(req.out)) % 26
            req.out.append(tok)
            req.metrics.last_token_time = time.monotonic()
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = req.metrics.last_token_time
            reason = "length" if len(req.out) >= req.params.max_tokens else None
            if req.ids[:4] == list(b"hang"):
                reason = None
            if req.ids[:4] == list(b"fail") and len(req.out) == 2:
                self.used_blocks -= req.blocks
                del self._reqs[rid]
                self._finished[rid] = req.result(rid, "error")
                outputs.append(StepOutput(rid, [], "", True, "error", error="injected engine fault"))
                continue
            delta, stopped = req.stream.push([tok], final=reason is not None)
            if stopped:
                reason = "stop"
            if reason is not None:
                self.used_blocks -= req.blocks
                del self._reqs[rid]
                self._finished[rid] = req.result(rid, reason)
            lp = top = None
            if req.params.logprobs is not None:  # the sampled token is the most likely; then the next letters
                lp = [-0.5]
                n = req.params.logprobs
                top = [{97 + (tok - 97 + k) % 26: -0.5 - k for k in range(n)}]
            outputs.append(StepOutput(rid, [tok], delta, reason is not None, reason, lp, top))
        return outputs
