"""RunnerOutputParser against byte transcripts built from the runner protocol reference.

A transcript (tests/transcripts/NAME.txt) holds one Python bytes literal per line: one flushed
write of the runner, i.e. one burst as a pipe reader receives it. `>>> begin_turn` marks where
the daemon writes a prompt and calls begin_turn(). NAME.events holds the expected events, one
per line, adjacent Text events joined. Every way of cutting the bytes into chunks must give
exactly those events.
"""
from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from llm_service.engines.card.output import (
    BosEos, Banner, ContextUsed, InitOk, InputTokens, KvCache, LogLine, Marker, PlainLine, Progress,
    RunnerError, RunnerOutputParser, Text, Ttft, TurnEnd, Uid, claimed_cmm_mb, remain_cmm_mb,
)

TRANSCRIPTS = Path(__file__).parent / "transcripts"
NAMES = sorted(path.stem for path in TRANSCRIPTS.glob("*.txt"))
BEGIN_TURN = ">>> begin_turn"
EVENT_TYPES = {cls.__name__: cls for cls in (
    BosEos, Banner, ContextUsed, InitOk, InputTokens, KvCache, LogLine, Marker, PlainLine, Progress,
    RunnerError, Text, Ttft, TurnEnd, Uid)}


def load_transcript(name: str) -> list[list[bytes]]:
    """The bursts of each segment; segments are separated by begin_turn calls."""
    segments: list[list[bytes]] = [[]]
    for line in (TRANSCRIPTS / f"{name}.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        if line == BEGIN_TURN:
            segments.append([])
        else:
            segments[-1].append(ast.literal_eval(line))
    return segments


def load_events(name: str) -> list[object]:
    """Parse `Class(field=literal, ...)` lines without eval."""
    events = []
    for line in (TRANSCRIPTS / f"{name}.events").read_text().splitlines():
        call = ast.parse(line, mode="eval").body
        assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
        kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
        events.append(EVENT_TYPES[call.func.id](**kwargs))
    return events


def joined(events: list[object]) -> list[object]:
    """Adjacent Text events concatenated: how text is cut into events is not part of the contract."""
    out: list[object] = []
    for event in events:
        if isinstance(event, Text) and out and isinstance(out[-1], Text):
            out[-1] = Text(out[-1].text + event.text)
        else:
            out.append(event)
    return out


def run(segments: list[list[bytes]], chunkings: list[list[bytes]], escapes_in_text: bool = False) -> list[object]:
    """Feed each segment as its given chunks, calling begin_turn between segments. The real
    runners' transcripts hold no escape sequence in their answers' text."""
    parser = RunnerOutputParser()
    events: list[object] = []
    for index, chunks in enumerate(chunkings):
        if index:
            parser.begin_turn()
        for chunk in chunks:
            events += parser.feed(chunk)
    events += parser.end_of_stream()
    assert escapes_in_text or all("\x1b" not in e.text for e in events if isinstance(e, Text))
    return joined(events)


def whole(segments: list[list[bytes]]) -> list[list[bytes]]:
    return [[b"".join(bursts)] for bursts in segments]


def byte_by_byte(segments: list[list[bytes]]) -> list[list[bytes]]:
    return [[bytes([b]) for b in b"".join(bursts)] for bursts in segments]


def random_cuts(segments: list[list[bytes]], rng: random.Random) -> list[list[bytes]]:
    out = []
    for bursts in segments:
        data = b"".join(bursts)
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12)))) if len(data) > 1 else []
        edges = [0, *cuts, len(data)]
        out.append([data[a:b] for a, b in zip(edges, edges[1:])])
    return out


@pytest.mark.parametrize("name", NAMES)
def test_transcript_events(name: str) -> None:
    segments = load_transcript(name)
    expected = load_events(name)
    assert all(">> " not in e.text for e in expected if isinstance(e, Text))
    assert run(segments, whole(segments)) == expected
    assert run(segments, segments) == expected, "burst shapes"
    assert run(segments, byte_by_byte(segments)) == expected, "byte by byte"
    rng = random.Random(name)
    for _ in range(30):
        chunking = random_cuts(segments, rng)
        assert run(segments, chunking) == expected, [len(c) for s in chunking for c in s]


@pytest.mark.parametrize("name", NAMES)
def test_every_single_cut(name: str) -> None:
    """Cut the stream once at every byte position: each position is a chunk boundary once."""
    segments = load_transcript(name)
    expected = load_events(name)
    datas = [b"".join(bursts) for bursts in segments]
    for index, data in enumerate(datas):
        for cut in range(1, len(data)):
            chunking = [[d] for d in datas]
            chunking[index] = [data[:cut], data[cut:]]
            assert run(segments, chunking) == expected, (index, cut, data[max(0, cut - 10):cut + 10])


def answer_texts(events: list[object]) -> list[str]:
    """The Text between each begin_turn and its TurnEnd, per turn."""
    return [e.text for e in joined(events) if isinstance(e, Text)]


