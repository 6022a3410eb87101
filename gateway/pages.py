"""The demo pages and the embed's static files.

`cellgate.js` and `cellgate.mjs` keep their names, so they get a short cache and an
ETag; what they load (`cellgate-frame-<hash>.js`) is named by its content and cached
for good. The bundle is built from client-js/ (`make embed`).
"""

from __future__ import annotations

import html
import json
import os
import re
import time

from aiohttp import web

from gateway.errors import CellgateError

STATIC = os.path.join(os.path.dirname(__file__), "static")
HASHED = re.compile(r"-[A-Z0-9]{8}\.\w+(\.map|\.LEGAL\.txt)?$")
SHORT_CACHE = "public, max-age=300"
IMMUTABLE = "public, max-age=31536000, immutable"
TYPES = {
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".map": "application/json",
    ".txt": "text/plain",
    ".woff": "font/woff",
    ".woff2": "font/woff2",
}

with open(os.path.join(STATIC, "page.html"), encoding="utf-8") as _f:
    PAGE = _f.read()

EXAMPLES = {
    "Hello": 'print("Hello from Cellgate")\n1 + 1',
    "A plot": (
        "import matplotlib.pyplot as plt\nimport numpy as np\n\n"
        "x = np.linspace(0, 4 * np.pi, 400)\nplt.plot(x, np.sin(x), label='sin')\n"
        "plt.plot(x, np.cos(x), label='cos')\nplt.legend()\nplt.show()"
    ),
    "A slider": (
        "from ipywidgets import interact\n\n@interact(n=(1, 20))\ndef squares(n=5):\n"
        "    print([k * k for k in range(n)])"
    ),
    "Ask for input": 'name = input("What is your name? ")\nprint(f"Hello, {name}!")',
    "An error": "def inverse(x):\n    return 1 / x\n\ninverse(0)",
    "HTML and Markdown": (
        "from IPython.display import HTML, Markdown, display\n\n"
        "display(Markdown('**Markdown** with a [link](https://jupyter.org)'))\n"
        "HTML('<table><tr><th>n</th><th>n²</th></tr>'"
        " + ''.join(f'<tr><td>{n}</td><td>{n*n}</td></tr>' for n in range(1, 6)) + '</table>')"
    ),
    "Write a file": (
        "import csv\n\nwith open('squares.csv', 'w', newline='') as f:\n"
        "    csv.writer(f).writerows((n, n * n) for n in range(10))\nprint('wrote squares.csv')"
    ),
}

EXAMPLE_PICKER = """<p class="bar"><label for="examples">Examples</label>
<select id="examples"><option value="">Choose one…</option>{options}</select></p>
<script type="application/json" id="cellgate-examples">{examples}</script>"""

EMBED = """<script src="{base}/static/cellgate.js"></script>
<script>
  const code = JSON.parse(document.getElementById("cellgate-code").textContent);
  const cell = cellgate.makeCell("#cell", {{ code }});
  const picker = document.getElementById("examples");
  if (picker) {{
    const examples = JSON.parse(document.getElementById("cellgate-examples").textContent);
    picker.onchange = () => {{ if (picker.value) {{ cell.setCode(examples[picker.value]); cell.run(); }} }};
  }}
</script>"""

MISSING = """<p class="missing">The embed is not built, so this page cannot run code yet.
Build it with <code>make embed</code> (it needs Node.js 20 or newer), then reload.</p>
<pre>{code}</pre>"""


_listing: tuple[float, frozenset[str]] = (0.0, frozenset())


def _static_names() -> frozenset[str]:
    """The files in static/, listed at most once a second: a build may add them while
    the server runs, and a miss must not stat the disk on every request."""
    global _listing
    when, names = _listing
    if time.monotonic() - when > 1.0:
        names = frozenset(e.name for e in os.scandir(STATIC) if e.is_file())
        _listing = (time.monotonic(), names)
    return names


def _json_in_html(value: object) -> str:
    # JSON inside <script>: "<" escaped so no "</script>" in the data can end the element.
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def page(base: str, code: str, title: str, intro: str, examples: bool) -> web.Response:
    built = "cellgate.js" in _static_names()
    picker = ""
    if examples and built:
        options = "".join(f'<option value="{html.escape(k)}">{html.escape(k)}</option>' for k in EXAMPLES)
        picker = EXAMPLE_PICKER.format(options=options, examples=_json_in_html(EXAMPLES))
    embed = EMBED.format(base=html.escape(base)) if built else MISSING.format(code=html.escape(code))
    fields = {
        "title": html.escape(title),
        "intro": html.escape(intro),
        "examples": picker,
        "code_json": _json_in_html(code),
        "embed": embed,
        "base": html.escape(base),
    }
    body = re.sub(r"\{\{(\w+)\}\}", lambda m: fields[m.group(1)], PAGE)
    return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-cache"})


async def static_file(request: web.Request) -> web.StreamResponse:
    name = request.match_info["name"]
    names = _static_names()
    if name not in names or name == "page.html":
        if name.startswith("cellgate") and "cellgate.js" not in names:
            raise CellgateError("not_found", "the embed is not built: run `make embed` (needs Node.js 20+)")
        raise CellgateError("not_found", "no such static file")
    response = web.FileResponse(os.path.join(STATIC, name))  # sends an ETag and answers If-None-Match with 304
    response.headers["Cache-Control"] = IMMUTABLE if HASHED.search(name) else SHORT_CACHE
    content_type = TYPES.get(os.path.splitext(name)[1])
    if content_type:
        response.headers["Content-Type"] = content_type
    return response
