"""Suite-wide test setup: a Hypothesis profile for mutation runs (``--hypothesis-profile=mutation``) and
the tiny random-weight Llama checkpoint the engine and bench tests share.

Mutation testing (``benchmarks/mutation.py``) runs the core tests once per mutant: there, examples are
derandomized (the same mutant gets the same verdict every run) and failures are not shrunk (shrinking a
state-machine failure takes minutes and only makes the report prettier).
"""

import json
from pathlib import Path

import pytest
from hypothesis import Phase, settings

settings.register_profile(
    "mutation",
    derandomize=True,
    database=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    print_blob=False,
)


# A tiny random-weight Llama checkpoint, shared by the engine and bench tests. It is written by HF
# ``save_pretrained`` (safetensors) and read back by our loader, so both sides run the very same weights;
# ``initializer_range=0.1`` keeps the top-2 logit gap well above fp32 noise, so greedy equality is a sharp
# test rather than a coin toss. torch and transformers load only when a test asks for it.
TINY_VOCAB = 256
TINY_MAX_POS = 512
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=TINY_MAX_POS,
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


def _save_byte_tokenizer(path: Path) -> None:
    """A 256-token byte-level tokenizer (one token per byte, no merges) and a tiny chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TINY_CHAT_TEMPLATE}))


@pytest.fixture(scope="session")
def hf_smollm2():
    """HF transformers' own load of the default GGUF, the reference the real-model tests compare with.

    It dequantizes in Python (seconds), so it is loaded once per session; it is read-only: a test that
    changes it (a peft wrapper) works on a ``copy.deepcopy``.
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from kvsched.engine.weights.loader import default_model_path

    path = default_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    ).eval()
