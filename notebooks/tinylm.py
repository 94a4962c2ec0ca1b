"""A tiny decoder-only language model on the Python standard library's own source files.

Shared by ``notebooks/04_language_model.ipynb`` and ``tests/test_lm_client.py``: a word-piece
tokenizer written in pure Python, the data pipeline (documents → ``-100``-padded sequences of
unequal length), a small Flax NNX transformer with a tied ``(K, D)`` embedding, the two losses
(the fused ``sj.linear_cross_entropy`` head and the unfused optax loss) and a jit-compiled train
step whose compiled memory can be read before it runs.
"""

from __future__ import annotations

import collections
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import softmax_jax as sj

IGNORE = -100  # label of a padded position (the convention of PyTorch, Liger, optax users)
PAD, BOS = 0, 1  # special token ids; the 256 single bytes follow, then the word pieces
_SPECIAL = [b"<pad>", b"<bos>"]

# Pre-tokens: a word, a number or a run of punctuation with its leading space; a newline with the
# indentation after it (Python's most frequent "word"); any other run of whitespace.
_PRETOKEN = re.compile(r" ?[A-Za-z_]+| ?[0-9]+| ?[^\sA-Za-z0-9_]+|\n[ ]*|\s")


# --------------------------------------------------------------------------------------------
# Text and tokenizer.
# --------------------------------------------------------------------------------------------


def stdlib_texts(max_bytes: int | None = None) -> list[str]:
    """The source of the standard library's top-level modules (``Lib/*.py``), sorted by name.

    Stops once ``max_bytes`` of source have been read (all files when ``None``).
    """
    root = Path(os.__file__).resolve().parent
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if max_bytes is not None and total >= max_bytes:
            break
    if not texts:
        raise FileNotFoundError(f"no standard-library sources (*.py) found in {root}")
    return texts


class Tokenizer:
    """A word-piece tokenizer: 2 special tokens, the 256 bytes, then the most frequent pre-tokens.

    A pre-token (see ``_PRETOKEN``) in the vocabulary is one token; any other is split greedily
    into the longest vocabulary pieces from the left (WordPiece's encoding), bytes at worst, so
    every text round-trips exactly.
    """

    def __init__(self, pieces: list[bytes]):
        self.pieces = list(pieces)
        self.ids = {p: i for i, p in enumerate(self.pieces)}
        self.max_piece = max(len(p) for p in self.pieces)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 8192) -> Tokenizer:
        base = _SPECIAL + [bytes([b]) for b in range(256)]
        if vocab_size <= len(base):
            raise ValueError(f"`vocab_size` must be > {len(base)}, got {vocab_size}")
        counts = collections.Counter()
        for text in texts:
            counts.update(_PRETOKEN.findall(text))
        words = [w.encode() for w, _ in counts.most_common() if len(w.encode()) > 1]
        return cls(base + words[: vocab_size - len(base)])

    def __len__(self) -> int:
        return len(self.pieces)

    def _encode_word(self, word: str) -> list[int]:
        ids = self._cache.get(word)
        if ids is None:
            b, ids, i = word.encode(), [], 0
            while i < len(b):
                for j in range(min(len(b), i + self.max_piece), i, -1):
                    if b[i:j] in self.ids:
                        ids.append(self.ids[b[i:j]])
                        i = j
                        break
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        return [i for w in _PRETOKEN.findall(text) for i in self._encode_word(w)]

    def decode(self, ids: Iterable[int]) -> str:
        return b"".join(self.pieces[i] for i in ids if i >= len(_SPECIAL)).decode(errors="replace")


# --------------------------------------------------------------------------------------------
# Sequences and batches.
# --------------------------------------------------------------------------------------------


def documents(tok: Tokenizer, texts: Iterable[str], seq_len: int, min_len: int = 8) -> list:
    """Token sequences of unequal length, at most ``seq_len + 1`` tokens each.

    A document is a paragraph of source (text between blank lines), ``BOS`` first; one longer
    than ``seq_len + 1`` tokens is cut into pieces, the last one shorter. Pieces under
    ``min_len`` tokens are dropped.
    """
    out = []
    for text in texts:
        for para in re.split(r"\n[ \t]*\n", text):
            ids = [BOS] + tok.encode(para.strip("\n") + "\n")
            for s in range(0, len(ids), seq_len + 1):
                piece = ids[s : s + seq_len + 1]
                if len(piece) >= min_len:
                    out.append(np.asarray(piece, np.int32))
    return out


def batches(docs: list, *, steps: int, batch_size: int, seq_len: int, seed: int = 0):
    """``steps`` batches of next-token pairs, as arrays ``tokens, labels`` of shape ``(steps, B, T)``.

    ``labels[..., t]`` is the token after ``tokens[..., t]``; positions past the end of a document
    hold ``PAD`` in ``tokens`` and ``IGNORE`` (−100) in ``labels``. The documents are drawn
    without replacement in a seeded random order.
    """
    order = np.random.default_rng(seed).permutation(len(docs))
    need = steps * batch_size
    if need > len(order):
        raise ValueError(f"{steps} steps of {batch_size} need {need} documents, have {len(order)}")
    tokens = np.full((need, seq_len), PAD, np.int32)
    labels = np.full((need, seq_len), IGNORE, np.int32)
    for row, d in enumerate(order[:need]):
        seq = docs[d]
        tokens[row, : len(seq) - 1] = seq[:-1]
        labels[row, : len(seq) - 1] = seq[1:]
    shape = (steps, batch_size, seq_len)
    return tokens.reshape(shape), labels.reshape(shape)


