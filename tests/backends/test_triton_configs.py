"""The triton backend's environment variables: SSD_TRITON_CONFIG's tile configs and one-line errors, SSD_PLAN_FILL,
and what the benchmarks record of them."""
import os

import pytest

pytest.importorskip("triton")

from ssd_megatron.errors import UserError  # noqa: E402
from ssd_megatron.ffn.backends.kernels import descriptors, down_launch, tile_order, up_launch  # noqa: E402
from ssd_megatron.ffn.backends.kernels import tile_configs as tc  # noqa: E402


def test_env_config_overrides_the_default_for_its_kind(monkeypatch):
    monkeypatch.setenv("SSD_TRITON_CONFIG", " wgrad=64,128,128,4,3,1024 ; down:atomic16=128,128,64,8,3,3")
    key = (192, 768, "torch.bfloat16")
    assert tc.pick_tile("wgrad", key, None) == (64, 128, 128, 4, 3, 1024)
    assert tc.pick_tile("down:atomic16", key, None) == (128, 128, 64, 8, 3, 3)
    assert tc.pick_tile("down:buffer", key, None) == tc.default_tile("down", key)   # another combine: untouched
    assert tc.pick_tile("up", key, None) == tc.default_tile("up", key)
    monkeypatch.setenv("SSD_TRITON_CONFIG", "down=64,64,32,4,2")
    assert tc.pick_tile("down:buffer", key, None) == (64, 64, 32, 4, 2)       # the kind's base name: every combine


def test_forced_configs_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("SSD_TRITON_CONFIG", "up=128,128,64,8,3")
    tc.force_config(up=(16, 16, 16, 1, 1))
    try:
        assert tc.pick_tile("up", (768, 192, "torch.bfloat16"), None) == (16, 16, 16, 1, 1)
    finally:
        tc.force_config()


@pytest.mark.parametrize("text, says", [
    ("wgrad:64,128,128,4,3", "expected KIND="),
    ("gemm=64,128,128,4,3", "KIND one of up, up_glu"),
    ("wgrad=64,128,x,4,3", "5 to 7 integers"),
    ("down=128,128,64,8,3,3,1", "a seventh value is for up, up_glu"),
    ("wgrad=64,128,128,4,3,2048,2", "a seventh value is for up, up_glu"),
    ("wgrad=64,128,128,4", "5 to 7 integers"),
    ("wgrad=64,96,128,4,3", "powers of two"),
    ("down=128,128,64,8,0", "STAGES >= 1"),
    ("down=128,128,64,8,3,2", "VARIANT must be"),      # 2 was PERSISTENT, removed
    ("down=128,128,64,8,3,7", "6 (WS_PAIR)"),
    ("up=128,128,64,8,3,1", "VARIANT must be"),
    ("up_bwd=128,64,64,3,4,6", "VARIANT must be"),  # (a ring of 3 in WARPS' place: the variant is named first)
    ("wgrad=64,128,128,4,3,-1", "VARIANT must be"),
])
def test_bad_env_config_is_a_one_line_error_naming_the_variable(monkeypatch, text, says):
    monkeypatch.setenv("SSD_TRITON_CONFIG", text)
    with pytest.raises(UserError) as err:
        tc.pick_tile("wgrad", (192, 768, "torch.bfloat16"), None)
    msg = str(err.value)
    assert msg.startswith("SSD_TRITON_CONFIG: ") and says in msg and "\n" not in msg, msg


def test_staged_down_variant_is_accepted(monkeypatch):
    monkeypatch.setenv("SSD_TRITON_CONFIG", "down=64,64,64,4,2,4")
    assert tc.pick_tile("down:atomic16", (256, 4096, "torch.bfloat16"), None) == (64, 64, 64, 4, 2, tc.STAGED)


@pytest.mark.parametrize("E, BN, want", [
    (192, 256, (128, 64, 1, 2)),   # whole E as 128 + 64 columns; dgate partials of both blocks
    (256, 256, (256, 0, 1, 1)),    # a power of two: one tile
    (192, 64, (64, 0, 3, 3)),      # narrower than E: column blocks, as before
    (24, 16, (16, 0, 2, 2)),
    (24, 32, (16, 16, 1, 2)),
])
def test_up_columns_cover_e_once(E, BN, want):
    assert up_launch.up_columns(E, BN) == want


