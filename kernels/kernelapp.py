"""ipykernel's application as a forked kernel runs it: the same app, its command line
already parsed by the fork server (see `Server.kernel_config`)."""

from __future__ import annotations

import sys
from typing import Any

from ipykernel.kernelapp import IPKernelApp


class ParsedKernelApp(IPKernelApp):
    """Given its command line as config. Inside the kernel it is the singleton that
    `IPKernelApp.instance()` returns, so ipykernel and IPython see their usual app."""

    def parse_command_line(self, argv: Any = None) -> None:
        pass  # done once in the fork server; argparse would cost every kernel ~10 ms

    def initialize(self, argv: Any = None) -> None:
        super().initialize(argv)
        # ipywidgets was imported in the fork server, before there was a kernel, so its
        # import registered no comm targets: without its control target a front end
        # that joins late cannot fetch the widgets' states. Register them now.
        widgets = sys.modules.get("ipywidgets")
        if widgets is not None:
            widgets.register_comm_target()
