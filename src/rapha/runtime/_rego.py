"""The Rego child process: evaluate one query with regopy and print the result as JSON.

Run by :mod:`rapha.runtime.policy` as ``python -I <this file>``, by path, so that it imports
nothing but the standard library and regopy (not even :mod:`rapha`): a policy or input that
crashes or hangs the interpreter takes down this process only.

Protocol. Standard input is one JSON object ``{"modules": [[name, source], ...], "input":
{...}, "query": "x = data.<package>.decision"}``. Standard output is one JSON object:
``{"status": "ok", "value": ...}`` (the binding of ``x``), ``{"status": "undefined"}``, or
``{"status": "error", "stage": "compile" | "query" | "protocol"}``. Nothing else is ever
written to the real standard output: rego-cpp prints diagnostics on file descriptor 1, so
that descriptor is pointed at standard error before regopy is imported, and the result is
written to a private duplicate of the original.
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

_VARIABLE = "x"


def _result(out: int, payload: dict[str, Any]) -> None:
    data = json.dumps(payload, allow_nan=False).encode("utf-8")
    while data:
        data = data[os.write(out, data) :]


def main() -> int:
    """Evaluate the request on standard input; always exit 0 after writing a result."""
    out = os.dup(1)
    os.dup2(2, 1)
    cpu = int(os.environ.get("RAPHA_REGO_CPU_SECONDS", "30"))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    try:
        request = json.loads(sys.stdin.buffer.read())
        modules = [(str(name), str(source)) for name, source in request["modules"]]
        query = str(request["query"])
        value = request["input"]
    except (ValueError, KeyError, TypeError):
        _result(out, {"status": "error", "stage": "protocol"})
        return 0

    from regopy import Interpreter, RegoError

    rego = Interpreter()
    try:
        for name, source in modules:
            rego.add_module(name, source)
        rego.set_input(value)
    except (RegoError, ValueError, TypeError):
        _result(out, {"status": "error", "stage": "compile"})
        return 0
    try:
        output = rego.query(query)
        text = str(output)
        if text == "undefined" or (len(output) == 1 and _VARIABLE not in output[0].bindings):
            _result(out, {"status": "undefined"})
        elif len(output) != 1:  # a failed query ("<error>") has no results at all
            _result(out, {"status": "error", "stage": "query"})
        else:
            _result(out, {"status": "ok", "value": output[0][_VARIABLE]})
    except (RegoError, ValueError, TypeError, KeyError, RecursionError):
        _result(out, {"status": "error", "stage": "query"})
    return 0


if __name__ == "__main__":
    sys.exit(main())
