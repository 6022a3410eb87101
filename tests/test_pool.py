"""The warm pool hands out live kernels and never leaves a kernel process behind."""

from __future__ import annotations

import asyncio

import psutil

from kernels.kernel import KernelSpec
from kernels.pool import KernelPool


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
