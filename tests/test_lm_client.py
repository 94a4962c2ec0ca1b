"""A real client of the head: the tiny Flax NNX language model of ``notebooks/tinylm.py``.

Trained a few steps from the same initialisation on the same ``-100``-padded batches of the
standard library's source, once with ``sj.linear_cross_entropy`` on ``(B, T, D)`` hidden states and
the tied ``(K, D)`` table, once with the unfused optax loss: the loss curves agree, the head's
token accuracy (``return_aux``) is the unfused argmax accuracy, and the head's compiled train step
holds far less.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import optax
import pytest

pytest.importorskip("flax")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "notebooks"))
import tinylm  # noqa: E402

B, T, D, K, STEPS = 8, 64, 64, 8192, 8


@pytest.fixture(scope="module")
def data():
    tok, docs = tinylm.corpus(T, vocab_size=K)
    tokens, labels = tinylm.batches(docs, steps=STEPS, batch_size=B, seq_len=T, seed=0)
    return tok, tokens, labels


@pytest.fixture(scope="module")
def runs(data):
    tok, tokens, labels = data
    model = tinylm.make_model(len(tok), d=D, max_len=T, seed=0)
    opt = optax.adam(3e-3)
    out = {
        name: tinylm.train(model, loss, opt, tokens, labels) for name, loss in tinylm.LOSSES.items()
    }
    floor = tinylm.compile_step(model, tinylm.no_head, opt, tokens[0], labels[0])[0]
    return out, floor.memory_analysis().temp_size_in_bytes


def test_tokenizer_round_trips_with_a_large_vocabulary(data):
    tok = data[0]
    assert len(tok) == K
    text = tinylm.stdlib_texts(max_bytes=1)[0][:2000] + "\n  ünïcode  \t x"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < len(text.encode()) / 2  # words are single tokens, not bytes
    assert max(ids) < K and min(ids) >= 0


def test_batches_are_padded_sequences_of_unequal_length(data):
    _, tokens, labels = data
    assert tokens.shape == labels.shape == (STEPS, B, T)
    kept = labels != tinylm.IGNORE
    lengths = kept.sum(-1)
    assert len(np.unique(lengths)) > 1 and lengths.min() < T and lengths.max() == T
    # padding only at the end; the labels are the next tokens
    assert np.array_equal(kept, np.arange(T) < lengths[..., None])
    nxt = kept[..., :-1] & kept[..., 1:]
    assert np.array_equal(labels[..., :-1][nxt], tokens[..., 1:][nxt])
    assert (tokens[~kept] == tinylm.PAD).all()


def test_loss_curves_agree(runs):
    l_head, l_ref = runs[0]["head"][0], runs[0]["unfused"][0]
    assert np.all(np.isfinite(l_head))
    np.testing.assert_allclose(l_head, l_ref, rtol=1e-3)
    assert l_ref[0] == pytest.approx(np.log(K), rel=1e-2)  # a uniform start
    assert l_ref[-1] < l_ref[0] - 1.0  # and it learns


def test_aux_accuracy_is_the_token_accuracy(data, runs):
    kept = (data[2] != tinylm.IGNORE).sum(axis=(1, 2))
    a_head, a_ref = runs[0]["head"][1], runs[0]["unfused"][1]
    # an argmax may flip on a near tie between two rounding orders: allow one token per batch
    assert np.all(np.abs(a_head - a_ref) <= 1.5 / kept), (a_head, a_ref)
    assert a_ref.max() > 0.02  # it predicts some tokens right


def test_head_train_step_holds_far_less(runs):
    out, floor = runs
    t_head, t_ref = out["head"][2], out["unfused"][2]
    assert t_ref > 2.5 * t_head, (t_ref, t_head)
    # above the model + optimizer floor: what the output layer and its loss hold
    assert t_ref - floor > 5 * (t_head - floor), (t_ref, t_head, floor)
