"""Pure logic of the tokenizer server and the prompt newline escape."""
from __future__ import annotations

import pytest

from tokenizer_service.conversation import IncrementalDecoder, infill_tokens, prefill_diff, stop_tokens, strip_think
from tokenizer_service.prompt_escape import escape_prompt_line, unescape_prompt_line


@pytest.mark.parametrize("text", [
    "", "plain", "a\nb", "\n\n", "C:\\new\\table", "ends with \\", "\\n literal", "\\\n", "mixed \\\\n\n x",
])
def test_escape_is_one_line_and_unescape_inverts_it(text):
    line = escape_prompt_line(text)
    assert "\n" not in line
    assert unescape_prompt_line(line) == text


def test_escape_writes_backslash_pairs():
    assert escape_prompt_line("a\\b\nc") == "a\\\\b\\nc"


def test_unescape_keeps_other_backslashes():
    assert unescape_prompt_line("tab \\t and trailing \\") == "tab \\t and trailing \\"


@pytest.mark.parametrize("reply, kept", [
    ("no thinking here", "no thinking here"),
    ("  leading blanks kept\n", "  leading blanks kept\n"),  # as a stock script sends it back
    ("<think>\nhmm\n</think>\n\nAnswer", "Answer"),
    ("hmm</think>Answer", "Answer"),
    ("Answer<think>unfinished", "Answer"),
    ("<think>a</think>b<think>c</think>\nfinal", "final"),
])
def test_strip_think(reply, kept):
    assert strip_think(reply) == kept


def test_prefill_diff():
    assert prefill_diff([1, 2, 3, 4], [1, 2]) == [3, 4]
    assert prefill_diff([1, 2, 3, 4], []) == [1, 2, 3, 4]
    assert prefill_diff([1, 9, 3, 4], [1, 2, 3]) == [9, 3, 4]  # diverged: everything after the split


def byte_decode(ids: list[int]) -> str:
    """A byte-level vocabulary: token i is the byte i."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_incremental_decoder_waits_for_whole_characters():
    decoder = IncrementalDecoder(byte_decode)
    euro = list("€".encode())  # three bytes
    assert decoder.push([ord("a")]) == "a"
    assert decoder.push([ord("b"), euro[0]]) == ""  # the whole piece waits for the character
    assert decoder.push([euro[1]]) == ""
    assert decoder.push([euro[2], ord("c")]) == "b€c"
    assert decoder.token_count == 6


def test_incremental_decoder_lets_invalid_utf8_through_eventually():
    decoder = IncrementalDecoder(byte_decode)
    pieces = [decoder.push([0xFF]) for _ in range(20)]
    assert "\ufffd" in "".join(pieces)


def test_infill_tokens_by_family():
    assert infill_tokens({"<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>", "<|fim_pad|>"}) == {
        "prefix": "<|fim_prefix|>", "suffix": "<|fim_suffix|>", "middle": "<|fim_middle|>"}
    assert infill_tokens({"<fim_prefix>", "<fim_suffix>", "<fim_middle>"}) == {
        "prefix": "<fim_prefix>", "suffix": "<fim_suffix>", "middle": "<fim_middle>"}
    assert infill_tokens({"<\uff5cfim\u2581begin\uff5c>", "<\uff5cfim\u2581hole\uff5c>", "<\uff5cfim\u2581end\uff5c>"})["suffix"] == \
        "<\uff5cfim\u2581hole\uff5c>"
    assert infill_tokens({"<fim_prefix>", "<fim_middle>"}) is None  # all three, or no insert
    assert infill_tokens({"<|im_start|>", "<|im_end|>"}) is None


def test_stop_tokens():
    chatml = "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>'}}"
    assert stop_tokens("<|im_end|>", chatml) == ["<|im_end|>", "<|im_start|>"]
    assert stop_tokens("<|endoftext|>", chatml) == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert stop_tokens("</s>", "[INST] {{ message['content'] }} [/INST]") == ["</s>"]
    assert stop_tokens(None, "") == []


def test_a_shared_port_gives_each_announced_runner_one_uid_of_its_model() -> None:
    from tokenizer_service.server import ApiError, PortModels

    models = PortModels()
    first, second = object(), object()  # stand-ins: routing by announcement never asks the model
    models.add("first", first)  # type: ignore[arg-type]
    models.add("second", second)  # type: ignore[arg-type]
    with pytest.raises(ApiError) as unannounced:
        models.pick(None, None, "/get_uid")
    assert unannounced.value.status == 409
    models.announce("first")
    models.announce("first")  # a model on two cards: two runners start together
    assert [models.pick(None, None, "/get_uid") for _ in range(2)] == [first, first]
    with pytest.raises(ApiError):
        models.pick(None, None, "/get_uid")  # a third runner was not announced
    models.announce("second")
    assert models.pick(None, None, "/get_uid") is second
    assert models.pick("first", None, "/capabilities") is first  # a call naming its model
    with pytest.raises(ApiError) as unknown:
        models.announce("third")
    assert unknown.value.status == 404


@pytest.mark.anyio
async def test_a_port_turn_lets_one_models_runners_start_together_and_others_wait() -> None:
    import anyio

    from llm_service.tokenizer_client import PortTurn

    turn, started = PortTurn(), []

    async def start(model: str) -> None:
        await turn.acquire(model)
        started.append(model)

    await turn.acquire("twin")
    await turn.acquire("twin")  # its second card's runner does not wait for the first
    async with anyio.create_task_group() as tg:
        tg.start_soon(start, "other")
        await anyio.sleep(0.05)
        assert started == []  # another model waits while twin's runners start
        turn.release()
        await anyio.sleep(0.05)
        assert started == []
        turn.release()
    assert started == ["other"] and turn.model == "other"
