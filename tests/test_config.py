"""Config loading: every user mistake is a one-line UserError naming the key and what is accepted."""
import pytest

from ssd_megatron.config import default_config_path, dump_config, load_config
from ssd_megatron.errors import UserError


def _err(*overrides, path=None):
    with pytest.raises(UserError) as ei:
        load_config(path or default_config_path(), list(overrides))
    msg = str(ei.value)
    assert "\n" not in msg, msg
    return msg


def test_default_config_loads_and_overrides_apply():
    cfg = load_config(None, ["method=dense", "train.max_steps=7", "optim.lr=3e-4"])
    assert cfg.name == "gpt_tiny" and cfg.method == "dense"
    assert cfg.train.max_steps == 7 and cfg.optim.lr == pytest.approx(3e-4)
    assert "max_steps: 7" in dump_config(cfg)


def test_unknown_key_did_you_mean():
    msg = _err("train.max_stpes=3")
    assert "train.max_stpes" in msg and "did you mean 'max_steps'" in msg


def test_unknown_section_did_you_mean():
    msg = _err("trian.max_steps=3")
    assert "trian" in msg and "did you mean 'train'" in msg


def test_wrong_type():
    msg = _err("train.max_steps=abc")
    assert "train.max_steps" in msg and "integer" in msg


def test_out_of_range():
    msg = _err("optim.beta1=1.5")
    assert "optim.beta1" in msg and "range" in msg


def test_bad_choice_lists_accepted():
    msg = _err("optim.schedule=cosin")
    assert "optim.schedule" in msg and "cosine" in msg and "noam" in msg


def test_missing_file(tmp_path):
    msg = _err(path=tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "not found" in msg


def test_bad_override_syntax():
    msg = _err("train.max_steps")
    assert "train.max_steps" in msg and "key=value" in msg


def test_invalid_yaml(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train: [1, 2\n")
    msg = _err(path=p)
    assert "bad.yaml" in msg


def test_cross_field_validation():
    msg = _err("train.global_batch_size=10", "train.micro_batch_size=4")
    assert "train.global_batch_size" in msg
