"""Shared fixtures of the engine tests: HF greedy references over the tiny checkpoint.

The checkpoint (``tiny_llama_dir``, tests/conftest.py) is written by HF ``save_pretrained`` and read back
by our loader, so both sides run the very same weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


class HFReference:
    """Greedy continuations from HF ``generate``, one prompt at a time, memoised."""

    def __init__(self, path: Path) -> None:
        self.model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self._memo: dict[tuple[tuple[int, ...], int], list[int]] = {}

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in self._memo:
            ids = torch.tensor([prompt])
            with torch.no_grad():
                # An explicit all-ones mask: token 0 may occur in a prompt and must not read as padding.
                out = self.model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=0,
                )
            self._memo[key] = out[0, len(prompt) :].tolist()
        return self._memo[key]


@pytest.fixture(scope="session")
def hf_ref(tiny_llama_dir: Path) -> HFReference:
    return HFReference(tiny_llama_dir)


@pytest.fixture(autouse=True)
def _one_torch_thread(request: pytest.FixtureRequest):
    """The engine tests run tiny batches, where a second OpenMP thread only adds wake-up latency (a lot
    of it on a busy machine). Only for this folder's own tests; the previous setting is restored."""
    if request.path.parent != Path(__file__).parent:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
