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


# --------------------------------------------------------------------------- BERT


def _bert(act="relu"):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                                  intermediate_size=64, hidden_act=act, max_position_embeddings=40,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, pad_token_id=0)
    hf = _perturb_norms(transformers.BertForMaskedLM(cfg).eval())
    with torch.no_grad():
        hf.bert.embeddings.token_type_embeddings.weight.normal_(0, 0.02)
    return hf


@pytest.mark.parametrize("act", ["relu", "gelu"])
def test_bert_logits_and_hidden_states_with_padding(act):
    hf = _bert(act)
    ours = from_hf(hf)
    assert ours.cfg.norm_position == "post" and ours.lm_head.weight is ours.tok_emb.weight
    ids = _ids(3, 19, seed=1)
    mask = torch.ones(3, 19, dtype=torch.long)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    hooked = _capture(ours.layers[1])
    for m in (None, mask):
        with torch.no_grad():
            ref = hf(ids, attention_mask=m, output_hidden_states=True)
            got = ours(input_ids=ids, attention_mask=m, labels=ids)
        d_logits, d_hidden = _max_diff(got, ref.logits), _max_diff(hooked["out"], ref.hidden_states[2])
        print(f"bert[{act}, mask={m is not None}] logits {d_logits:.2e} block1 hidden {d_hidden:.2e}")
        assert d_logits < TOL and d_hidden < TOL
    # The mask must matter (otherwise the masked comparison proves nothing).
    with torch.no_grad():
        assert _max_diff(ours(input_ids=ids, attention_mask=mask)[1], ours(input_ids=ids)[1]) > 1e-3


def test_bert_token_type_ids():
    hf = _bert()
    ours = from_hf(hf)
    ids = _ids(2, 10)
    tt = torch.zeros_like(ids)
    tt[:, 5:] = 1
    with torch.no_grad():
        assert _max_diff(ours(input_ids=ids, token_type_ids=tt), hf(ids, token_type_ids=tt).logits) < TOL


# --------------------------------------------------------------------------- T5


def _t5(ff="relu", tie=None, n_dec=4):
    torch.manual_seed(0)
    kw = {} if tie is None else {"tie_word_embeddings": tie}
    cfg = transformers.T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=n_dec,
                                num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                dropout_rate=0.0, feed_forward_proj=ff, decoder_start_token_id=0, **kw)
    return _perturb_norms(transformers.T5ForConditionalGeneration(cfg).eval())


@pytest.mark.parametrize("ff", ["relu", "gated-silu"])
def test_t5_logits_and_hidden_states_with_padding(ff):
    hf = _t5(ff)
    ours = from_hf(hf)
    assert len(ours.ffn_layers()) == 7 and len(ours.transformer_layers()) == 7
    # Long enough (30 > max_distance 20) that the log-spaced and clipped buckets are exercised.
    ids, dec = _ids(2, 30, seed=2), _ids(2, 23, seed=3)
    mask = torch.ones(2, 30, dtype=torch.long)
    mask[1, 21:] = 0
    enc_hook, dec_hook = _capture(ours.encoder.layers[1]), _capture(ours.decoder.layers[1])
    for m in (None, mask):
        with torch.no_grad():
            ref = hf(input_ids=ids, decoder_input_ids=dec, attention_mask=m, output_hidden_states=True)
            got = ours(input_ids=ids, decoder_input_ids=dec, attention_mask=m, labels=dec)
        d = _max_diff(got, ref.logits)
        de = _max_diff(enc_hook["out"], ref.encoder_hidden_states[2])
        dd = _max_diff(dec_hook["out"], ref.decoder_hidden_states[2])
        print(f"t5[{ff}, mask={m is not None}] logits {d:.2e} enc block1 {de:.2e} dec block1 {dd:.2e}")
        assert d < TOL and de < TOL and dd < TOL


def test_t5_untied_unscaled_head():
    hf = _t5(tie=False)  # T5 v1.1 style: no d_model^-0.5 rescale
    ours = from_hf(hf)
    ids, dec = _ids(2, 12), _ids(2, 7)
    with torch.no_grad():
        assert _max_diff(ours(input_ids=ids, decoder_input_ids=dec), hf(input_ids=ids, decoder_input_ids=dec).logits) < TOL


# --------------------------------------------------------------------------- Llama / Persimmon


@pytest.mark.parametrize("kv_heads,tie", [(2, False), (4, True)])
def test_llama_logits_gqa(kv_heads, tie):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=64,
                                   tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    hf = _perturb_norms(transformers.LlamaForCausalLM(cfg).eval())
    ours = from_hf(hf)
    assert ours.cfg.n_kv_heads == (0 if kv_heads == 4 else kv_heads) and ours.cfg.activation == "swiglu"
    ids = _ids(2, 21)
    hooked = _capture(ours.layers[1])
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        got = ours(input_ids=ids)
    d, dh = _max_diff(got, ref.logits), _max_diff(hooked["out"], ref.hidden_states[2])
    print(f"llama[kv={kv_heads}] logits {d:.2e} block1 {dh:.2e}")
    assert d < TOL and dh < TOL


def test_persimmon_style_logits():
    torch.manual_seed(0)
    cfg = transformers.PersimmonConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, max_position_embeddings=64, qk_layernorm=True,
                                       rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                                        "partial_rotary_factor": 1.0})
    hf = _perturb_norms(transformers.PersimmonForCausalLM(cfg).eval())
    ours = from_hf(hf)
    c = ours.cfg
    assert (c.activation, c.norm, c.qk_norm, c.bias) == ("squared_relu", "layernorm", True, True)
    ids = _ids(2, 15)
    with torch.no_grad():
        d = _max_diff(ours(input_ids=ids), hf(ids).logits)
    print(f"persimmon logits {d:.2e}")
    assert d < TOL
