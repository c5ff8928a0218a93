"""Streaming text and sampling: the incremental detokenizer and the local samplers.

The detokenizer must give, piece by piece, exactly `processor.decode(all ids)` on PaliGemma's
awkward tokens (byte pieces of multi-byte characters, <loc>/<seg> codes, leading spaces,
control and out-of-vocabulary ids); the samplers must draw what mlx-lm's draw on the same seed.
"""

from __future__ import annotations

import random

import mlx.core as mx
import pytest

import mlx_paligemma as mp
from mlx_paligemma.engine import Detokenizer as _Detokenizer
from mlx_paligemma.sampling import make_repetition_penalty, make_sampler


@pytest.fixture(scope="module")
def processor(pg1_dir):
    return mp.load(pg1_dir)[1]


def streamed(processor, ids: list[int]) -> list[str]:
    detok = _Detokenizer(processor)
    pieces = [detok.add(i) for i in ids]
    pieces.append(detok.flush())
    return pieces


TEXTS = ["héllo wörld ☃ 😀 a  b", " leading space", "\n\ntwo lines\n", "détecte 猫 et 🐕🐕"]


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_joins_to_the_full_decode(processor, text):
    ids = processor.tokenizer.encode(text)
    pieces = streamed(processor, ids)
    assert "".join(pieces) == processor.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces), "a partial character leaked out"


def test_random_id_sequences_stream_exactly(processor):
    """Byte pieces in any order (invalid UTF-8 included), <loc>/<seg> codes, control ids, ids past the vocab."""
    sp = processor.tokenizer.sp
    n = sp.get_piece_size()
    bytes_ = [i for i in range(n) if sp.is_byte(i)]
    codes = [i for i in range(n) if sp.id_to_piece(i).startswith(("<loc", "<seg"))]
    rng = random.Random(0)
    for _ in range(60):
        ids = [
            rng.choice([rng.randrange(n), rng.choice(bytes_), rng.choice(codes), 0, 1, 2, n + 5])
            for _ in range(rng.randrange(1, 40))
        ]
        assert "".join(streamed(processor, ids)) == processor.decode(ids), ids


def test_tokenizer_json_checkpoints_stream_exactly_too(pg1_dir, processor):
    """mlx-community conversions ship tokenizer.json only: the `tokenizers` decoder, same rule."""
    from types import SimpleNamespace

    from mlx_paligemma.processor import JsonTokenizer

    tok = JsonTokenizer(pg1_dir)
    json_processor = SimpleNamespace(decode=tok.decode, tokenizer=tok)
    rng = random.Random(1)
    n = processor.tokenizer.vocab_size
    for text in TEXTS:
        ids = tok.encode(text)
        assert "".join(streamed(json_processor, ids)) == tok.decode(ids) == text
    for _ in range(40):
        ids = [rng.randrange(n) for _ in range(rng.randrange(1, 30))]
        assert "".join(streamed(json_processor, ids)) == tok.decode(ids), ids


def test_detection_answer_streams_as_codes(processor):
    sp = processor.tokenizer.sp
    ids = [sp.piece_to_id(p) for p in ["<loc0012>", "<loc0100>", "<loc0500>", "<loc1023>"]]
    ids += processor.tokenizer.encode(" cat ; ") + [sp.piece_to_id("<seg003>")]
    pieces = streamed(processor, ids)
    assert "".join(pieces) == processor.decode(ids)
    assert pieces[0] == "<loc0012>"  # one code per token, as soon as it arrives


def test_decoding_work_per_token_does_not_grow_with_the_answer(processor):
    """The old detokenizer re-decoded every id at every step (quadratic)."""
    decoded = []
    detok = _Detokenizer(processor)
    detok.decode = lambda ids: decoded.append(len(ids)) or processor.decode(ids)
    for i in processor.tokenizer.encode("a cat " * 200):
        detok.add(i)
    assert max(decoded) <= 4


@pytest.mark.parametrize("options", [dict(top_p=0.9), dict(top_k=5), dict(top_p=0.5, top_k=20), dict()])
def test_samplers_draw_what_mlx_lm_draws(options):
    from mlx_lm.sample_utils import make_sampler as mlx_lm_sampler

    logits = mx.random.normal((3, 300), key=mx.random.key(1)) * 3
    theirs_sampler = mlx_lm_sampler(temp=0.7, top_p=options.get("top_p", 0.0), top_k=options.get("top_k", 0))
    ours_sampler = make_sampler(0.7, options.get("top_p", 1.0), options.get("top_k", 0))
    mx.random.seed(5)
    theirs = [theirs_sampler(logits).tolist() for _ in range(20)]
    mx.random.seed(5)
    ours = [ours_sampler(logits).tolist() for _ in range(20)]
    assert ours == theirs
    assert len({tuple(t) for t in ours}) > 1, "the draws vary, or nothing is tested"


def test_greedy_and_repetition_penalty_match_mlx_lm():
    from mlx_lm.sample_utils import make_logits_processors

    logits = mx.random.normal((1, 50), key=mx.random.key(2))
    tokens = mx.array([3, 7, 7, 40, 12], mx.int32)
    (theirs,) = make_logits_processors(repetition_penalty=1.7)
    assert mx.array_equal(make_repetition_penalty(1.7)(tokens, mx.array(logits)), theirs(tokens, mx.array(logits)))
    assert mx.array_equal(make_sampler(0.0)(logits), mx.argmax(logits, axis=-1))
