"""A backlog of stream output reaches the client as fewer, larger messages, text intact."""

from __future__ import annotations

from typing import Any

from gateway.session import STREAM_MERGE_MAX, _coalesce


def stream(parent: str, name: str, text: str) -> tuple[str, dict[str, Any]]:
    return (
        "iopub",
        {
            "header": {"msg_type": "stream", "msg_id": f"{parent}-{text[:4]}"},
            "parent_header": {"msg_id": parent},
            "metadata": {},
            "content": {"name": name, "text": text},
            "buffers": [],
        },
    )


def test_runs_of_one_stream_merge_and_keep_order() -> None:
    batch = [
        stream("a", "stdout", "1\n"),
        stream("a", "stdout", "2\n"),
        stream("a", "stderr", "oops\n"),
        stream("a", "stdout", "3\n"),
        ("iopub", {"header": {"msg_type": "status"}, "parent_header": {"msg_id": "a"}, "content": {}}),
        stream("a", "stdout", "4\n"),
        stream("b", "stdout", "other\n"),
    ]
    out = _coalesce(batch)
    texts = [(d["content"].get("name"), d["content"].get("text")) for _, d in out]
    assert texts == [
        ("stdout", "1\n2\n"),
        ("stderr", "oops\n"),
        ("stdout", "3\n"),
        (None, None),
        ("stdout", "4\n"),
        ("stdout", "other\n"),
    ]
    assert batch[0][1]["content"]["text"] == "1\n"  # the logged originals are not mutated


def test_merged_messages_stay_bounded() -> None:
    chunk = "x" * (STREAM_MERGE_MAX // 4)
    out = _coalesce([stream("a", "stdout", chunk) for _ in range(10)])
    assert all(len(d["content"]["text"]) <= STREAM_MERGE_MAX for _, d in out)
    assert "".join(d["content"]["text"] for _, d in out) == chunk * 10
    assert len(out) == 3