def test_bench_kernels_configs_option():
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    import bench_kernels

    assert bench_kernels.parse_configs("down=64,64,64,4,2,4|128,64,64,8,3,4; wgrad=256,128,64,8,3") == {
        "down": [(64, 64, 64, 4, 2, 4), (128, 64, 64, 8, 3, 4)], "wgrad": [(256, 128, 64, 8, 3)]}
    with pytest.raises(SystemExit, match="--configs .*VARIANT must be"):
        bench_kernels.parse_configs("down=64,64,64,4,2,4|64,64,64,4,2,7")


def test_ab_layer_arms():
    """tools/ab_layer.py's arms: configs, a tile order and SSD_* variables, each part optional; their order per
    round."""
    import os
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tools"))
    import ab_layer

    assert ab_layer.parse_arm("default=") == ("default", {}, None, {}, None)
    assert ab_layer.parse_arm("ws=mlp=128,64,64,6,4,5@token:16+SSD_TRITON_TUNE=1") == (
        "ws", {"mlp": (128, 64, 64, 6, 4, 5)}, "token:16", {"SSD_TRITON_TUNE": "1"}, None)
    # the backend's own options (ssd-bench ffn --triton-variants' syntax), beside SSD_* variables
    name, cfg, order, env, backend = ab_layer.parse_arm("unfused=+fused_forward=false+SSD_TRITON_TUNE=1")
    assert (name, cfg, order, env) == ("unfused", {}, None, {"SSD_TRITON_TUNE": "1"})
    assert backend.fused_forward is False and ab_layer._options(backend)["fused_forward"] is False
    for bad in ("=mlp=128,64,64,8,3", "tune=+SSD_TRITON_TUNE=", "tune=+=1"):
        with pytest.raises(SystemExit, match="expected NAME=CONFIGS"):
            ab_layer.parse_arm(bad)
    with pytest.raises(SystemExit, match="bad --triton-variants entry 'fused=1'"):
        ab_layer.parse_arm("x=+fused=1")
    # each round starts one arm later, so that no arm is always the one timed right after the dense layer
    arms = ["a", "b", "c"]
    assert [ab_layer.round_order(arms, r, "rotate") for r in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert ab_layer.round_order(arms, 2, "fixed") == arms


def test_bad_env_config_fails_when_the_backend_is_built(monkeypatch):
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    monkeypatch.setenv("SSD_TRITON_CONFIG", "wgrad=1,2,3")
    with pytest.raises(UserError, match="SSD_TRITON_CONFIG"):
        TritonBackend()


@pytest.mark.parametrize("var", ["SSD_WGRAD_HALF_SUMS", "SSD_WGRAD_ROUTER_SUMS", "SSD_TRITON_SCORE_GRAD",
                                 "SSD_TRITON_UP_BWD_TMA_STORES",
                                 "SSD_PLAN_FILL", "SSD_TRITON_TILE_ORDER", "SSD_TRITON_WS_DOWN_ORDER"])
def test_every_bad_switch_fails_when_the_backend_is_built(monkeypatch, var):
    """Each kernel switch's malformed value is a one-line error naming it when the backend is built (not inside a
    compiled step); well-formed values pass."""
    pytest.importorskip("triton")
    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    monkeypatch.setenv(var, "bogus")
    with pytest.raises(UserError, match=var):
        TritonBackend()
    monkeypatch.setenv(var, {"SSD_PLAN_FILL": "apart", "SSD_TRITON_TILE_ORDER": "token",
                             "SSD_TRITON_WS_DOWN_ORDER": "token:16"}.get(var, "1"))
    TritonBackend()


@pytest.mark.parametrize("group", [0, 1, 2, 4, 6])
def test_token_window_tiles_cover_every_tile_once_in_relative_position_order(group):
    """Every M-tile exactly once; expert groups one after the other (group 0: one group of all, token order);
    within a group, tiles by their relative position in their expert's rows."""
    import torch

    counts = torch.tensor([300, 0, 17, 129, 1000, 64])  # an empty expert, partial tiles
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(torch.int32)
    M, N, BM = int(counts.sum()), len(counts), 64
    tiles = tile_order.token_window_tiles(offsets, M, N, BM, group)
    assert tiles.shape == ((M + BM - 1) // BM + N, 2) and tiles.dtype == torch.int32
    real = [(int(e), int(r)) for e, r in tiles if int(r) < M]
    want = {(e, int(offsets[e]) + i * BM) for e in range(N) for i in range((int(counts[e]) + BM - 1) // BM)}
    assert len(real) == len(want) and set(real) == want               # each tile exactly once
    assert all(int(r) == M for _, r in tiles[len(real):])              # then the empty tail
    groups = [e // group if group else 0 for e, _ in real]
    pos = [((r - int(offsets[e])) // BM + 0.5) / ((int(counts[e]) + BM - 1) // BM) for e, r in real]
    assert groups == sorted(groups)                                    # one expert group after the other
    assert list(zip(groups, pos)) == sorted(zip(groups, pos))          # windows of relative position in each
    if group == 1:  # groups of one expert: expert order
        assert real == sorted(want)


def test_tile_order_from_the_environment(monkeypatch):
    monkeypatch.delenv("SSD_TRITON_TILE_ORDER", raising=False)
    assert tile_order.tile_groups() is None and tile_order.tile_groups(16) == 16  # auto: the launch's own order
    monkeypatch.setenv("SSD_TRITON_TILE_ORDER", "auto")
    assert tile_order.tile_groups(16) == 16
    monkeypatch.setenv("SSD_TRITON_TILE_ORDER", "expert")
    assert tile_order.tile_groups(16) is None  # a forced order wins over the launch's
    monkeypatch.setenv("SSD_TRITON_TILE_ORDER", "token")
    assert tile_order.tile_groups(16) == 0
    monkeypatch.setenv("SSD_TRITON_TILE_ORDER", "token:4")
    assert tile_order.tile_groups(16) == 4 and tile_order.tile_groups() == 4
    assert tile_order.ws_down_group(16) == 4  # the WS down launch follows the global order unless its own is set
    monkeypatch.setenv("SSD_TRITON_WS_DOWN_ORDER", "expert")
    assert tile_order.ws_down_group(16) is None and tile_order.tile_groups() == 4
    monkeypatch.setenv("SSD_TRITON_TILE_ORDER", "auto")
    monkeypatch.setenv("SSD_TRITON_WS_DOWN_ORDER", "auto")
    assert tile_order.ws_down_group(16) == 16 and tile_order.ws_down_group() is None  # auto: the launcher's choice
    for bad in ("windows", "token:0", "token:", "token:x", "expert:4"):
        monkeypatch.setenv("SSD_TRITON_TILE_ORDER", bad)
        with pytest.raises(UserError, match=f"SSD_TRITON_TILE_ORDER: '{bad}'; accepted: auto, expert, token, or "
                                            f"token:G with G >= 1 experts per group"):
            tile_order.tile_groups()


def test_default_combine_follows_the_gpus_atomics(monkeypatch):
    """bf16 atomic adds in place from Hopper on; before (A100), fp32 ones (bf16 would be compare-and-swap
    loops: test_offline_compile.py); fp16 and fp32 in place anywhere; the deterministic buffer when asked."""
    import torch

    x16, xb = torch.zeros(1, dtype=torch.float16), torch.zeros(1, dtype=torch.bfloat16)
    assert down_launch.default_combine(xb) == down_launch.default_combine(x16) == "atomic16"
    monkeypatch.setattr(descriptors, "hopper", lambda t: False)
    assert down_launch.default_combine(xb) == "atomic32"
    assert down_launch.default_combine(x16) == down_launch.default_combine(xb.float()) == "atomic16"
    prev = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        assert down_launch.default_combine(xb) == "buffer"
    finally:
        torch.use_deterministic_algorithms(prev)


def test_pre_hopper_defaults_differ_only_where_the_hopper_tiles_spill():
    """Before Hopper the 8B down (ROWLOOP) and GLU up defaults change to tiles that compile without spilling
    on sm_80 (docs/kernels.md v11), up_bwd keeps one pass (its two-pass defaults were timed on Hopper
    only, v14), and wgrad loads its left operand without TMA (v17); every other default is the same."""
    bf16 = "torch.bfloat16"
    keys = [(192, 768, bf16), (768, 192, bf16), (256, 4096, bf16), (512, 4096, bf16), (4096, 256, bf16),
            (384, 768, bf16)]
    two_pass = {("up_bwd", (4096, 256, bf16))} | {("up_bwd_glu", key) for key in keys}
    changed = {("down", (256, 4096, bf16)), ("down", (512, 4096, bf16)), ("up_glu", (4096, 256, bf16))} | two_pass
    for key in keys:
        for base in ("up", "up_glu", "up_bwd", "up_bwd_glu", "down", "wgrad"):
            a100, h100 = tc.default_tile(base, key, hopper=False), tc.default_tile(base, key, hopper=True)
            if base == "wgrad":  # Hopper's wgrad loads its left operand by TMA (a seventh entry of 1), same tiles
                assert h100[6:] == (1,) and h100[:5] == a100[:5] and h100[5] == (a100[5] if len(a100) > 5 else 0)
                continue
            assert (a100 != h100) == ((base, key) in changed), (base, key, a100, h100)
            assert (base.startswith("up_bwd") and h100[5:6] == (tc.TWO_PASS,)) == ((base, key) in two_pass), key
            # 8B's GLU up kinds take their weights by TMA on Hopper (docs/kernels.md v18)
            assert (h100[6:] == (1,)) == (base in ("up_glu", "up_bwd_glu") and key[0] >= 2048), (base, key, h100)
    # the 8B ROWLOOP stays ROWLOOP, with half the rows per tile or twice the warps
    assert tc.default_tile("down", (256, 4096, bf16), hopper=False)[5] == tc.ROWLOOP
    # the fused forward's tiles: base's (D, E) and 8B's on Hopper only (timed there; docs/kernels.md v17)
    base_mlp, wide_mlp = (768, 192, 768, bf16), (4096, 256, 4096, bf16)
    assert tc.default_tile("mlp", base_mlp) == (128, 64, 64, 8, 4)
    assert tc.default_tile("mlp", wide_mlp) == (128, 128, 64, 8, 3, tc.TMA)  # and 8B's weights by TMA
    pre_hopper = tc.default_tile("mlp", base_mlp, hopper=False), tc.default_tile("mlp", wide_mlp, hopper=False)
    assert pre_hopper == (tc.DEFAULTS["mlp"],) * 2


def test_auto_options_resolve_per_call():
    """fold_output="auto" folds, in training too; fused_forward="auto" fuses non-GLU activations on Hopper GPUs
    only (never on CPU tensors, the interpreter's); bad values are refused."""
    import torch

    from ssd_megatron.ffn.backends.triton_backend import TritonBackend
    be, x = TritonBackend(), torch.zeros(2, 8)
    assert be._folds_output() is True  # autograd on: training
    with torch.no_grad():
        assert be._folds_output() is True
    assert TritonBackend(fold_output=True)._folds_output() and not TritonBackend(fold_output=False)._folds_output()
    assert not be._fused(x, "relu") and TritonBackend(fused_forward=True)._fused(x, "swiglu")
    if torch.cuda.is_available():
        hopper = torch.cuda.get_device_capability()[0] >= 9
        assert be._fused(x.cuda(), "relu") == hopper and not be._fused(x.cuda(), "swiglu")
    for bad in ({"fold_output": "yes"}, {"fused_forward": 1.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TritonBackend(**bad)


def test_routing_plan_fill_place_by_expert_count_and_from_the_environment(monkeypatch):
    """SSD_PLAN_FILL: the output's initialisation in programs of the scatter launch's own up to 32 experts and in the
    count kernel beyond (docs/kernels.md v24, v25), a named place wins, and a bad value is a one-line error naming
    the accepted ones."""
    from ssd_megatron.ffn.backends.kernels.routing_plan import FILL_PLACES, fill_place
    monkeypatch.delenv("SSD_PLAN_FILL", raising=False)
    assert (fill_place(32), fill_place(64)) == ("apart", "count")
    monkeypatch.setenv("SSD_PLAN_FILL", "scatter")
    assert fill_place(32) == fill_place(64) == "scatter"
    monkeypatch.setenv("SSD_PLAN_FILL", "router")
    with pytest.raises(UserError, match="SSD_PLAN_FILL='router': accepted: " + ", ".join(FILL_PLACES)):
        fill_place(32)


def test_benchmarks_record_every_variable_that_changes_the_kernels(monkeypatch):
    """tuning_env, which `ssd-bench ffn` and `ssd-bench step` write into their JSON: the tile configs, the routing
    plan's placements and the WS wgrad's epilogue switch, not the other SSD_* variables."""
    from ssd_megatron.ffn.backends import tuning_env
    for k in [k for k in os.environ if k.startswith("SSD_")]:
        monkeypatch.delenv(k)
    for k, v in {"SSD_TRITON_CONFIG": "up=64,64,64,4,3", "SSD_PLAN_FILL": "apart", "SSD_PLAN_TILES": "0",
                 "SSD_WGRAD_TMA_OUT": "0", "SSD_MEGATRON_CACHE": "/tmp/x"}.items():
        monkeypatch.setenv(k, v)
    assert tuning_env() == {"SSD_PLAN_FILL": "apart", "SSD_PLAN_TILES": "0", "SSD_TRITON_CONFIG": "up=64,64,64,4,3",
                            "SSD_WGRAD_TMA_OUT": "0"}