def test_reference_turn_answer_is_exactly_the_model_text() -> None:
    segments = load_transcript("b_turn_qwen3")
    events = run(segments, segments)
    assert answer_texts(events) == ["<think>\n\n</think>\n\nHello! How can I assist you today?"]
    tail = events[events.index(Ttft(796.38)):]
    assert tail == [
        Ttft(796.38),
        Text("<think>\n\n</think>\n\nHello! How can I assist you today?"),
        LogLine("N", "Run", 1182, "hit eos,avg 7.38 token/s"),
        TurnEnd(7.38),
        LogLine("I", "GetKVCache", 597, "precompute_len:46, remaining:2002"),
        KvCache(46, 2002),
        Marker("prompt >> "),
    ]
    assert [e for e in events if isinstance(e, InputTokens)] == [InputTokens(12), InputTokens(12)]


def test_startup_bursts() -> None:
    """The start-up burst: init ok, banner, prefill lines and the marker arrive in one read."""
    segments = load_transcript("b_startup")
    parser = RunnerOutputParser()
    per_burst = [parser.feed(burst) for burst in segments[0]]
    assert per_burst[0][-1] == Progress(3, 1, 31, "tokenizer init ok")
    assert per_burst[3] == [Progress(100, 31, 31, "init post axmodel ok,remain_cmm(3788 MB)")]
    last = per_burst[-1]
    assert InitOk() in last and last[-1] == Marker("prompt >> ")
    assert last.index(InitOk()) < last.index(Banner(False)) < last.index(Marker("prompt >> "))
    assert not any(isinstance(e, InputTokens) for e in last), "system-prompt prefill is not a turn"
    assert parser.dialect == "b"
    assert not parser.turn_open


def test_turn_bursts_emit_text_early() -> None:
    """Each flushed text chunk yields its text in the same feed (the per-token hot path)."""
    segments = load_transcript("b_turn_qwen3")
    parser = RunnerOutputParser()
    for burst in segments[0]:
        parser.feed(burst)
    parser.begin_turn()
    assert parser.turn_open
    outputs = [joined(parser.feed(burst)) for burst in segments[1]]
    assert outputs[0][-3:] == [LogLine("I", "Run", 1030, "ttft: 796.38 ms"), Ttft(796.38), Text("<think>")]
    assert outputs[1] == [Text("\n\n</think>")]  # the newlines wait until text follows them
    assert outputs[2] == [Text("\n\nHello! How")]
    assert outputs[3] == [Text(" can I assist")]
    assert outputs[5] == []  # "\n\n" alone: maybe the runner's tail
    assert outputs[6][:2] == [LogLine("N", "Run", 1182, "hit eos,avg 7.38 token/s"), TurnEnd(7.38)]
    assert not parser.turn_open


def test_answer_ending_in_newline_keeps_it() -> None:
    segments = load_transcript("b_reset_banner")
    events = run(segments, segments)
    assert answer_texts(events) == [
        "Line one.\n\n[not a log] 12:30 is noon\nAnswer ends with a newline\n"]
    assert Banner(True) in events


def test_a_dialect() -> None:
    segments = load_transcript("a_startup_turn")
    parser = RunnerOutputParser()
    events = parser.feed(b"".join(segments[0]))
    assert parser.dialect == "a"
    assert events[-2:] == [Banner(False), Marker(">> ")]
    parser.begin_turn()
    events = joined(parser.feed(b"".join(segments[1])) + parser.end_of_stream())
    assert events == [Text("The capital of France is Paris."),
                      LogLine("N", "Run", 610, "hit eos,avg 14.46 token/s"), TurnEnd(14.46), Marker(">> ")]


def test_c_dialect_digit_led_lines_are_text() -> None:
    segments = load_transcript("c_startup_turn")
    events = run(segments, byte_by_byte(segments))
    assert answer_texts(events) == [
        "Steps:\n1. Boil water\n17:47 is the time.\n2024-01-01 was a Monday."]
    assert LogLine("N", "Run", 1145, "hit eos,avg 3.69 token/s") in events
    parser = RunnerOutputParser()
    parser.feed(b"".join(segments[0]))
    assert parser.dialect == "c"


def test_failure_kinds() -> None:
    events = run(load_transcript("failures"), whole(load_transcript("failures")))
    kinds = [(e.kind, e.message) for e in events if isinstance(e, RunnerError)]
    assert [kind for kind, _ in kinds] == [
        "tokenizer_connect", "init_failed", "device", "device", "init_failed", "init_failed",
        "init_failed", "prompt_too_long", "other", "device"]
    # every RunnerError of a log line follows that LogLine
    for index, event in enumerate(events):
        if isinstance(event, RunnerError) and event.message != kinds[-1][1]:
            assert isinstance(events[index - 1], LogLine) and events[index - 1].message == event.message


def test_overflow_closes_the_turn() -> None:
    segments = load_transcript("b_overflow")
    parser = RunnerOutputParser()
    parser.feed(b"".join(segments[0]))
    parser.begin_turn()
    events = parser.feed(b"".join(segments[1]))
    assert RunnerError("context_overflow", "precompute_len(2000) + input_num_token(100) > "
                       "_attr.prefill_max_kv_cache_num_grp[4]") in events
    assert events[-1] == Marker("prompt >> ")
    assert not parser.turn_open


