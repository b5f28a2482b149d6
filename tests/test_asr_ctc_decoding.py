"""Joint CTC/attention decoding (mm.asr.decode.CTCPrefixState, greedy_decode(ctc_weight=...), joint_beam_search):
the prefix scores against brute force and against F.ctc_loss, and the searches on a tiny random model."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from mm.asr import decode
from mm.asr.model import ModelDimensions, Whisper

DIMS = ModelDimensions(n_mels=8, n_audio_ctx=50, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_vocab=200,
                       n_text_ctx=32, n_text_state=32, n_text_head=2, n_text_layer=1)
EOT = 150  # text tokens 0..149; the CTC head's blank is index 150, as the recipe builds it (ctc_vocab=eot)


def random_log_probs(batch, frames, classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, frames, classes, generator=g) * 2).log_softmax(-1)


def grow(state, labels, eot):
    """Extend a one-row state by `labels` one at a time; returns each prefix's score, then the whole's."""
    scores = []
    for label in list(labels) + [eot]:
        cand = torch.tensor([[label]])
        s, r_n, r_b = state.extend(cand, eot)
        scores.append(float(s[0, 0]))
        if label != eot:
            state.advance(cand, torch.tensor([0]), s, r_n, r_b)
    return scores


def collapse(path, blank):
    out = [k for k, _ in itertools.groupby(path)]
    return [k for k in out if k != blank]


def test_prefix_scores_equal_brute_force_over_all_paths():
    frames, blank = 5, 2  # labels 0, 1
    lp = random_log_probs(1, frames, 3, seed=4)
    p = lp[0].exp()
    starts_with = {}
    for path in itertools.product(range(3), repeat=frames):
        out = tuple(collapse(path, blank))
        prob = math.prod(float(p[t, k]) for t, k in enumerate(path))
        for n in range(len(out) + 1):
            starts_with[out[:n]] = starts_with.get(out[:n], 0.0) + prob
    for prefix in [(0,), (1,), (0, 0), (0, 1), (1, 0, 1)]:
        state = decode.CTCPrefixState.start(lp)
        got = grow(state, prefix, eot=blank)[len(prefix) - 1]
        assert got == pytest.approx(math.log(starts_with[prefix]), abs=1e-5), prefix
    assert decode.CTCPrefixState.start(lp).score.item() == 0.0  # every output begins with the empty prefix
    # eot scores the prefix as the whole output: P(output == prefix), the empty output (all blank) included
    exactly = {}
    for path in itertools.product(range(3), repeat=frames):
        out = tuple(collapse(path, blank))
        exactly[out] = exactly.get(out, 0.0) + math.prod(float(p[t, k]) for t, k in enumerate(path))
    for prefix in [(), (0,), (1, 0), (0, 0, 1)]:
        got = grow(decode.CTCPrefixState.start(lp), prefix, eot=blank)[-1]
        assert got == pytest.approx(math.log(exactly[prefix]), abs=1e-5), prefix


def test_whole_sequence_score_equals_ctc_loss_with_padded_frames():
    frames, labels = 9, 4
    lp = random_log_probs(2, frames, labels + 1, seed=1)
    mask = torch.tensor([[True] * 9, [True] * 6 + [False] * 3])
    targets = [[1, 1, 2], [3, 0]]
    identity_head = type("M", (), {"ctc_head": lambda self, x: x})()  # the frames' logits are lp themselves
    masked = decode.ctc_frame_log_probs(identity_head, lp, mask)
    for row, target in enumerate(targets):
        length = int(mask[row].sum())
        want = -F.ctc_loss(lp[row, :length, None], torch.tensor([target]),
                           torch.tensor([length]), torch.tensor([len(target)]), blank=labels, reduction="sum")
        state = decode.CTCPrefixState.start(masked[row:row + 1])
        assert grow(state, target, eot=labels)[-1] == pytest.approx(float(want), abs=1e-4)
    assert torch.equal(masked[1, 6:].argmax(-1), torch.full((3,), labels))  # padded frames: blank, probability 1


@pytest.fixture(scope="module")
def model():
    g = torch.Generator().manual_seed(0)
    m = Whisper(DIMS, ctc=True, ctc_vocab=EOT)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m.eval()


def encoded(model, batch=3, frames=60, seed=3):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(batch, DIMS.n_mels, frames, generator=g)
    with torch.no_grad():
        return model.embed_audio(mel, torch.tensor([60, 41, 23][:batch]))


SUPPRESS = list(range(EOT + 1, DIMS.n_vocab))
PROMPTS = torch.tensor([[160, 170, 171], [160, 172, 171], [160, 173, 171]])


def test_joint_greedy_rows_decode_as_alone_and_weight_zero_is_plain_greedy(model, monkeypatch):
    xa, mask = encoded(model)
    plain = decode.greedy_decode(model, xa, mask, PROMPTS, EOT, 10, SUPPRESS)
    assert decode.greedy_decode(model, xa, mask, PROMPTS, EOT, 10, SUPPRESS, ctc_weight=0.0) == plain
    joint = decode.greedy_decode(model, xa, mask, PROMPTS, EOT, 10, SUPPRESS, ctc_weight=0.5)
    assert joint != plain  # random weights: the CTC term changes some choice
    # eot made likelier, so that rows finish at different steps and leave the batch (and the CTC state) midway
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda *a, **k: logits(*a, **k) + 8.0 * (torch.arange(DIMS.n_vocab) == EOT))
    joint = decode.greedy_decode(model, xa, mask, PROMPTS, EOT, 20, SUPPRESS, ctc_weight=0.5)
    alone = [decode.greedy_decode(model, xa[i:i + 1], mask[i:i + 1], PROMPTS[i:i + 1], EOT, 20, SUPPRESS,
                                  ctc_weight=0.5)[0] for i in range(3)]
    assert joint == alone
    assert len({len(r) for r in joint}) > 1, joint  # rows left the batch at different steps


def test_joint_greedy_stops_a_row_when_its_audio_has_no_frames_left(model):
    """The CTC cannot emit more labels than frames: a runaway decoder on a 2-frame clip is stopped by eot, which
    is always a candidate, instead of losing the CTC's guidance and running to max_new_tokens."""
    xa, _ = encoded(model, batch=2)
    mask = torch.zeros(2, xa.shape[1], dtype=torch.bool)
    mask[0, :2], mask[1, :] = True, True
    plain = decode.greedy_decode(model, xa, mask, PROMPTS[:2], EOT, 12, SUPPRESS)
    joint = decode.greedy_decode(model, xa, mask, PROMPTS[:2], EOT, 12, SUPPRESS, ctc_weight=0.5)
    assert len(plain[0]) == 12  # the decoder alone runs to the cap
    assert 1 <= len(joint[0]) <= 2, joint


