"""Multi-LoRA through the server: ``model`` picks an adapter of ``--lora-modules``, ``/v1/models`` lists
the base model and each adapter, an unknown name is an OpenAI-shaped 404.

The adapters are written in the HF PEFT format (adapter_config.json + adapter_model.safetensors) for the
tiny model; the server's answers are compared with the same engine's offline answers per adapter.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from live_server import MODEL, LiveServer
from tiny_engine import ENGINE_KW, TINY

from kvsched.core.request import SamplingParams
from kvsched.engine.engine import Engine
from kvsched.engine.engine_args import EngineArgs
from kvsched.engine.parts import build_engine_parts
from kvsched.engine.weights.loader import default_model_path, load_model

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

ADAPTERS = {"sql": (4, ["q_proj", "v_proj"], False), "poet": (8, ["gate_proj", "down_proj", "o_proj"], True)}
PROMPT = "The quick brown fox"
CHAT = [{"role": "user", "content": "Say something."}]
N = 8


def _write_adapter(path: Path, rank: int, targets: list[str], rs: bool, seed: int) -> Path:
    path.mkdir()
    c = TINY
    shapes = {
        "q_proj": (c.hidden_size, c.num_heads * c.head_dim),
        "k_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
        "v_proj": (c.hidden_size, c.num_kv_heads * c.head_dim),
        "o_proj": (c.num_heads * c.head_dim, c.hidden_size),
        "gate_proj": (c.hidden_size, c.intermediate_size),
        "up_proj": (c.hidden_size, c.intermediate_size),
        "down_proj": (c.intermediate_size, c.hidden_size),
    }
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(c.num_layers):
        for m in targets:
            fan_in, fan_out = shapes[m]
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{m}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(rank, fan_in, generator=gen)
            tensors[f"{key}.lora_B.weight"] = torch.randn(fan_out, rank, generator=gen)
    safetensors_torch.save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    config["use_rslora"] = rs
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def lora_engine(tmp_path_factory) -> Engine:
    root = tmp_path_factory.mktemp("serve-lora")
    mods = {
        name: str(_write_adapter(root / name, r, t, rs, seed=i))
        for i, (name, (r, t, rs)) in enumerate(ADAPTERS.items())
    }
    args = EngineArgs(**ENGINE_KW, lora_modules=mods)
    loaded = load_model(default_model_path(), dummy_config=TINY, seed=0)  # its own copy: LoRA wraps it
    return Engine(args, parts=build_engine_parts(args, loaded=loaded))


def _offline(ex: Engine, prompt, lora: str | None) -> str:
    ids = ex.parts.encode(prompt) if isinstance(prompt, str) else ex.parts.apply_chat_template(prompt, True)
    rid = ex.add_request(ids, SamplingParams(max_tokens=N, temperature=0.0, ignore_eos=True), lora_id=lora)
    (out,) = [o for o in ex.run() if o.request_id == rid]
    return out.outputs[0].text


@pytest.fixture(scope="module")
def served(lora_engine):
    expected = {
        lora: (_offline(lora_engine, PROMPT, lora), _offline(lora_engine, CHAT, lora))
        for lora in (None, *ADAPTERS)
    }
    with LiveServer(lora_engine) as srv:
        yield srv, expected


def test_model_field_picks_the_adapter(served) -> None:
    srv, expected = served
    completions = {e[0] for e in expected.values()}
    assert len(completions) == 3  # each adapter changes the answer, so the pick is observable
    client = srv.client()
    for lora in (None, *ADAPTERS):
        model = lora or MODEL
        common = {"max_tokens": N, "temperature": 0, "extra_body": {"ignore_eos": True}}
        got = client.completions.create(model=model, prompt=PROMPT, **common)
        assert got.model == model
        assert got.choices[0].text == expected[lora][0], model
        chat = client.chat.completions.create(model=model, messages=CHAT, **common)
        assert chat.choices[0].message.content == expected[lora][1], model
        stream = client.completions.create(model=model, prompt=PROMPT, stream=True, **common)
        assert "".join(c.choices[0].text for c in stream if c.choices) == expected[lora][0]


def test_models_lists_base_and_adapters(served) -> None:
    srv, _ = served
    ids = [m.id for m in srv.client().models.list().data]
    assert ids == [MODEL, *ADAPTERS]


def test_unknown_adapter_is_openai_404(served) -> None:
    srv, _ = served
    with pytest.raises(openai.NotFoundError) as err:
        srv.client().completions.create(model="nope", prompt=PROMPT, max_tokens=2)
    body = httpx.post(
        srv.url + "/v1/chat/completions",
        json={"model": "nope", "messages": CHAT},
        trust_env=False,
        timeout=30,
    )
    assert body.status_code == 404 and err.value.status_code == 404
    error = body.json()["error"]
    assert "`nope` does not exist" in error["message"] and "`sql`" in error["message"]
    assert error["param"] == "model"
