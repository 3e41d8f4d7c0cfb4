"""The engine's one owner of output text: detokenized deltas, stop strings and their hold-back."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from kvsched.engine.text_stream import StopStrings, TextStream

# A toy byte-level vocabulary: token i decodes to the bytes in VOCAB[i]; "é" is split over two tokens.
VOCAB = [b"Hello", b" world", b" caf", b"\xc3", b"\xa9", b"!", b" STOP", b" more"]


class ToyTokenizer:
    def decode(self, ids, *, skip_special_tokens: bool = True) -> str:
        return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


TOK = ToyTokenizer()


def test_deltas_concatenate_to_the_full_text_and_hold_back_partial_characters():
    stream = TextStream(TOK, [0], stop=None)
    deltas = [stream.push([t])[0] for t in (1, 2, 3, 4, 5)]
    assert deltas == [" world", " caf", "", "é", "!"]
    assert stream.text == " world café!"


def test_stop_string_truncates_text_and_reports_the_stop():
    stream = TextStream(TOK, [0], stop=["STOP"])
    assert stream.push([1]) == (" world", False)  # no tail of " world" begins "STOP": nothing waits
    delta, stopped = stream.push([6])
    assert stopped and delta == " " and stream.text == " world "


def test_stop_string_spanning_two_tokens_is_found_and_never_streamed():
    stream = TextStream(TOK, [0], stop=["d caf"])
    first, _ = stream.push([1])
    assert first == " worl" and stream.text == " world"  # "d" may begin the stop: held back
    delta, stopped = stream.push([2])
    assert stopped and delta == "" and stream.text == " worl"


def test_held_back_text_comes_out_at_the_end():
    stream = TextStream(TOK, [0], stop=["ld!x"])
    parts = [stream.push([1])[0], stream.push([5], final=True)[0]]
    assert parts == [" wor", "ld!"] and stream.text == " world!"


def test_final_flush_emits_an_incomplete_character():
    stream = TextStream(TOK, [0], stop=None)
    assert stream.push([3])[0] == ""
    assert stream.push([], final=True)[0] == "\ufffd"


def test_no_tokenizer_means_no_text_and_no_stop():
    stream = TextStream(None, [0], stop=["a"])
    assert stream.push([1, 2], final=True) == ("", False) and stream.text == ""


def _run(chunks: list[str], stops: list[str]) -> tuple[str, bool]:
    buf, sent = StopStrings(stops), []
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
def test_stop_strings_cut_at_the_first_stop_to_complete_whatever_the_chunking(chunks, stops) -> None:
    """The text ends before the earliest stop among those complete once the chunk that completes the
    first one arrived (a stop that would only complete later never counts)."""
    full = "".join(chunks)
    text, hit = _run(chunks, stops)
    ends = [full.find(s) + len(s) for s in stops if s in full]
    assert hit == bool(ends)
    if not ends:
        assert text == full
        return
    limit = next(e for e in itertools.accumulate(len(c) for c in chunks) if e >= min(ends))
    starts = [full.find(s) for s in stops if s in full and full.find(s) + len(s) <= limit]
    assert text == full[: min(starts)]


def test_a_stop_that_completes_first_wins_over_one_that_starts_earlier() -> None:
    assert _run(["ab", "a"], ["b", "aba"]) == ("a", True)  # "aba" never completes: "b" ended it
    assert _run(["aba"], ["b", "aba"]) == ("", True)  # both complete in one delta: the earlier start


def test_a_prefix_of_a_stop_is_held_back_until_disproved() -> None:
    buf = StopStrings(["de"])
    assert buf.push("abcd") == ("abc", False)
    assert buf.pending == "d"
    assert buf.push("x") == ("dx", False)
    assert buf.push("d") == ("", False)
    assert buf.push("e") == ("", True)
