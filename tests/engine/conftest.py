"""Shared fixtures of the engine tests: a tiny random-weight Llama checkpoint and HF greedy references.

The checkpoint is written by HF ``save_pretrained`` (safetensors) and read back by our loader, so both
sides run the very same weights. ``initializer_range=0.1`` keeps the top-2 logit gap well above fp32
noise, so greedy equality is a sharp test rather than a coin toss.
"""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 256
MAX_POS = 512


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=MAX_POS,
        rope_theta=10000.0,
        initializer_range=0.1,
        tie_word_embeddings=False,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    _save_byte_tokenizer(path)
    return path


CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def _save_byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer (one token per byte, no merges) and a tiny chat template."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))


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
