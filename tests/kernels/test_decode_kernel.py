"""The native decode step (sparsify_kernels.decode) against its plain-torch definition, per ISA, odd shapes."""
from __future__ import annotations

import pytest
import torch

from sparsify_kernels import decode as D


def _layers(n, d, heads, kv, hd, dff, ffn, act, bias, gen, threshold=0.0, up_relu=False, rank=5):
    def w(*shape, scale=None):
        return torch.randn(*shape, generator=gen) * (scale or shape[-1] ** -0.5)

    out = []
    for _ in range(n):
        b = (lambda m: w(m, scale=0.1)) if bias else (lambda m: None)
        L = D.LayerWeights(ln1=1 + 0.1 * w(d, scale=1), eps1=1e-5, wq=w(heads * hd, d), wk=w(kv * hd, d),
                           wv=w(kv * hd, d), wo=w(d, heads * hd), ln2=1 + 0.1 * w(d, scale=1), eps2=1e-6,
                           w_gate=w(dff, d), w_up=w(dff, d), w_down=w(d, dff) if ffn == "dense" else w(dff, d),
                           ffn=ffn, act=act, threshold=threshold, up_relu=up_relu, bq=b(heads * hd), bk=b(kv * hd),
                           bv=b(kv * hd), bo=b(d), b_gate=b(dff), b_up=b(dff), b_down=b(d))
        if ffn == "predicted":
            L.p_in, L.p_out, L.p_bias, L.p_threshold = w(rank, d), w(dff, rank), w(dff, scale=0.1), 0.0
        out.append(L)
    return out


def _tables(L, hd):
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    f = torch.outer(torch.arange(L).float(), inv)
    emb = torch.cat([f, f], -1)
    return emb.cos().contiguous(), emb.sin().contiguous()


# (d, heads, kv heads, head_dim, dff): d and head_dim off the 8/16-float vector widths, GQA, MQA, plain MHA
SHAPES = [(36, 3, 1, 12, 50), (40, 4, 2, 10, 72), (70, 5, 5, 14, 33), (64, 4, 2, 16, 128)]
FFNS = [("dense", "silu", 0.0, False), ("dense", "relu", 0.0, False), ("dense", "gelu_tanh", 0.0, True),
        ("sparse", "relu", 0.0, False), ("sparse", "relu", 0.05, False), ("sparse", "relu", 0.0, True),
        ("predicted", "relu", 0.0, False)]


# every FFN kind on each shape in turn (the attention part sees every shape several times)
CASES = [(SHAPES[i % len(SHAPES)], *f) for i, f in enumerate(FFNS)] + [(SHAPES[2], *FFNS[3]), (SHAPES[3], *FFNS[0])]