def corpus(seq_len: int, *, vocab_size: int = 8192, max_bytes: int | None = None):
    """The tokenizer trained on the standard library's source, and its documents (see above)."""
    texts = stdlib_texts(max_bytes)
    tok = Tokenizer.train(texts, vocab_size)
    return tok, documents(tok, texts, seq_len)


# --------------------------------------------------------------------------------------------
# The model.
# --------------------------------------------------------------------------------------------


class Block(nnx.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP, each residual."""

    def __init__(self, d: int, heads: int, *, rngs: nnx.Rngs):
        self.ln1 = nnx.LayerNorm(d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, d, decode=False, keep_rngs=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, rngs=rngs)
        self.up = nnx.Linear(d, 4 * d, rngs=rngs)
        self.down = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class TinyLM(nnx.Module):
    """Decoder-only transformer whose output layer is its ``(K, D)`` token embedding (tied)."""

    def __init__(self, vocab: int, *, d: int, layers: int, heads: int, max_len: int, rngs):
        init = nnx.initializers.normal(0.02)
        self.embed = nnx.Embed(vocab, d, embedding_init=init, rngs=rngs)
        self.pos = nnx.Param(init(rngs.params(), (max_len, d)))
        self.blocks = nnx.List([Block(d, heads, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, rngs=rngs)

    def hidden(self, tokens: jax.Array) -> jax.Array:
        """Final hidden states ``(B, T, D)`` of tokens ``(B, T)``."""
        x = self.embed(tokens) + self.pos[: tokens.shape[-1]]
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.ln_f(x)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        """Logits ``(B, T, K)``: the hidden states against the tied embedding table."""
        return self.embed.attend(self.hidden(tokens))


# --------------------------------------------------------------------------------------------
# Losses: (hidden (B, T, D), table (K, D), labels (B, T)) -> (mean loss, token accuracy).
# --------------------------------------------------------------------------------------------


def head_loss(h: jax.Array, E: jax.Array, labels: jax.Array):
    """The fused head: mean cross-entropy over the non-ignored tokens and their accuracy."""
    loss, aux = sj.linear_cross_entropy(h, E, labels, weight_layout="kd", return_aux=True)
    return loss, aux.accuracy


def unfused_loss(h: jax.Array, E: jax.Array, labels: jax.Array):
    """The textbook loss: full ``(B, T, K)`` logits, optax's cross-entropy with ``where=``."""
    mask = labels != IGNORE
    logits = jnp.einsum("btd,kd->btk", h, E)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels, where=mask)
    count = jnp.maximum(mask.sum(), 1)
    hit = (jnp.argmax(logits, -1) == labels) & mask
    return per_token.sum() / count, jax.lax.stop_gradient(hit.sum() / count)


def no_head(h: jax.Array, E: jax.Array, labels: jax.Array):
    """No output layer at all (a loss linear in ``h`` and ``E``): what the train step holds for
    the model and the optimizer alone, the floor under both heads."""
    return h.mean() + E.mean(), jnp.zeros(())


LOSSES: dict[str, Callable] = {"head": head_loss, "unfused": unfused_loss}


# --------------------------------------------------------------------------------------------
# Training.
# --------------------------------------------------------------------------------------------


def make_model(
    vocab: int, *, d: int = 64, layers: int = 2, heads: int = 4, max_len: int = 64, seed: int = 0
) -> TinyLM:
    return TinyLM(vocab, d=d, layers=layers, heads=heads, max_len=max_len, rngs=nnx.Rngs(seed))


def compile_step(model: TinyLM, loss: Callable, opt: optax.GradientTransformation, tokens, labels):
    """The jit-compiled train step for ``loss``, on the shapes of one batch.

    Returns ``(step, params, opt_state)``: ``step(params, opt_state, tokens, labels)`` gives
    ``(params, opt_state, loss, accuracy)``, and ``step.memory_analysis()`` says what it holds.
    The model itself is not changed.
    """
    graphdef, params = nnx.split(model, nnx.Param)

    def objective(params, tokens, labels):
        m = nnx.merge(graphdef, params)
        return loss(m.hidden(tokens), m.embed.embedding[...], labels)

    def step(params, opt_state, tokens, labels):
        (value, acc), grads = jax.value_and_grad(objective, has_aux=True)(params, tokens, labels)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value, acc

    opt_state = opt.init(params)
    compiled = jax.jit(step).lower(params, opt_state, tokens, labels).compile()
    return compiled, params, opt_state


def train(model: TinyLM, loss: Callable, opt, tokens: np.ndarray, labels: np.ndarray):
    """Trains a copy of ``model`` on the batches ``tokens[s], labels[s]``.

    Returns ``(losses, accuracies, temp_bytes)``: per-step values and the compiled step's
    temporaries (``memory_analysis().temp_size_in_bytes``).
    """
    step, params, opt_state = compile_step(model, loss, opt, tokens[0], labels[0])
    losses, accs = [], []
    for x, y in zip(tokens, labels):
        params, opt_state, value, acc = step(params, opt_state, x, y)
        losses.append(float(value))
        accs.append(float(acc))
    return np.array(losses), np.array(accs), step.memory_analysis().temp_size_in_bytes
