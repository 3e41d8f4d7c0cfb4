"""Log-probabilities the engine reports: the sampled token's and the top-N of each position.

Both come from one ``log_softmax`` of the raw logits row (before temperature, top-k and top-p), as
vLLM reports them by default (``logprobs_mode="raw_logprobs"``) and as HF transformers'
``log_softmax(model(...).logits)`` gives them. N is at most :data:`MAX_TOP_LOGPROBS` (OpenAI's limit
for ``top_logprobs`` and the completions ``logprobs``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvsched.core.errors import InvalidRequestError

#: The most top tokens a request may ask for per position (OpenAI's bound; larger is a 400 in the server).
MAX_TOP_LOGPROBS = 20


def check_num_logprobs(n: object) -> int | None:
    """``SamplingParams.logprobs``: None (off) or an int in [0, MAX_TOP_LOGPROBS]; else InvalidRequestError."""
    if n is None:
        return None
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_TOP_LOGPROBS:
        raise InvalidRequestError(
            f"logprobs={n!r} is invalid: must be None or an integer in [0, {MAX_TOP_LOGPROBS}]"
        )
    return n


@dataclass(slots=True)
class RowLogprobs:
    """Per logits row: the chosen token's log-probability and the top ``num_top[i]`` ``{token: logprob}``
    (most likely first; empty for a row that asked for none)."""

    sampled: list[float]
    top: list[dict[int, float]]


def row_logprobs(logits: torch.Tensor, chosen: torch.Tensor, num_top: Sequence[int]) -> RowLogprobs:
    """``logits [rows, vocab]`` (fp32), ``chosen [rows]``; one log-softmax, one top-k for the largest N."""
    full = torch.log_softmax(logits, dim=-1)
    sampled = full.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
    k = min(max(num_top, default=0), full.shape[1])
    if k == 0:
        return RowLogprobs(sampled, [{} for _ in num_top])
    values, ids = torch.topk(full, k, dim=-1)
    values_l, ids_l = values.tolist(), ids.tolist()
    top = [dict(zip(ids_l[i][:n], values_l[i][:n])) for i, n in enumerate(num_top)]
    return RowLogprobs(sampled, top)
