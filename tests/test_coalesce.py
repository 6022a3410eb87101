"""A backlog of stream output reaches the client as fewer, larger messages, text intact."""

from __future__ import annotations

from typing import Any

from gateway.session import STREAM_MERGE_MAX, _coalesce


def stream(parent: str, name: str, text: Any) -> tuple[str, dict[str, Any], int]:
    return (
        "iopub",
        {
            "header": {"msg_type": "stream", "msg_id": f"{parent}-{str(text)[:4]}"},
            "parent_header": {"msg_id": parent},
            "metadata": {},
            "content": {"name": name, "text": text},
            "buffers": [],
        },
        len(str(text)) + 100,
    )


def test_runs_of_one_stream_merge_and_keep_order() -> None:
    batch = [
        stream("a", "stdout", "1\n"),
        stream("a", "stdout", "2\n"),
        stream("a", "stderr", "oops\n"),
        stream("a", "stdout", "3\n"),
        ("iopub", {"header": {"msg_type": "status"}, "parent_header": {"msg_id": "a"}, "content": {}}, 50),
        stream("a", "stdout", "4\n"),
        stream("b", "stdout", "other\n"),
    ]
    out = _coalesce(batch)
    texts = [(d["content"].get("name"), d["content"].get("text")) for _, d, _ in out]
    assert texts == [
        ("stdout", "1\n2\n"),
        ("stderr", "oops\n"),
        ("stdout", "3\n"),
        (None, None),
        ("stdout", "4\n"),
        ("stdout", "other\n"),
    ]
    assert batch[0][1]["content"]["text"] == "1\n"  # the logged originals are not mutated
    # A merged message weighs what its parts weighed: bounds see the same bytes.
    assert [size for _, _, size in out] == [204, 105, 102, 50, 102, 106]


def test_text_that_is_not_a_string_is_never_merged() -> None:
    batch = [stream("a", "stdout", "ok\n"), stream("a", "stdout", ["not", "text"]), stream("a", "stdout", 7)]
    assert [d["content"]["text"] for _, d, _ in _coalesce(batch)] == ["ok\n", ["not", "text"], 7]


def test_merged_messages_stay_bounded() -> None:
    chunk = "x" * (STREAM_MERGE_MAX // 4)
    out = _coalesce([stream("a", "stdout", chunk) for _ in range(10)])
    assert all(len(d["content"]["text"]) <= STREAM_MERGE_MAX for _, d, _ in out)
    assert "".join(d["content"]["text"] for _, d, _ in out) == chunk * 10
    assert len(out) == 3
