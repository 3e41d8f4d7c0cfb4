"""A request the engine fails (finish_reason "error") gets an OpenAI-shaped error, a 500 or an in-band stream
error event then ``[DONE]``, while the requests beside it complete exactly."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
from fake_engine import FakeEngine, expected_text
from live_server import MODEL, LiveServer


def _post(url: str, prompt: str, stream: bool) -> httpx.Response:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 6, "stream": stream}
    return httpx.post(url + "/v1/completions", json=body, timeout=30, trust_env=False)


def test_a_failed_request_gets_an_openai_error_and_the_others_complete() -> None:
    with LiveServer(FakeEngine(step_delay_s=0.002)) as srv:
        jobs = [("fail now", False), ("fail streaming", True)] + [(f"fine {i}", i % 2 == 1) for i in range(6)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            replies = list(pool.map(lambda j: _post(srv.url, *j), jobs))
        for (prompt, stream), r in zip(jobs, replies):
            if not prompt.startswith("fail"):
                assert r.status_code == 200
                if stream:
                    events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
                    assert events[-1] == "[DONE]"
                    text = "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1])
                else:
                    text = r.json()["choices"][0]["text"]
                assert text == expected_text(list(prompt.encode()), 6)
            elif not stream:
                assert r.status_code == 500
                err = r.json()["error"]
                assert err["code"] == 500 and err["type"] == "InternalServerError"
                assert "injected engine fault" in err["message"]
            else:
                assert r.status_code == 200  # the status line went out with the first token
                events = [ln[6:] for ln in r.text.splitlines() if ln.startswith("data: ")]
                assert events[-1] == "[DONE]"
                err = json.loads(events[-2])["error"]
                assert err["code"] == 500 and "injected engine fault" in err["message"]
        metrics = httpx.get(srv.url + "/metrics", trust_env=False).text
        counted = [
            ln for ln in metrics.splitlines() if "request_success" in ln and 'finished_reason="error"' in ln
        ]
        assert counted and float(counted[0].split()[-1]) == 2.0  # both failures, counted once each
        assert srv.fake.used_blocks == 0
