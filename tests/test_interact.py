"""Interacts: ipywidgets comm messages flow both ways and re-run the function."""

from __future__ import annotations

from tests.conftest import ClientFactory


async def test_interact_slider_reruns_function(connect: ClientFactory) -> None:
    c = await connect()
    run = await c.execute(
        "from ipywidgets import interact\n@interact(x=5)\ndef f(x):\n    print('value', x * 2)\n",
        timeout=60,
    )
    assert run.reply["status"] == "ok"
    opens = [
        d
        for e, d in c.events
        if e == "iopub"
        and d["header"]["msg_type"] == "comm_open"
        and d["content"]["data"].get("state", {}).get("_model_name") == "IntSliderModel"
    ]
    assert len(opens) == 1
    slider = opens[0]["content"]["comm_id"]
    assert opens[0]["content"]["data"]["state"]["value"] == 5
    start = len(c.events)
    msg_id = await c.comm_msg(slider, {"method": "update", "state": {"value": 7}, "buffer_paths": []})

    def reran(e: str, d: dict) -> bool:
        return e == "iopub" and d["header"]["msg_type"] == "stream" and "value 14" in d["content"]["text"]

    _, out = await c.wait_for(reran, timeout=20, start=start)
    assert out["parent_header"]["msg_id"] == msg_id


async def test_comm_info_and_close(connect: ClientFactory) -> None:
    c = await connect()
    await c.execute("import ipywidgets as w\ns = w.IntSlider()\ns")
    msg_id = await c.request("shell", "comm_info_request", {})
    _, reply = await c.wait_for(lambda e, d: e == "shell" and d["parent_header"].get("msg_id") == msg_id)
    comms = reply["content"]["comms"]
    assert comms
    comm_id = next(iter(comms))
    await c.request("shell", "comm_close", {"comm_id": comm_id, "data": {}})
    msg_id = await c.request("shell", "comm_info_request", {})
    _, reply = await c.wait_for(lambda e, d: e == "shell" and d["parent_header"].get("msg_id") == msg_id)
    assert comm_id not in reply["content"]["comms"]


async def test_a_front_end_that_joins_late_fetches_every_widget_state(connect: ClientFactory) -> None:
    # What a browser tab opened after the widgets were made does: ipywidgets' control
    # comm answers with the state of every widget the kernel holds.
    c = await connect()
    await c.execute("import ipywidgets as w\ns = w.IntSlider(value=3)\ns")
    control = "control-1"
    opening = {"comm_id": control, "target_name": "jupyter.widget.control", "data": {}}
    await c.request("shell", "comm_open", opening, metadata={"version": "1.0.0"})
    msg_id = await c.comm_msg(control, {"method": "request_states"})

    def states(e: str, d: dict) -> bool:
        return e == "iopub" and d["header"]["msg_type"] == "comm_msg" and d["content"]["comm_id"] == control

    _, reply = await c.wait_for(states, timeout=20)
    assert reply["parent_header"]["msg_id"] == msg_id
    models = reply["content"]["data"]["states"]
    sliders = [m["state"] for m in models.values() if m["model_name"] == "IntSliderModel"]
    assert [s["value"] for s in sliders] == [3]