@pytest.mark.parametrize("shape,ffn,act,threshold,up_relu", CASES)
def test_decode_step_matches_the_torch_definition(isa, shape, ffn, act, threshold, up_relu):
    d, heads, kv, hd, dff = shape
    gen = torch.Generator().manual_seed(hash((shape, ffn, act)) % 1000)
    layers = _layers(2, d, heads, kv, hd, dff, ffn, act, bias=shape[0] % 20 == 0, gen=gen, threshold=threshold,
                     up_relu=up_relu)
    vocab = 37
    norm, head_w = 1 + 0.1 * torch.randn(d, generator=gen), torch.randn(vocab, d, generator=gen) * d ** -0.5
    step = D.DecodeStep(layers, norm, 1e-5, head_w, None, heads, kv, hd)
    assert step.name == isa
    L = 6
    cos, sin = _tables(L, hd)
    for B in (1, 3):
        kc, vc = torch.zeros(2, B, kv, L, hd), torch.zeros(2, B, kv, L, hd)
        kr, vr = kc.clone(), vc.clone()
        for pos in range(L):  # several context lengths, the cache filled by the steps themselves
            x = torch.randn(B, d, generator=gen)
            banned = torch.tensor([3, 5]) if pos % 2 else None
            ref_logits, ref_next = D.decode_step_reference(layers, norm, 1e-5, head_w, None, heads, kv, x.clone(),
                                                           pos, kr, vr, cos, sin, banned)
            logits = torch.empty(B, vocab)
            nxt = step(x.clone(), pos, kc, vc, cos, sin, banned, logits)
            torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(kc, kr, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(vc, vr, atol=1e-5, rtol=1e-5)
            top2 = ref_logits.topk(2, -1).values
            clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # near-ties may break either way under another sum order
            assert torch.equal(nxt[clear], ref_next[clear])
            if banned is not None:
                assert not torch.isin(nxt, banned).any()


def test_decode_step_profile_and_refusals(isa):
    gen = torch.Generator().manual_seed(0)
    d, heads, kv, hd, dff = SHAPES[0]
    layers = _layers(1, d, heads, kv, hd, dff, "sparse", "relu", False, gen)
    step = D.DecodeStep(layers, torch.ones(d), 1e-5, torch.randn(11, d, generator=gen), None, heads, kv, hd)
    assert step.max_batch == 16
    cos, sin = _tables(4, hd)
    kc = torch.zeros(1, 1, kv, 4, hd)
    step(torch.randn(1, d), 0, kc, kc.clone(), cos, sin)
    spent = step.seconds(reset=True)
    assert set(spent) == {"attention", "ffn", "head"} and all(v > 0 for v in spent.values())
    assert sum(step.seconds().values()) == 0
    with pytest.raises(ValueError, match="position 4 outside a cache of 4"):
        step(torch.randn(1, d), 4, kc, kc.clone(), cos, sin)
    big = torch.zeros(1, 17, kv, 4, hd)
    with pytest.raises(ValueError, match="batch 17 over 16"):
        step(torch.randn(17, d), 0, big, big.clone(), cos, sin)
    with pytest.raises(ValueError, match="layer 0 wq: shape"):
        bad = _layers(1, d, heads, kv, hd, dff, "dense", "silu", False, gen)
        bad[0].wq = bad[0].wq[:, :-1].contiguous()
        D.DecodeStep(bad, torch.ones(d), 1e-5, torch.randn(11, d), None, heads, kv, hd)
    with pytest.raises(ValueError, match="contiguous float32 CPU"):
        bad = _layers(1, d, heads, kv, hd, dff, "dense", "silu", False, gen)
        bad[0].wo = bad[0].wo.double()
        D.DecodeStep(bad, torch.ones(d), 1e-5, torch.randn(11, d), None, heads, kv, hd)


# TEAL (input-sparse projections): every projection, or a few, thresholded; thresholds near the median |input|
TEAL = [(SHAPES[0], {"q": 0.4, "k": 0.4, "v": 0.4, "o": 0.1, "gate": 0.4, "up": 0.4, "down": 0.05}, False),
        (SHAPES[1], {"q": 0.3, "down": 0.02}, True),
        (SHAPES[2], {"k": 0.5, "o": 0.05, "up": 0.0}, False),
        (SHAPES[3], {"v": 0.2, "gate": 0.3, "up": 0.3}, True)]


@pytest.mark.parametrize("shape,thresholds,bias", TEAL)
def test_input_sparse_projections_match_the_torch_definition(isa, shape, thresholds, bias):
    """TEAL's thresholded inputs in the native step: weights stored [in, out], zeroed inputs' rows skipped."""
    d, heads, kv, hd, dff = shape
    gen = torch.Generator().manual_seed(len(thresholds))
    layers = _layers(2, d, heads, kv, hd, dff, "dense", "silu", bias=bias, gen=gen)
    names = {"q": "wq", "k": "wk", "v": "wv", "o": "wo", "gate": "w_gate", "up": "w_up", "down": "w_down"}
    for L in layers:
        L.input_thresholds = dict(thresholds)
        for proj in thresholds:
            setattr(L, names[proj], getattr(L, names[proj]).t().contiguous())
    vocab = 29
    norm, head_w = 1 + 0.1 * torch.randn(d, generator=gen), torch.randn(vocab, d, generator=gen) * d ** -0.5
    step = D.DecodeStep(layers, norm, 1e-5, head_w, None, heads, kv, hd)
    assert step.name == isa and step.max_batch == 16
    L = 5
    cos, sin = _tables(L, hd)
    for B in (1, 3):
        kc, vc = torch.zeros(2, B, kv, L, hd), torch.zeros(2, B, kv, L, hd)
        kr, vr = kc.clone(), vc.clone()
        for pos in range(L):
            x = torch.randn(B, d, generator=gen)
            ref_logits, _ = D.decode_step_reference(layers, norm, 1e-5, head_w, None, heads, kv, x.clone(), pos, kr,
                                                    vr, cos, sin)
            logits = torch.empty(B, vocab)
            step(x.clone(), pos, kc, vc, cos, sin, None, logits)
            torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(kc, kr, atol=1e-5, rtol=1e-5)
    # the thresholds matter: the same weights without them give other logits
    plain = [D.LayerWeights(**{**L.__dict__, "input_thresholds": None,
                               **{names[p]: getattr(L, names[p]).t().contiguous() for p in thresholds}})
             for L in layers]
    x = torch.randn(1, d, generator=gen)
    kc = torch.zeros(2, 1, kv, L, hd)
    a = D.decode_step_reference(plain, norm, 1e-5, head_w, None, heads, kv, x.clone(), 0, kc.clone(), kc.clone(),
                                cos, sin)[0]
    b = D.decode_step_reference(layers, norm, 1e-5, head_w, None, heads, kv, x.clone(), 0, kc.clone(), kc.clone(),
                                cos, sin)[0]
    assert (a - b).abs().max() > 1e-3


def test_input_thresholds_are_checked(isa):
    gen = torch.Generator().manual_seed(0)
    d, heads, kv, hd, dff = SHAPES[0]
    head = torch.randn(11, d, generator=gen)
    bad = _layers(1, d, heads, kv, hd, dff, "dense", "silu", False, gen)
    bad[0].input_thresholds = {"k": 0.1}  # wk left [out, in] (q's square shape could not tell)
    with pytest.raises(ValueError, match=r"layer 0 wk: shape \(12, 36\), expected \(36, 12\)"):
        D.DecodeStep(bad, torch.ones(d), 1e-5, head, None, heads, kv, hd)
    bad[0].input_thresholds = {"qk": 0.1}
    with pytest.raises(ValueError, match="input_thresholds for \\['qk'\\]"):
        D.DecodeStep(bad, torch.ones(d), 1e-5, head, None, heads, kv, hd)
    bad[0].input_thresholds = {"o": -1.0}
    with pytest.raises(ValueError, match="input threshold of o must be a finite float >= 0"):
        D.DecodeStep(bad, torch.ones(d), 1e-5, head, None, heads, kv, hd)
    sparse = _layers(1, d, heads, kv, hd, dff, "sparse", "relu", False, gen)
    sparse[0].input_thresholds = {"gate": 0.1}
    sparse[0].w_gate = sparse[0].w_gate.t().contiguous()
    with pytest.raises(ValueError, match="input thresholds on a sparse FFN's projections"):
        D.DecodeStep(sparse, torch.ones(d), 1e-5, head, None, heads, kv, hd)


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_truncation_screen_bounds_every_row_product(scale):
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(300, 45, generator=gen) * scale
    w[3, 4] = -0.0
    hi, err = D.truncation_screen(w)
    assert hi.dtype == torch.int16 and hi.shape == w.shape and err.shape == (300,)
    hi_f = torch.stack([torch.zeros_like(hi), hi], -1).view(torch.float32).reshape(w.shape)
    assert bool(((w - hi_f).abs() <= w.abs() * 2 ** -7).all())  # truncation keeps 8 significant bits
    x = torch.randn(64, 45, generator=gen)
    gap = (x.double() @ w.double().T - x.double() @ hi_f.double().T).abs()
    assert bool((gap <= x.double().norm(dim=1, keepdim=True) * err.double()).all())
    w[5, 0] = float("inf")
    assert D.truncation_screen(w)[1][5] == float("inf")


def _head_case(gen, d, vocab, bias):
    layers = _layers(1, d, 2, 1, d // 2, 24, "dense", "silu", bias=False, gen=gen)
    norm = 1 + 0.1 * torch.randn(d, generator=gen)
    head_w = torch.randn(vocab, d, generator=gen) * d ** -0.5
    head_b = torch.randn(vocab, generator=gen) * 0.1 if bias else None
    return layers, norm, head_w, head_b


@pytest.mark.parametrize("d,vocab,bias", [(36, 517, False), (40, 9000, True), (68, 61, True)])
def test_greedy_step_with_the_head_screen_chooses_what_the_full_head_chooses(isa, d, vocab, bias):
    """No logits asked for: the screened head must give the ids of the full GEMV's argmax, bit for bit,
    with banned ids and exact ties (a duplicated best row: the lowest id wins)."""
    gen = torch.Generator().manual_seed(d + vocab)
    layers, norm, head_w, head_b = _head_case(gen, d, vocab, bias)
    screened = D.DecodeStep(layers, norm, 1e-5, head_w, head_b, 2, 1, d // 2)
    full = D.DecodeStep(layers, norm, 1e-5, head_w, head_b, 2, 1, d // 2, head_screen=False)
    assert screened.head_screen is not None and full.head_screen is None
    L = 5
    cos, sin = _tables(L, d // 2)
    for B in (1, 3):
        caches = [(torch.zeros(1, B, 1, L, d // 2), torch.zeros(1, B, 1, L, d // 2)) for _ in range(3)]
        for pos in range(L):
            x = torch.randn(B, d, generator=gen)
            banned = torch.tensor([0, vocab - 1, 7]) if pos % 2 else None
            logits = torch.empty(B, vocab)
            want = full(x.clone(), pos, *caches[0], cos, sin, banned, logits)
            assert torch.equal(want, logits.argmax(-1) if banned is None else
                               logits.index_fill(1, banned, float("-inf")).argmax(-1))
            assert torch.equal(screened(x.clone(), pos, *caches[1], cos, sin, banned), want)
            assert torch.equal(full(x.clone(), pos, *caches[2], cos, sin, banned), want)  # no screen, no logits
    # an exact tie: the best row copied to a higher id; both paths keep the lower one
    x = torch.randn(1, d, generator=gen)
    logits = torch.empty(1, vocab)
    best = int(full(x.clone(), 0, *(torch.zeros(1, 1, 1, L, d // 2) for _ in range(2)), cos, sin, None, logits))
    w2 = head_w.clone()
    w2[vocab - 2] = w2[best]
    b2 = None if head_b is None else head_b.clone()
    if b2 is not None:
        b2[vocab - 2] = b2[best]
    for hs in (True, False):
        step = D.DecodeStep(layers, norm, 1e-5, w2, b2, 2, 1, d // 2, head_screen=hs)
        got = step(x.clone(), 0, *(torch.zeros(1, 1, 1, L, d // 2) for _ in range(2)), cos, sin)
        assert int(got) == min(best, vocab - 2)


def test_the_head_screen_reads_no_fp32_row_that_cannot_win(isa):
    """fp32 head rows whose screened upper bound is clearly below the best lower bound are never read: rows
    there replaced by ones whose logit would be 1e6 (and win, if read) change nothing."""
    gen = torch.Generator().manual_seed(11)
    d, vocab = 40, 4000
    layers, norm, head_w, head_b = _head_case(gen, d, vocab, bias=True)
    L = 2
    cos, sin = _tables(L, d // 2)
    x = torch.randn(1, d, generator=gen)
    zeros = lambda: (torch.zeros(1, 1, 1, L, d // 2) for _ in range(2))  # noqa: E731
    clean = D.DecodeStep(layers, norm, 1e-5, head_w, head_b, 2, 1, d // 2)
    want = clean(x.clone(), 0, *zeros(), cos, sin)
    h = torch.empty(1, vocab)
    D.DecodeStep(layers, norm, 1e-5, head_w, head_b, 2, 1, d // 2, head_screen=False)(x.clone(), 0, *zeros(), cos,
                                                                                         sin, None, h)
    # the final hidden state, from the reference (its logits are the head applied to it)
    hidden = torch.linalg.lstsq(head_w.double(), (h[0] - head_b).double()).solution.float()
    hi, err = clean.head_screen
    hi_f = torch.stack([torch.zeros_like(hi), hi], -1).view(torch.float32).reshape(head_w.shape)
    s = (hi_f.double() @ hidden.double()) + head_b.double()
    e = hidden.double().norm() * err.double()
    low, up = s - e, s + e
    hopeless = up < low.max() - 0.05 * (low.max().abs() + 1)
    assert 0.5 < float(hopeless.double().mean()) < 1.0
    poisoned = head_w.clone()
    poisoned[hopeless] = (hidden / hidden.norm() ** 2 * 1e6).to(poisoned.dtype)
    step = D.DecodeStep(layers, norm, 1e-5, poisoned, head_b, 2, 1, d // 2)
    step.head_screen = clean.head_screen  # the screen of the clean weights, the fp32 rows poisoned
    step._keep += list(clean.head_screen)
    step._lib.sp_decoder_set_head_screen(step._handle, *(t.data_ptr() for t in clean.head_screen))
    assert torch.equal(step(x.clone(), 0, *zeros(), cos, sin), want)
    # the head changed in place (a training step, a tied embedding edited): the screen follows it
    target = int(hopeless.nonzero()[0])
    head_w[target] = (hidden / hidden.norm() ** 2 * 1e6).to(head_w.dtype)
    assert int(clean(x.clone(), 0, *zeros(), cos, sin)) == target
    full = D.DecodeStep(layers, norm, 1e-5, poisoned, head_b, 2, 1, d // 2, head_screen=False)
    assert bool(hopeless[full(x.clone(), 0, *zeros(), cos, sin)])  # read, a poisoned row wins