@pytest.mark.parametrize("seed", range(20))
def test_garbage_never_breaks_the_parser(seed: int) -> None:
    """Random bytes, invalid UTF-8 and broken escapes inside a turn: same events for every
    chunking, all of it kept as the answer's text (escapes included: a model may print any byte),
    and the turn still ends at hit eos with later events intact."""
    rng = random.Random(seed)
    alphabet = [b"\x1b", b"\x1b[", b"\x1b[1;30;3", b"m", b"\n", b"\r", b"[", b"[I][", b"]: ", b"\xe4",
                b"\xb8\xad", b"\xff", b"\xc3", b"ok", b" ", b"12:", b"prompt >> ", b"\x00", "é".encode()]
    garbage = b"".join(rng.choice(alphabet) for _ in range(rng.randint(20, 120)))
    tail = (b"\n\n\x1b[1;30;35m[N][Run][1182]: hit eos,avg 1.00 token/s\n\x1b[0m\n"
            b"\x1b[1;30;32m[I][GetKVCache][ 597]: precompute_len:1, remaining:2\x1b[0m\nprompt >> ")
    segments = [[b"prompt >> "], [b"x" + garbage + b"y" + tail]]
    expected = run(segments, whole(segments), escapes_in_text=True)
    assert run(segments, byte_by_byte(segments), escapes_in_text=True) == expected
    for _ in range(10):
        assert run(segments, random_cuts(segments, rng), escapes_in_text=True) == expected
    assert "".join(e.text for e in expected if isinstance(e, Text)) == (b"x" + garbage + b"y").decode("utf-8", "replace")
    assert expected[-3:] == [LogLine("I", "GetKVCache", 597, "precompute_len:1, remaining:2"),
                             KvCache(1, 2), Marker("prompt >> ")]


def test_incomplete_utf8_is_held_then_completed() -> None:
    parser = RunnerOutputParser("b")
    parser.feed(b"prompt >> ")
    parser.begin_turn()
    assert parser.feed("中".encode()[:2]) == []
    assert parser.feed("中".encode()[2:] + b"!") == [Text("中!")]


def test_end_of_stream_flushes_partial_lines() -> None:
    parser = RunnerOutputParser()
    assert parser.feed(b"prompt >") == []
    assert parser.end_of_stream() == [PlainLine("prompt >")]
    parser = RunnerOutputParser()
    parser.feed(b"prompt >> ")
    parser.begin_turn()
    assert joined(parser.feed(b"partial answer\n") + parser.end_of_stream()) == [Text("partial answer\n")]
    assert parser.turn_open  # no TurnEnd came


def test_progress_bar_then_uncoloured_log_on_same_line() -> None:
    parser = RunnerOutputParser()
    events = parser.feed(b"\r100% | ## |  31 /  31 [1.00s<1.00s, 1.00 count/s] init post axmodel ok"
                         b"[I][Init][ 237]: max_token_len : 2559\n")
    assert events == [Progress(100, 31, 31, "init post axmodel ok"),
                      LogLine("I", "Init", 237, "max_token_len : 2559")]


def test_dialect_argument() -> None:
    assert RunnerOutputParser("c").dialect == "c"
    assert RunnerOutputParser("auto").dialect is None
    with pytest.raises(ValueError):
        RunnerOutputParser("d")


def test_long_answer_holds_nothing_back() -> None:
    """Token after token, each feed returns its text and leaves nothing growing behind."""
    parser = RunnerOutputParser("b")
    parser.feed(b"prompt >> ")
    parser.begin_turn()
    for i in range(5000):
        token = b"\nword" if i % 50 == 0 else b" word"
        assert parser.feed(token) == [Text(token.decode())] if i else [Text("word")]
        assert len(parser._candidate) == 0 and parser._held_newlines == 0 and not parser._line


def test_remain_cmm_figures_of_the_load_steps() -> None:
    """What the card has left after each load step; the load bar of the reference transcript."""
    events = [e for burst in load_transcript("b_startup")[0] for e in RunnerOutputParser().feed(burst)]
    figures = [remain_cmm_mb(e.message) for e in events if isinstance(e, Progress)]
    assert figures == [None, None, 5000, 3788]
    assert remain_cmm_mb("init 12 axmodel ok,remain_cmm( 691 MB)") == 691
    assert remain_cmm_mb("init post axmodel ok") is None


def test_claimed_card_memory_is_the_drop_plus_the_first_layer() -> None:
    # The emulator's 4 layers of 120 MB and a post model of 120 MB, from 7040 MB.
    assert claimed_cmm_mb([6920, 6800, 6680, 6560, 6440]) == 600
    # Qwen3-1.7B on the card: 28 layers, then the post model (published figures).
    layer = 112
    figures = [7040 - layer * (i + 1) for i in range(28)] + [3788]
    assert claimed_cmm_mb(figures) == 7040 - 3788
    assert claimed_cmm_mb([]) is None and claimed_cmm_mb([5000]) is None
    assert claimed_cmm_mb([5000, 5000]) is None  # no figure moved: nothing to tell
