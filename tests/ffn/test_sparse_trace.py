"""The sparse SwitchableFFN, as an SSD sparse phase runs it (expert-major, the router folded into our Triton kernels),
traces into one graph under torch.compile(fullgraph=True): in fp32, and under bf16 autocast with fp32 master weights.

A graph break there splits every compiled block into several graphs with their guards and resumes between them: on
the H100 the eager GPT-base sparse step took 86.6-125.0 ms with three breaks per sparse layer and 43.2-46.4 ms without
(docs/kernels.md v30). The check only traces: the backend raises once it is handed the graph, so nothing runs (the
Triton interpreter cannot run bf16 dots). TRITON_INTERPRET=1 makes our kernels' path the one taken on the CPU, so it
runs in a subprocess (tests/interpreted.py).
"""
import pytest
import torch

from ..interpreted import run_interpreted

CASES = [("relu", False), ("relu", True), ("swiglu", True)]  # (activation, bf16 autocast)


def _traced_main():
    import contextlib
    import json

    from ssd_megatron.ffn.backends import get_backend
    from tests.backends.backend_cases import expert_major_sparse_ffn

    class Traced(Exception):
        pass

    results = []
    for activation, amp in CASES:
        ffn = expert_major_sparse_ffn(32, 128, activation, 8, 2)
        ffn.set_backend(get_backend("triton"))
        x = torch.randn(40, 32, requires_grad=True)
        graphs = []

        def backend(gm, example_inputs):
            graphs.append(gm)
            raise Traced

        torch._dynamo.reset()
        amp_ctx = torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()
        try:
            with amp_ctx:
                torch.compile(ffn, fullgraph=True, backend=backend)(x)
            outcome = "ran without handing a graph to the backend"
        except Exception as e:  # noqa: BLE001 - the outcome is reported to the test
            cause = e
            while cause is not None and not isinstance(cause, Traced):
                cause = cause.__cause__ or getattr(cause, "inner_exception", None)
            outcome = "traced" if cause is not None else f"{type(e).__name__}: {str(e)[:400]}"
        ops = sorted({str(n.target) for g in graphs for n in g.graph.nodes if "ssd_megatron" in str(n.target)})
        results.append({"case": [activation, amp], "outcome": outcome, "graphs": len(graphs), "ops": ops})
    print(json.dumps(results))


def test_sparse_layer_traces_as_one_graph():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the interpreter's path is not the one taken")
    for r in run_interpreted(__file__, "_traced_main"):
        assert r["outcome"] == "traced" and r["graphs"] == 1, r
        assert any("triton_experts" in op for op in r["ops"]), r  # our kernels' op (the router folded into it)
