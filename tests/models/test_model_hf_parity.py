"""Our models reproduce HF transformers' logits and hidden states after conversion (fp32, eval).

HF models are built locally from small random configs (no downloads). Both sides run in eval mode
with dropout 0, so the only differences are floating-point summation orders (tolerance 1e-4).
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

from ssd_megatron.models import from_hf  # noqa: E402

TOL = 1e-4
V = 97


def _ids(B, L, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, L), generator=g)


def _perturb_norms(hf):
    """HF inits norms to 1/0; randomise them so a swapped or missing norm would show."""
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return hf


def _capture(module):
    store = {}
    module.register_forward_hook(lambda m, a, out: store.__setitem__("out", out))
    return store


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


# --------------------------------------------------------------------------- GPT-2


def _gpt2(act="relu", tie=True, **kw):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=3, n_head=4,
                                  activation_function=act, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                  tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0, **kw)
    return _perturb_norms(transformers.GPT2LMHeadModel(cfg).eval())


@pytest.mark.parametrize("act", ["relu", "gelu_new", "gelu"])
def test_gpt2_logits_and_hidden_states(act):
    hf = _gpt2(act)
    ours = from_hf(hf)
    assert not ours.training and ours.cfg.arch == "gpt"
    ids = _ids(2, 17)
    hooked = _capture(ours.layers[1])
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        got = ours(input_ids=ids, labels=ids)  # unknown batch keys are ignored
    assert got.shape == (2, 17, V)
    d_logits = _max_diff(got, ref.logits)
    d_hidden = _max_diff(hooked["out"], ref.hidden_states[2])  # [0] = embeddings, [2] = after block 1
    print(f"gpt2[{act}] logits max|diff|={d_logits:.2e} block1 hidden max|diff|={d_hidden:.2e}")
    assert d_logits < TOL and d_hidden < TOL


def test_gpt2_untied_head():
    hf = _gpt2(tie=False)
    with torch.no_grad():
        hf.lm_head.weight.normal_(0, 0.02)
    ours = from_hf(hf)
    assert ours.lm_head.weight is not ours.tok_emb.weight
    ids = _ids(2, 9)
    with torch.no_grad():
        assert _max_diff(ours(input_ids=ids), hf(ids).logits) < TOL


def test_gpt2_tied_head_shares_parameter():
    ours = from_hf(_gpt2())
    assert ours.lm_head.weight is ours.tok_emb.weight
    assert len(ours.ffn_layers()) == 3 and len(ours.transformer_layers()) == 3


def test_gpt2_padding_mask_right_padded():
    hf = _gpt2()
    ours = from_hf(hf)
    ids = _ids(2, 12)
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask)
    # Right padding: the real positions must agree (padded queries are don't-care).
    assert _max_diff(got[0], ref[0]) < TOL and _max_diff(got[1, :8], ref[1, :8]) < TOL
