"""The Batch API's JSONL input and output lines: pure, no store, no daemon."""
from __future__ import annotations

import json

import pytest

from llm_service.jobs.batch_input import (
    BatchError,
    completion_window_seconds,
    error_line,
    in_error_file,
    item_request_id,
    parse_batch_input,
    response_line,
)

CHAT = "/v1/chat/completions"


def line(custom_id="a", url=CHAT, model="m", method="POST", **body) -> str:
    return json.dumps({"custom_id": custom_id, "method": method, "url": url,
                       "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], **body}})


def jsonl(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def test_good_lines_become_requests_in_order_with_their_line_numbers():
    parsed = parse_batch_input(jsonl(line("a"), line("b"), line("c")), CHAT)
    assert [(r.line, r.custom_id) for r in parsed.requests] == [(1, "a"), (2, "b"), (3, "c")]
    assert parsed.requests[0].body["messages"] == [{"role": "user", "content": "hi"}]
    assert parsed.errors == () and parsed.fatal is None
    assert parsed.model == "m" and parsed.endpoint == CHAT


def test_blank_lines_are_skipped_but_numbers_stay_those_of_the_file():
    parsed = parse_batch_input(jsonl(line("a"), "", "   ", line("b")), CHAT)
    assert [(r.line, r.custom_id) for r in parsed.requests] == [(1, "a"), (4, "b")]


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        ("{not json", "invalid_json_line"),
        ("[1, 2]", "invalid_json_line"),
        ('"text"', "invalid_json_line"),
        (line("x")[:-2] + ', "temperature": NaN}}', "invalid_json_line"),
        (line("\ud800"), "invalid_json_line"),  # JSON escapes the lone surrogate
        (json.dumps({"method": "POST", "url": CHAT, "body": {"model": "m"}}), "invalid_custom_id"),
        (json.dumps({"custom_id": 7, "method": "POST", "url": CHAT, "body": {"model": "m"}}), "invalid_custom_id"),
        (json.dumps({"custom_id": "", "method": "POST", "url": CHAT, "body": {"model": "m"}}), "invalid_custom_id"),
        (line("x", method="GET"), "invalid_method"),
        (line("x", url="/v1/embeddings"), "mismatched_url"),
        (line("x", url="/v1/moderations"), "invalid_url"),
        (json.dumps({"custom_id": "x", "method": "POST", "url": CHAT, "body": "text"}), "invalid_body"),
        (json.dumps({"custom_id": "x", "method": "POST", "url": CHAT, "body": {"messages": []}}), "missing_model"),
    ],
)
def test_a_bad_line_is_an_error_entry_and_the_rest_of_the_batch_stays(bad, code):
    parsed = parse_batch_input(jsonl(line("a"), bad, line("b")), CHAT)
    assert [r.custom_id for r in parsed.requests] == ["a", "b"]
    assert len(parsed.errors) == 1
    assert parsed.errors[0].line == 2 and parsed.errors[0].code == code
    assert parsed.errors[0].message
    assert parsed.fatal is None


def test_an_error_entry_keeps_the_custom_id_it_read():
    parsed = parse_batch_input(jsonl(line("x", method="GET")), CHAT)
    assert parsed.errors[0].custom_id == "x"


def test_a_line_that_is_not_utf8_costs_only_that_line():
    content = jsonl(line("a")) + b'{"custom_id": "\xff\xfe"}\n' + jsonl(line("b"))
    parsed = parse_batch_input(content, CHAT)
    assert [r.custom_id for r in parsed.requests] == ["a", "b"]
    assert [(e.line, e.code) for e in parsed.errors] == [(2, "invalid_json_line")]


def test_crlf_line_ends_are_read():
    parsed = parse_batch_input((line("a") + "\r\n" + line("b") + "\r\n").encode(), CHAT)
    assert [r.custom_id for r in parsed.requests] == ["a", "b"]


def test_a_duplicate_custom_id_is_an_error_entry_naming_the_first_line():
    parsed = parse_batch_input(jsonl(line("a"), line("b"), line("a")), CHAT)
    assert [r.custom_id for r in parsed.requests] == ["a", "b"]
    (error,) = parsed.errors
    assert (error.line, error.code, error.custom_id) == (3, "duplicate_custom_id", "a")
    assert "line 1" in error.message


def test_a_bad_line_does_not_claim_its_custom_id():
    # The bad first "a" runs nothing, so the good second "a" is the request of that id.
    parsed = parse_batch_input(jsonl(line("a", method="GET"), line("a")), CHAT)
    assert [(r.line, r.custom_id) for r in parsed.requests] == [(2, "a")]


def test_one_model_per_batch():
    parsed = parse_batch_input(jsonl(line("a", model="m"), line("b", model="other")), CHAT)
    assert [r.custom_id for r in parsed.requests] == ["a"]
    assert [(e.line, e.code) for e in parsed.errors] == [(2, "mismatched_model")]


def test_an_unknown_endpoint_fails_the_batch():
    parsed = parse_batch_input(jsonl(line("a")), "/v1/moderations")
    assert parsed.fatal is not None and parsed.fatal.code == "invalid_endpoint"
    assert parsed.requests == ()


def test_an_empty_file_fails_the_batch():
    assert parse_batch_input(b"\n\n", CHAT).fatal == BatchError("empty_file", "the input file holds no requests")


def test_a_file_of_only_bad_lines_is_no_empty_file():
    parsed = parse_batch_input(b"nope\n", CHAT)
    assert parsed.fatal is None and len(parsed.errors) == 1 and parsed.model is None


def test_too_many_requests_fails_the_batch():
    parsed = parse_batch_input(jsonl(*(line(str(i)) for i in range(4))), CHAT, max_requests=3)
    assert parsed.fatal is not None and parsed.fatal.code == "too_many_requests"
    assert parse_batch_input(jsonl(*(line(str(i)) for i in range(3))), CHAT, max_requests=3).fatal is None


def test_every_endpoint_is_accepted():
    for url in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        assert len(parse_batch_input(jsonl(line("a", url=url)), url).requests) == 1


@pytest.mark.parametrize(("window", "seconds"), [("24h", 86400), ("90s", 90), ("30m", 1800), ("7d", 604800)])
def test_completion_windows(window, seconds):
    assert completion_window_seconds(window) == seconds


@pytest.mark.parametrize("window", ["", "24", "h", "0h", "-1h", "1.5h", "24 hours", None])
def test_bad_completion_windows(window):
    with pytest.raises(ValueError):
        completion_window_seconds(window)


def test_response_line_is_openais_output_shape():
    text = response_line("batch_req_1", "a", 200, "req-9", {"choices": [{"message": {"content": "é\n"}}]})
    assert text.endswith("\n") and text.count("\n") == 1
    assert json.loads(text) == {
        "id": "batch_req_1",
        "custom_id": "a",
        "response": {"status_code": 200, "request_id": "req-9",
                     "body": {"choices": [{"message": {"content": "é\n"}}]}},
        "error": None,
    }


def test_error_line_is_openais_error_shape_with_the_line_number():
    assert json.loads(error_line("batch_req_2", None, "invalid_json_line", "not JSON", line=4)) == {
        "id": "batch_req_2", "custom_id": None, "response": None,
        "error": {"code": "invalid_json_line", "message": "not JSON", "line": 4},
    }
    assert json.loads(error_line("r", "a", "batch_expired", "late"))["error"] == {
        "code": "batch_expired", "message": "late"}


def test_which_answers_go_to_the_error_file():
    assert not in_error_file(200) and not in_error_file(204)
    assert in_error_file(400) and in_error_file(500) and in_error_file(199)


def test_item_request_ids_are_stable_and_distinct():
    assert item_request_id("batch_x", 1) == item_request_id("batch_x", 1)
    assert item_request_id("batch_x", 1).startswith("batch_req_")
    ids = {item_request_id(job, n) for job in ("batch_x", "batch_y") for n in range(1, 50)}
    assert len(ids) == 98


def test_output_files_put_every_item_once_in_line_order():
    from llm_service.jobs.output_files import render_output_files
    from llm_service.jobs.store import Item

    def item(line, custom_id, state, result=None, error=None):
        return Item("batch_1", line, custom_id, state, result, error, 1)

    items = [
        item(5, "e", "expired"),
        item(1, "a", "done", {"status_code": 200, "request_id": "r1", "body": {"ok": 1}}),
        item(2, "b", "failed", {"status_code": 400, "request_id": "r2", "body": {"error": {"message": "bad"}}}),
        item(3, None, "failed", error={"code": "invalid_json_line", "message": "not JSON", "line": 3}),
        item(4, "d", "cancelled"),
        item(6, "f", "done", {"status_code": 200, "request_id": "r6", "body": {"ok": 6}}),
    ]
    files = render_output_files("batch_1", items)
    output = [json.loads(text) for text in files.output.splitlines()]
    errors = [json.loads(text) for text in files.errors.splitlines()]
    assert [o["custom_id"] for o in output] == ["a", "f"]
    assert output[0] == {"id": item_request_id("batch_1", 1), "custom_id": "a",
                         "response": {"status_code": 200, "request_id": "r1", "body": {"ok": 1}},
                         "error": None}
    assert [(e["custom_id"], (e["error"] or {}).get("code")) for e in errors] == [
        ("b", None), (None, "invalid_json_line"), ("d", "batch_cancelled"), ("e", "batch_expired")]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[1]["error"]["line"] == 3
    assert files == render_output_files("batch_1", list(reversed(items)))  # the same at each rendering


def test_output_files_refuse_an_item_still_to_run():
    from llm_service.jobs.output_files import render_output_files
    from llm_service.jobs.store import Item

    with pytest.raises(ValueError):
        render_output_files("batch_1", [Item("batch_1", 1, "a", "pending", None, None, 0)])

