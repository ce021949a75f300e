"""Run a test module's function under TRITON_INTERPRET=1 in a fresh interpreter.

Triton reads TRITON_INTERPRET when a @triton.jit function is defined (its own library functions
included), so the variable must be set before triton is imported: hence a subprocess. The function
prints one JSON value as its last line of output; `run_interpreted` returns it parsed.
"""
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_interpreted(test_file: str, function: str):
    module = os.path.relpath(os.path.abspath(test_file), ROOT)[:-3].replace(os.sep, ".")  # tests.ffn.test_x
    code = textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        from {module} import {function}; {function}()
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])