def test_joint_greedy_follows_the_ctc_when_it_dominates(model):
    xa, mask = encoded(model, batch=2)
    with torch.no_grad():  # a CTC head that hears "7 7" everywhere: 7 then blank, frame after frame
        head = model.ctc_head
        saved = head.weight.clone(), head.bias.clone()
        head.weight.zero_()
        head.bias.fill_(-20.0)
        head.bias[7], head.bias[EOT] = 0.0, 0.0
        try:
            out = decode.greedy_decode(model, xa, mask, PROMPTS[:2], EOT, 6, SUPPRESS, ctc_weight=0.99,
                                       ctc_candidates=EOT + 1)
        finally:
            head.weight.copy_(saved[0]), head.bias.copy_(saved[1])
    assert all(row and row[0] == 7 and set(row) == {7} for row in out), out


def test_joint_greedy_refuses_without_a_head_or_with_specials_allowed(model):
    xa, mask = encoded(model, batch=1)
    with pytest.raises(ValueError, match="CTC head"):
        decode.greedy_decode(Whisper(DIMS).eval(), xa, mask, PROMPTS[:1], EOT, 4, SUPPRESS, ctc_weight=0.5)
    with pytest.raises(ValueError, match="suppress the other specials"):
        decode.greedy_decode(model, xa, mask, PROMPTS[:1], EOT, 4, (), ctc_weight=0.5, ctc_candidates=DIMS.n_vocab)
    # more candidates than allowed tokens: the suppressed ones come last, at -inf, and are not an error
    assert decode.greedy_decode(model, xa, mask, PROMPTS[:1], EOT, 4, SUPPRESS, ctc_weight=0.5,
                                ctc_candidates=DIMS.n_vocab)
    with pytest.raises(ValueError, match="fewer than the 150 text tokens"):
        small = Whisper(DIMS, ctc=True, ctc_vocab=100).eval()
        decode.greedy_decode(small, xa, mask, PROMPTS[:1], EOT, 4, SUPPRESS, ctc_weight=0.5)


# ---------------------------------------------------------------- joint beam search

def eot_likelier(model, monkeypatch, bias=4.0):
    """Make eot likelier, so that hypotheses end at different steps (a random model seldom says it)."""
    logits = model.logits
    monkeypatch.setattr(model, "logits", lambda *a, **k: logits(*a, **k) + bias * (torch.arange(DIMS.n_vocab) == EOT))


