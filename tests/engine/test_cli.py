"""`kvsched generate` on the tiny checkpoint (byte tokenizer): streamed text and the summary line."""

from __future__ import annotations

from kvsched.cli import main
from kvsched.core.request import SamplingParams
from kvsched.engine.llm import LLM


def test_generate_streams_the_same_text_as_llm(tiny_llama_dir, capsys):
    flags = ["--model", str(tiny_llama_dir), "--num-device-blocks", "64", "--max-tokens", "6"]
    assert main(["generate", "hello", *flags]) == 0
    out = capsys.readouterr().out
    llm = LLM(str(tiny_llama_dir), num_device_blocks=64)
    [ref] = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=6, temperature=0.0))
    assert out.startswith(ref.outputs[0].text)
    assert "[6 tokens, finish_reason=length]" in out


def test_generate_batch_of_raw_prompts(tiny_llama_dir, capsys):
    flags = ["--model", str(tiny_llama_dir), "--num-device-blocks", "64", "--max-tokens", "3", "--raw"]
    assert main(["generate", "one", "two", *flags]) == 0
    out = capsys.readouterr().out
    assert "--- [0] one" in out and "--- [1] two" in out
