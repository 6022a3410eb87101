"""Host firewall rules for kernels that share the host's network.

With `--network-isolation false` a kernel has the host's network. As root, its traffic
is still told apart by its uid (one per kernel, from the uid pool), so one nftables
table per fork server refuses what no kernel should reach: the link-local range, where
clouds serve instance metadata and credentials (169.254.169.254, fd00:ec2::254), and
every address of the node itself, the gateway's ports and Redis included. The table is
removed when the fork server stops.
"""

from __future__ import annotations

import os
import shutil
import subprocess

REFUSED_V4 = "169.254.0.0/16"
REFUSED_V6 = "fe80::/10, fd00:ec2::254"


def table_name() -> str:
    return f"cellgate_{os.getpid()}"


def ruleset(uids: tuple[int, int]) -> str:
    who = f"meta skuid {uids[0]}-{uids[1]}"
    return f"""
table inet {table_name()} {{
    chain output {{
        type filter hook output priority 0; policy accept;
        {who} ip daddr {REFUSED_V4} reject
        {who} ip6 daddr {{ {REFUSED_V6} }} reject
        {who} fib daddr type local reject
    }}
}}
"""


def install(uids: tuple[int, int]) -> str | None:
    """Put the rules in place; None, or why they could not be."""
    nft = shutil.which("nft")
    if nft is None:
        return "no nft command (Debian: nftables)"
    done = subprocess.run([nft, "-f", "-"], input=ruleset(uids), capture_output=True, text=True, timeout=30)
    return None if done.returncode == 0 else f"nft refused the rules: {done.stderr.strip()}"


def remove() -> None:
    nft = shutil.which("nft")
    if nft is not None:
        subprocess.run([nft, "delete", "table", "inet", table_name()], capture_output=True, timeout=30)
