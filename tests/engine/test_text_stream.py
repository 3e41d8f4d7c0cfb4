from kvsched.engine.text_stream import TextStream

# A toy byte-level vocabulary: token i decodes to the bytes in VOCAB[i]; "é" is split over two tokens.
VOCAB = [b"Hello", b" world", b" caf", b"\xc3", b"\xa9", b"!", b" STOP", b" more"]


def decode(ids):
    return b"".join(VOCAB[i] for i in ids).decode("utf-8", errors="replace")


def test_deltas_concatenate_to_the_full_text_and_hold_back_partial_characters():
    stream = TextStream(decode, [0], stop=None)
    deltas = [stream.push([t])[0] for t in (1, 2, 3, 4, 5)]
    assert deltas == [" world", " caf", "", "é", "!"]
    assert stream.text == " world café!"


def test_stop_string_truncates_text_and_reports_the_stop():
    stream = TextStream(decode, [0], stop=["STOP"])
    assert stream.push([1]) == (" wo", False)  # the last len("STOP") - 1 characters wait
    delta, stopped = stream.push([6])
    assert stopped and delta == "rld " and stream.text == " world "


def test_stop_string_spanning_two_deltas_is_found_and_never_streamed():
    stream = TextStream(decode, [0], stop=["d caf"])
    first, _ = stream.push([1])
    delta, stopped = stream.push([2])
    assert stopped and stream.text == " worl" and first + delta == " worl"


def test_held_back_text_comes_out_at_the_end():
    stream = TextStream(decode, [0], stop=["zzz"])
    parts = [stream.push([1])[0], stream.push([5], final=True)[0]]
    assert parts == [" wor", "ld!"] and stream.text == " world!"


def test_final_flush_emits_an_incomplete_character():
    stream = TextStream(decode, [0], stop=None)
    assert stream.push([3])[0] == ""
    assert stream.push([], final=True)[0] == "\ufffd"
