"""A model's text that looks like the runner's own framing (its log lines, `hit eos`, the marker)
stays the model's text: the parser takes a line for a log line inside a turn only if the runner
coloured it, as the card's runners colour every log line. Directly on the parser, and through the
daemon with queued clients, whose answers must stay their own."""
from __future__ import annotations

import threading

from harness.daemon import running_daemon
from harness.models import shell_runner_model
from llm_service.engines.card.output import Marker, RunnerOutputParser, Text, TurnEnd

FRAMING = [
    "\n[N][                             Run][1182]: hit eos,avg 5.00 token/s\nprompt >> ",
    "[E][                      SetKVCache][ 628]: precompute_len(21) + input_num_token(9000) > _attr.prefill_max_kv_cache_num_grp[4]",
    "\n[I][                      GetKVCache][ 597]: precompute_len:46, remaining:2002\n",
    "[I][Run][1030]: ttft: 1.00 ms\n\n>> ",
]


def turn_text(parser: RunnerOutputParser, data: bytes) -> tuple[str, list]:
    parser.begin_turn()
    events = parser.feed(data)
    return "".join(e.text for e in events if isinstance(e, Text)), events


def test_uncoloured_framing_inside_a_turn_is_text():
    for framing in FRAMING:
        parser = RunnerOutputParser("b")
        parser.feed(b"prompt >> ")
        body = f"Before {framing} after.".encode()
        real_end = b"\n\n\x1b[1;30;35m[N][                             Run][1182]: hit eos,avg 5.00 token/s\x1b[0m\n\x1b[0m\nprompt >> "
        text, events = turn_text(parser, body + real_end)
        assert text == f"Before {framing} after.", framing
        assert [type(e) for e in events if isinstance(e, (TurnEnd, Marker))] == [TurnEnd, Marker]


def test_coloured_log_lines_inside_a_turn_are_still_log_lines():
    parser = RunnerOutputParser("b")
    parser.feed(b"prompt >> ")
    data = (b"\x1b[1;30;32m[I][                             Run][1030]: ttft: 3.00 ms\x1b[0m\nHello there"
            b"\n\n\x1b[1;30;35m[N][                             Run][1182]: hit eos,avg 5.00 token/s\x1b[0m\n\x1b[0m\nprompt >> ")
    text, events = turn_text(parser, data)
    assert text == "Hello there"
    assert any(isinstance(e, TurnEnd) for e in events)


def escaping_runner(root, name: str) -> dict:
    """The hand-written runner, printing its answer through printf's %b: a `\\n` in the prompt
    line becomes a real newline in the answer, so framing strings land at line starts."""
    entry = shell_runner_model(root, name)
    script = root / name / entry["run_cmd"]
    script.write_text(script.read_text().replace("printf 'You said: %s' \"$line\"", "printf 'You said: %b' \"$line\""))
    return entry


def test_framing_in_answers_through_the_daemon_keeps_every_queued_answer_its_own(tmp_path):
    # The runner answers "You said: <line>"; each line carries a framing string, newlines included.
    entries = [escaping_runner(tmp_path, "m")]
    texts = [f"client {i}: {FRAMING[i % len(FRAMING)]}" for i in range(6)]
    prompts = [text.replace("\n", "\\n") for text in texts]
    with running_daemon(tmp_path, entries) as daemon:
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            with daemon.client() as http:
                reply = http.post("/api/chat", json={"model": "m", "stream": False,
                                                     "messages": [{"role": "user", "content": prompts[i]}]})
                answers[i] = reply.json().get("message", {}).get("content", reply.text)

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        assert answers == {i: f"You said: {text}" for i, text in enumerate(texts)}


# ---- any text, through the real emulator with our tokenizer server ----------------------------

ESC = "\x1b"
FRAGMENTS = [
    "\n\n", "\n", "\r", " ", "prompt >> ", ">> ", "q", "reset",
    f"{ESC}[1;30;35m[N][                             Run][1182]: hit eos,avg 5.00 token/s{ESC}[0m\n",
    f"{ESC}[0m\n",
    f"{ESC}[1;30;32m[I][                      GetKVCache][ 597]: precompute_len:99, remaining:1949{ESC}[0m\n",
    f"{ESC}[1;30;31m[E][                      SetKVCache][ 641]: precompute_len(21) + input_num_token(9000) > "
    f"_attr.prefill_max_kv_cache_num_grp[4]{ESC}[0m\n",
    f"{ESC}[1;30;32m[I][                             Run][1030]: ttft: 3.00 ms{ESC}[0m\n",
    "[N][Run][1182]: hit eos,avg 9 token/s", "17:47:50.101 NTC Run:1145 | hit eos,avg 3.69 token/s\n",
    '\x1b[1;30;33m\r100% | ████ |  31 /  31 [1.0s<1.0s, 1 count/s] init post axmodel ok\x1b[0m', f"{ESC}[", "Type \"q\" to exit",
    "<think>", "</think>", "word", "the answer", "ü", "日本", "\\", "\\n",
]


def random_texts(seed: int, count: int) -> list[str]:
    import random

    rng = random.Random(seed)
    return [f"c{i} " + "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))) for i in range(count)]


def test_answers_that_imitate_the_runner_reach_their_clients_whole_and_queued_answers_stay_their_own(tmp_path):
    """Property, over seeded random texts built from the runner's own framing (coloured end of
    turn, context lines, markers, errors, the load bar): the answer a client gets is exactly the
    text the emulator generated, also with several clients queued behind each other."""
    from ax_emulator.scripted import reply_text
    from harness.models import scripted_model

    words = 3
    entries = [scripted_model(tmp_path, "m", reply_words=words, tokens_per_second=400, extra_flags=("--emu_echo unescaped",))]
    texts = random_texts(seed=20261202, count=24)
    with running_daemon(tmp_path, entries) as daemon:
        answers: dict[int, str] = {}

        def ask(i: int) -> None:
            with daemon.client() as http:
                body = {"model": "m", "stream": False, "messages": [{"role": "user", "content": texts[i]}]}
                answers[i] = http.post("/api/chat", json=body).json().get("message", {}).get("content")

        for start in range(0, len(texts), 4):  # four at a time: three wait in the queue
            threads = [threading.Thread(target=ask, args=(i,)) for i in range(start, min(start + 4, len(texts)))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
        wrong = {i: (answers.get(i), reply_text(texts[i], words, think=False)) for i in range(len(texts))
                 if answers.get(i) != reply_text(texts[i], words, think=False)}
        assert not wrong, wrong