@torch.no_grad()
def joint_score(model, xa, mask, prompt, tokens, ended, ctc_weight, bonus):
    """The score joint_beam_search gives a hypothesis, from scratch: (1 - w) x the decoder's log probabilities of
    its tokens (and eot if it ended), teacher-forced with the specials suppressed, + w x its CTC score (-ctc_loss
    if it ended, else its prefix score) + bonus x its length."""
    seq = torch.tensor([prompt + tokens])
    logits = model.logits(seq, xa, mask)[0, len(prompt) - 1:].float()
    logits[:, SUPPRESS] = float("-inf")
    log_probs = logits.log_softmax(-1)
    targets = tokens + [EOT] if ended else tokens
    decoder = sum(float(log_probs[i, t]) for i, t in enumerate(targets))
    state = decode.CTCPrefixState.start(decode.ctc_frame_log_probs(model, xa, mask))
    ctc = grow(state, tokens, EOT)[-1 if ended else -2] if tokens or ended else 0.0
    return (1 - ctc_weight) * decoder + ctc_weight * ctc + bonus * len(tokens)


def test_joint_beam_of_one_without_bonus_is_joint_greedy(model, monkeypatch):
    xa, mask = encoded(model)
    eot_likelier(model, monkeypatch)
    greedy = decode.greedy_decode(model, xa, mask, PROMPTS, EOT, 12, SUPPRESS, ctc_weight=0.5, ctc_candidates=8)
    beam, _ = decode.joint_beam_search(model, xa, mask, PROMPTS, EOT, 12, SUPPRESS, ctc_weight=0.5, beam_size=1,
                                       ctc_candidates=8, length_bonus=0.0)
    assert beam == greedy and len({len(r) for r in beam}) > 1, beam


@pytest.mark.parametrize("bonus", [0.0, 1.5])
def test_joint_beam_scores_are_the_hypotheses_joint_scores_and_windows_decode_as_alone(model, monkeypatch, bonus):
    xa, _ = encoded(model)
    mask = torch.zeros(3, xa.shape[1], dtype=torch.bool)  # 3, 7 and 30 frames: the CTC ends the first two early
    mask[0, :3], mask[1, :7], mask[2, :] = True, True, True
    rows, logits = [], model.logits
    monkeypatch.setattr(model, "logits", lambda tokens, *a, **k: rows.append(len(tokens)) or logits(tokens, *a, **k))
    tokens, scores = decode.joint_beam_search(model, xa, mask, PROMPTS, EOT, 12, SUPPRESS, beam_size=4,
                                              length_bonus=bonus)
    assert rows[0] == 12 and 8 in rows and 4 in rows, rows  # 3 windows x 4 beams, leaving one by one
    assert len(tokens[0]) <= 3 and len(tokens[1]) <= 7 and len(tokens[2]) == 12, tokens  # the last one is cut
    for i in range(3):
        row = slice(i, i + 1)
        ended = len(tokens[i]) < 12  # a hypothesis cut at max_new_tokens is scored as a prefix
        want = joint_score(model, xa[row], mask[row], PROMPTS[i].tolist(), tokens[i], ended, 0.5, bonus)
        assert scores[i] == pytest.approx(want, abs=1e-3), i
        alone, alone_scores = decode.joint_beam_search(model, xa[row], mask[row], PROMPTS[row], EOT, 12, SUPPRESS,
                                                       beam_size=4, length_bonus=bonus)
        assert alone == [tokens[i]] and alone_scores[0] == pytest.approx(scores[i], abs=1e-4)
    greedy, greedy_scores = decode.joint_beam_search(model, xa, mask, PROMPTS, EOT, 12, SUPPRESS, beam_size=1,
                                                     length_bonus=bonus)
    assert all(b >= g - 1e-4 for b, g in zip(scores, greedy_scores))  # the beams found at least greedy's
    assert scores != pytest.approx(greedy_scores)  # and better somewhere


def test_joint_beam_length_bonus_lengthens_the_hypotheses(model, monkeypatch):
    xa, mask = encoded(model)
    eot_likelier(model, monkeypatch, bias=6.0)
    short, _ = decode.joint_beam_search(model, xa, mask, PROMPTS, EOT, 12, SUPPRESS, beam_size=4, length_bonus=0.0)
    long, _ = decode.joint_beam_search(model, xa, mask, PROMPTS, EOT, 12, SUPPRESS, beam_size=4, length_bonus=5.0)
    assert sum(map(len, long)) > sum(map(len, short)), (short, long)


def test_joint_beam_refuses_bad_settings(model):
    xa, mask = encoded(model, batch=1)
    for kwargs, match in [({"ctc_weight": 0.0}, "ctc_weight"), ({"ctc_weight": 1.0}, "ctc_weight"),
                          ({"beam_size": 0}, "beam_size")]:
        with pytest.raises(ValueError, match=match):
            decode.joint_beam_search(model, xa, mask, PROMPTS[:1], EOT, 4, SUPPRESS, **kwargs)
    with pytest.raises(ValueError, match="CTC head"):
        decode.joint_beam_search(Whisper(DIMS).eval(), xa, mask, PROMPTS[:1], EOT, 4, SUPPRESS)
    with pytest.raises(ValueError, match="suppress the other specials"):
        decode.joint_beam_search(model, xa, mask, PROMPTS[:1], EOT, 4, (), ctc_candidates=DIMS.n_vocab)
