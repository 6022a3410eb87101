"""ipykernel's application as a forked kernel runs it: the same app, its command line
already parsed by the fork server (see `Server.kernel_config`)."""

from __future__ import annotations

from typing import Any

from ipykernel.kernelapp import IPKernelApp


class ParsedKernelApp(IPKernelApp):
    """Given its command line as config. Inside the kernel it is the singleton that
    `IPKernelApp.instance()` returns, so ipykernel and IPython see their usual app."""

    def parse_command_line(self, argv: Any = None) -> None:
        pass  # done once in the fork server; argparse would cost every kernel ~10 ms
