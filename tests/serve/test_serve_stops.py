"""Server-side stop strings: deltas never leak a stop's prefix, whatever the chunking."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from kvsched.serve.stops import StopBuffer


def _run(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    buf, sent = StopBuffer(stops), []
    for c in chunks:
        out, hit = buf.push(c)
        sent.append(out)
        if hit:
            return "".join(sent), True
    return "".join(sent) + buf.flush(), False


@given(
    st.lists(st.text("abc", max_size=4), max_size=12),
    st.lists(st.text("abc", min_size=1, max_size=3), min_size=1, max_size=3),
)
def test_equals_cut_at_first_stop(chunks, stops) -> None:
    full = "".join(chunks)
    hits = [i for i in (full.find(s) for s in stops) if i >= 0]
    text, hit = _run(chunks, stops)
    assert hit == bool(hits)
    assert text == (full[: min(hits)] if hits else full)


def test_prefix_is_held_back_until_disproved() -> None:
    buf = StopBuffer(["de"])
    assert buf.push("abcd") == ("abc", False)
    assert buf.push("x") == ("dx", False)
    assert buf.push("d") == ("", False)
    assert buf.push("e") == ("", True)
