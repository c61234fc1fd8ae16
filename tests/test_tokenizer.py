"""Tokenizers: SentencePiece training (deterministic, digit-split, byte fallback),
save/load, HF equivalence of the exported tokenizer, and loader errors."""
import random
import string

import pytest

from megatron_sz.errors import UserError
from megatron_sz.tokenizer import (SP_META, HFTokenizer, SentencePieceTokenizer, load_tokenizer,
                                   train_sentencepiece)

WORDS = ["the", "answer", "is", "compute", "sum", "of", "find", "value", "let", "then", "so",
         "\\boxed{", "}", "$", "x^2", "+", "-", "=", "\\frac{", "solution", "problem", "integer"]


def _corpus(rng: random.Random, n: int = 300) -> list[str]:
    out = []
    for _ in range(n):
        parts = []
        for _ in range(rng.randint(5, 25)):
            r = rng.random()
            if r < 0.25:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 6))))
            elif r < 0.3:
                parts.append("\n")
            else:
                parts.append(rng.choice(WORDS))
        out.append(" ".join(parts))
    return out


def _random_text(rng: random.Random) -> str:
    alphabet = list(string.printable) + ["é", "中", "𝑥", "√", "  ", "\n\n"] + WORDS
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    rng = random.Random(1234)
    out = tmp_path_factory.mktemp("tok")
    return train_sentencepiece(_corpus(rng), out, vocab_size=512), out


def test_training_is_deterministic(tmp_path, rng_seed):
    corpus = _corpus(random.Random(rng_seed), n=120)
    a = train_sentencepiece(corpus, tmp_path / "a", vocab_size=400)
    b = train_sentencepiece(corpus, tmp_path / "b", vocab_size=400)
    assert (tmp_path / "a" / "tokenizer.model").read_bytes() == (tmp_path / "b" / "tokenizer.model").read_bytes()
    assert a.vocab_size == b.vocab_size <= 400


def test_special_ids_and_vocab(trained):
    tok, _ = trained
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    assert 300 <= tok.vocab_size <= 512
    ids = tok.encode("find x", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.decode(ids) == "find x"  # specials skipped
    assert tok.encode("find x") == ids[1:-1]


def test_digits_are_single_tokens(trained, rng_seed):
    tok, _ = trained
    rng = random.Random(rng_seed)
    # No vocabulary piece holds two digits, or a digit next to anything else.
    for i in range(tok.vocab_size):
        piece = tok.id_to_piece(i)
        if any(c.isdigit() for c in piece):
            assert len(piece.lstrip("\u2581")) == 1 or piece.startswith("<0x"), piece
    for _ in range(50):
        number = str(rng.randint(0, 10 ** 12))
        word = rng.choice(["find", "sum", "is", "then"])
        pieces = [tok.id_to_piece(i) for i in tok.encode(f"{word} {number}.")]
        digits = [p for p in pieces if any(c.isdigit() for c in p)]
        assert digits == list(number), pieces


def test_roundtrip_any_text(trained, rng_seed):
    tok, _ = trained
    rng = random.Random(rng_seed)
    for _ in range(300):
        s = _random_text(rng)
        ids = tok.encode(s)
        assert all(0 <= i < tok.vocab_size for i in ids)
        assert tok.decode(ids) == s, repr(s)


def test_save_and_load(trained, tmp_path, rng_seed):
    tok, out = trained
    rng = random.Random(rng_seed)
    texts = [_random_text(rng) for _ in range(50)]
    for path in (out, out / "tokenizer.model", out / SP_META):
        loaded = load_tokenizer(path)
        assert isinstance(loaded, SentencePieceTokenizer)
        assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id, loaded.bos_id) == \
            (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id)
        assert [loaded.encode(t) for t in texts] == [tok.encode(t) for t in texts]
    loaded.save(tmp_path / "again")
    assert load_tokenizer(tmp_path / "again").encode(texts[0]) == tok.encode(texts[0])


def test_exported_hf_tokenizer_matches(trained, tmp_path, rng_seed):
    """The saved folder is loadable by AutoTokenizer and encodes exactly the same."""
    import shutil

    from transformers import AutoTokenizer

    tok, out = trained
    hf_dir = tmp_path / "hf"
    shutil.copytree(out, hf_dir)
    (hf_dir / SP_META).unlink()  # now only HF files (+ tokenizer.model) remain
    loaded = load_tokenizer(hf_dir)
    assert isinstance(loaded, HFTokenizer)
    assert (loaded.vocab_size, loaded.eos_id, loaded.pad_id, loaded.bos_id) == \
        (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id)
    hf = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    rng = random.Random(rng_seed)
    corpus = _corpus(rng, n=50)
    for s in [_random_text(rng) for _ in range(400)] + corpus + [" lead", "a\n\nb", "\n x", "   ", ""]:
        ids = tok.encode(s)
        assert hf.encode(s, add_special_tokens=False) == ids, repr(s)
        assert hf.decode(ids) == s, repr(s)
        assert loaded.encode(s) == ids
    msgs = [{"role": "user", "content": "What is 2+2?"}]
    assert loaded.format_chat(msgs) == tok.format_chat(msgs)
    assert hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.format_chat(msgs)


def test_loader_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(UserError, match="no tokenizer files"):
        load_tokenizer(tmp_path)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="SentencePiece"):
        load_tokenizer(bad)
    with pytest.raises(UserError, match="no text"):
        train_sentencepiece(["", "  "], None)
    with pytest.raises(UserError, match="too small"):
        train_sentencepiece(["abc"], None, vocab_size=100)


def test_training_on_text_missing_required_chars_works():
    """sentencepiece 0.2.2 aborted the process on required characters of frequency 0
    (bpe_model_trainer.cc:45); the trainer's input now always holds every one of them."""
    tok = train_sentencepiece(["1 2 3", "4 5 6 7 8 9 0"], None, vocab_size=400)
    assert tok.decode(tok.encode("Zebra {x}? ~")) == "Zebra {x}? ~"


def test_trainer_abort_becomes_a_user_error(monkeypatch):
    """Whatever sentencepiece does inside (a C++ CHECK aborting), the caller gets a
    UserError and keeps running: training happens in a forked child."""
    import os

    import sentencepiece as spm

    monkeypatch.setattr(spm.SentencePieceTrainer, "train", staticmethod(lambda **kw: os.abort()))
    with pytest.raises(UserError, match="aborted.*signal 6"):
        train_sentencepiece(["some text here"], None, vocab_size=400)
    with pytest.raises(UserError, match=r"vocab_size >= 356"):
        train_sentencepiece(["some text here"], None, vocab_size=355)
