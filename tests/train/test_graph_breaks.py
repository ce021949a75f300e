"""GraphBreakWatch tells each new graph-break reason once, counted from its own start."""
import torch
from torch._dynamo.utils import counters

from ssd_megatron.train.graph_breaks import GraphBreakWatch, reason_line


def _breaks(x):
    y = x * 2
    torch._dynamo.graph_break()
    return y + 1


def _prints(x):
    y = x * 3
    print("a call dynamo cannot trace", end="\r")
    return y - 1


def test_each_reason_is_told_once():
    torch._dynamo.reset()
    watch = GraphBreakWatch()
    assert watch.new() == []
    x = torch.ones(3)
    torch.testing.assert_close(torch.compile(_breaks, backend="eager")(x), x * 2 + 1)
    first = watch.new()
    assert len(first) == 1 and first[0].startswith("1 x ") and "graph_break" in first[0], first
    assert "\n" not in first[0] and "Hint" not in first[0]
    before = sum(counters["graph_break"].values())
    torch.compile(_breaks, backend="eager")(torch.ones(2, 5))  # a new shape: traced and broken again,
    assert sum(counters["graph_break"].values()) > before  # for the same reason: not told again
    assert watch.new() == []
    torch.compile(_prints, backend="eager")(x)
    second = watch.new()
    assert len(second) == 1 and second[0] != first[0], second
    # a later watch counts from its own start: the reasons above are not its
    assert GraphBreakWatch().new() == []


def test_reason_line_keeps_the_first_line_and_the_call():
    reason = ("Data-dependent branching\n  Explanation: Detected data-dependent branching.\n  Hint: Use torch.cond.\n\n"
              "  Developer debug context: attempted to jump with UserMethodVariable(TritonBackend.folds_router)\n\n"
              " For more details about this graph break, please visit: https://example")
    assert reason_line(reason) == ("Data-dependent branching | Developer debug context: attempted to jump with "
                                   "UserMethodVariable(TritonBackend.folds_router)")
