"""The warm pool hands out live kernels and never leaves a kernel process behind."""

from __future__ import annotations

import asyncio

import psutil
import pytest

from kernels.handle import KernelHandle
from kernels.kernel import KernelSpec
from kernels.pool import KernelPool
from kernels.workdir import FileTooLarge


def kernel_processes(root: str) -> list[psutil.Process]:
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if child.cwd().startswith(root):
                found.append(child)
        except psutil.Error:
            continue
    return found


async def test_closing_mid_start_leaves_no_kernel_process(tmp_path) -> None:
    root = str(tmp_path)
    pool = KernelPool({"python3": KernelSpec(workdir_root=root)}, size=2, max_kernels=4)
    pool.start()
    await asyncio.sleep(0.3)  # the kernels are being launched
    await pool.close()
    for _ in range(50):
        if not kernel_processes(root):
            break
        await asyncio.sleep(0.1)
    assert kernel_processes(root) == []


async def test_release_kills_the_kernel_and_refills(tmp_path) -> None:
    root = str(tmp_path)
    pool = KernelPool({"python3": KernelSpec(workdir_root=root)}, size=1, max_kernels=2)
    pool.start()
    kernel = await pool.acquire("python3", timeout=60)
    assert kernel.alive and pool.counts()["attached"] == 1
    await pool.release(kernel)
    assert not kernel.alive
    for _ in range(100):
        if pool.counts()["warm"] == 1:
            break
        await asyncio.sleep(0.1)
    assert pool.counts() == {"warm": 1, "starting": 0, "attached": 0}
    await pool.close()
    assert kernel_processes(root) == []


async def test_a_pool_kernel_answers_the_handle_calls(pool: KernelPool) -> None:
    # The calls a session makes (kernels/handle.py), on a kernel as the pool gives it.
    kernel = await pool.acquire("python3", timeout=60)
    try:
        assert isinstance(kernel, KernelHandle) and kernel.alive
        state = await kernel.write_file("in.txt", b"from the client")
        assert state.size == 15
        assert await kernel.list_files(10) == {"in.txt": state}
        assert await kernel.read_file("in.txt", 100, state) == b"from the client"
        with pytest.raises(FileTooLarge):
            await kernel.read_file("in.txt", 5, state)
        exited = asyncio.Event()
        kernel.on_exit(lambda k: exited.set())
        await kernel.kill("ended by the test")
        await asyncio.wait_for(exited.wait(), 10)
        assert not kernel.alive and kernel.exit_reason == "ended by the test"
    finally:
        await pool.release(kernel)
