"""Tokenizers: an HF checkpoint's tokenizer, or a small SentencePiece model trained here.

One small interface (``Tokenizer``) over two very different libraries, so the rest of
megatron-sz never branches on which one it has:

* ``load_tokenizer(path)`` takes an HF checkpoint folder (``transformers.AutoTokenizer``,
  local files only, never a download), a SentencePiece ``.model`` file, or a folder
  written by ``Tokenizer.save`` for a SentencePiece model (``tokenizer.model`` +
  ``megatron_sz_tokenizer.json`` with the special ids).
* ``train_sentencepiece(texts, out_dir)`` trains a byte-level-BPE-like SentencePiece model
  for tiny CPU models, with no downloads. What is unusual about it:

  - **digits are always single tokens** (``split_digits``; all ten digits are required
    characters). A tiny model cannot learn arithmetic when "128" and "12" are unrelated
    pieces; Llama and Qwen-style tokenizers split digits for the same reason;
  - **byte fallback**: any text round-trips (``decode(encode(s)) == s``), including
    characters never seen in training; the text is not normalised (no NFKC, no space
    folding), so ``\\boxed{...}`` answers, indentation and newlines survive;
  - deterministic: one thread, no sentence sampling; the same texts give a
    byte-identical model (tested);
  - fixed special ids: pad 0, unk 1, bos 2, eos 3.

``Tokenizer.save(dir)`` of a SentencePiece model also writes an equivalent HF fast
tokenizer (``tokenizer.json`` + ``tokenizer_config.json`` with a chat template), so
``transformers.AutoTokenizer.from_pretrained(dir)`` loads the same tokenizer; exported
tiny HF checkpoints are then self-contained and servable by vLLM. Identical ids on random
text are tested; ``hf_equivalent(dir, texts)`` checks a folder.

``encode`` never adds special tokens unless asked (``bos=True`` / ``eos=True``); callers
decide where sequences begin and end.
"""
from __future__ import annotations

import io
import json
import os
import string
from pathlib import Path
from typing import Iterable

from megatron_sz.errors import UserError

SP_META = "megatron_sz_tokenizer.json"
SP_MODEL = "tokenizer.model"

# Special ids of SentencePiece models trained here.
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<s>", "</s>"

# A minimal chat format for tokenizers without a chat template (tiny models).
# Qwen-like turn markers written as plain text, so any tokenizer can encode them.
_FALLBACK_ROLE_PREFIX = "<|{role}|>\n"
_FALLBACK_TURN_END = "\n"


def _fallback_chat(messages: list[dict], add_generation_prompt: bool) -> str:
    parts = []
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"chat message {m!r} needs 'role' and 'content'",
                            fix="pass a list of {'role': ..., 'content': ...} dicts")
        parts.append(_FALLBACK_ROLE_PREFIX.format(role=m["role"]) + str(m["content"]) + _FALLBACK_TURN_END)
    if add_generation_prompt:
        parts.append(_FALLBACK_ROLE_PREFIX.format(role="assistant"))
    return "".join(parts)


class Tokenizer:
    """Common interface. ``vocab_size`` is the true (unpadded) vocabulary size."""

    kind: str = "base"
    vocab_size: int
    eos_id: int
    pad_id: int
    bos_id: int | None

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: Iterable[str], *, bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def format_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        """Render chat messages to a prompt string (the model's template if it has one)."""
        return _fallback_chat(messages, add_generation_prompt)

    def save(self, out_dir: str | os.PathLike) -> None:
        raise NotImplementedError

    def _wrap(self, ids: list[int], bos: bool, eos: bool) -> list[int]:
        if bos:
            if self.bos_id is None:
                raise UserError("this tokenizer has no BOS token", fix="call encode(..., bos=False)")
            ids = [self.bos_id] + ids
        if eos:
            ids = ids + [self.eos_id]
        return ids

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_id={self.eos_id}, pad_id={self.pad_id})")


# --------------------------------------------------------------------------- SentencePiece


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (``.model`` protobuf bytes) with explicit special ids."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, *, source: str | None = None, meta: dict | None = None):
        import sentencepiece as spm

        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.source = source
        meta = dict(meta or {})
        n = self._sp.get_piece_size()
        self.vocab_size = n

        def _pick(key: str, sp_value: int) -> int | None:
            v = meta.get(key, sp_value)
            return None if v is None or v < 0 else int(v)

        self.bos_id = _pick("bos_id", self._sp.bos_id())
        eos = _pick("eos_id", self._sp.eos_id())
        if eos is None:
            raise UserError(f"SentencePiece model {source or ''} defines no EOS token",
                            fix=f"write {SP_META} beside it with an 'eos_id'")
        self.eos_id = eos
        pad = _pick("pad_id", self._sp.pad_id())
        self.pad_id = eos if pad is None else pad
        for key in ("bos_id", "eos_id", "pad_id"):
            v = getattr(self, key)
            if v is not None and not (0 <= v < n):
                raise UserError(f"{key}={v} is outside the vocabulary (size {n})", where=source,
                                fix=f"correct {SP_META}")
        self.chat_template: str | None = meta.get("chat_template")

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(list(self._sp.encode(text)), bos, eos)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            # unk is kept: dropping it would silently lose text.
            special = {i for i in (self.pad_id, self.eos_id, self.bos_id) if i is not None}
            ids = [i for i in ids if i not in special]
        return self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    def save(self, out_dir: str | os.PathLike, *, hf_files: bool = True) -> None:
        """Write ``tokenizer.model`` + ``megatron_sz_tokenizer.json`` (+ HF config files)."""
        from megatron_sz.data import atomic_write_json

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / (SP_MODEL + ".tmp")
        tmp.write_bytes(self._proto)
        os.replace(tmp, out / SP_MODEL)
        atomic_write_json(out / SP_META, {
            "kind": "sentencepiece", "model": SP_MODEL, "vocab_size": self.vocab_size,
            "bos_id": self.bos_id, "eos_id": self.eos_id, "pad_id": self.pad_id,
            "chat_template": self.chat_template,
        })
        if hf_files:
            write_hf_tokenizer_files(self, out)


def _piece_or_none(tok: SentencePieceTokenizer, i: int | None) -> str | None:
    return None if i is None else tok.id_to_piece(i)


def _hf_tokenizer_json(tok: SentencePieceTokenizer) -> str:
    """A ``tokenizers`` BPE model that encodes exactly like the SentencePiece BPE model.

    SentencePiece BPE merges pieces by score; HF BPE applies merges by rank. Listing, for
    every normal piece in id order, each way of splitting it into two normal pieces gives
    merges whose ranks follow the same order. Normalisation is SentencePiece's: a dummy
    "▁" prefix and spaces replaced by "▁" (no pre-tokenizer: user-defined symbols such as
    "\n" are plain vocabulary entries that no merge touches, as in SentencePiece).
    Equivalence on random text is tested (tests/test_tokenizer.py).
    """
    from sentencepiece import sentencepiece_model_pb2
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as HFCoreTokenizer

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tok._proto)
    if proto.trainer_spec.model_type != sentencepiece_model_pb2.TrainerSpec.BPE:
        raise UserError("only SentencePiece BPE models can be exported as an HF tokenizer",
                        fix="train with model_type=bpe (train_sentencepiece does)")
    normal = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    kinds = {p.piece: p.type for p in proto.pieces}
    merges = []
    for piece, i in vocab.items():
        if kinds[piece] != normal or len(piece) < 2:
            continue
        splits = sorted((vocab[piece[:k]], vocab[piece[k:]], piece[:k], piece[k:])
                        for k in range(1, len(piece))
                        if kinds.get(piece[:k]) == normal and kinds.get(piece[k:]) == normal)
        merges.extend((i, ia, ib, a, b) for ia, ib, a, b in splits)
    merges.sort()
    unk = proto.pieces[proto.trainer_spec.unk_id].piece
    core = HFCoreTokenizer(models.BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges],
                                      unk_token=unk, fuse_unk=True, byte_fallback=True))
    core.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    control = (sentencepiece_model_pb2.ModelProto.SentencePiece.CONTROL,
               sentencepiece_model_pb2.ModelProto.SentencePiece.UNKNOWN)
    core.add_special_tokens([AddedToken(p.piece, normalized=False, special=True)
                             for p in proto.pieces if p.type in control])
    return core.to_str()


# Same format as _fallback_chat, for HF's apply_chat_template.
_FALLBACK_CHAT_JINJA = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def write_hf_tokenizer_files(tok: SentencePieceTokenizer, out_dir: str | os.PathLike) -> None:
    """Make a folder holding a SentencePiece model loadable by ``AutoTokenizer`` as well.

    Writes ``tokenizer.json`` (an equivalent fast tokenizer), ``tokenizer_config.json``
    and ``special_tokens_map.json``. HF encodes like ``encode()`` here (no BOS/EOS added)
    except that HF also parses special-token strings ("</s>") written in the text.
    """
    from megatron_sz.data import atomic_write_json, atomic_write_text

    out = Path(out_dir)
    specials = {
        "bos_token": _piece_or_none(tok, tok.bos_id),
        "eos_token": _piece_or_none(tok, tok.eos_id),
        "pad_token": _piece_or_none(tok, tok.pad_id),
        "unk_token": UNK,
    }
    specials = {k: v for k, v in specials.items() if v is not None}
    atomic_write_text(out / "tokenizer.json", _hf_tokenizer_json(tok))
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20,
        "chat_template": tok.chat_template or _FALLBACK_CHAT_JINJA,
        **specials,
    })
    atomic_write_json(out / "special_tokens_map.json", specials)


#: Smallest vocab_size ``train_sentencepiece`` accepts with the default user symbol ("\n"):
#: 94 printable ASCII characters + the whitespace piece + 4 specials + 256 byte pieces + 1.
MIN_TRAINED_VOCAB = 94 + 1 + 4 + 256 + 1


def train_sentencepiece(texts: Iterable[str], out_dir: str | os.PathLike | None, *,
                        vocab_size: int = 512, seed: int = 0,
                        user_symbols: Iterable[str] = ("\n",)) -> SentencePieceTokenizer:
    """Train a SentencePiece BPE tokenizer from local text; save it to ``out_dir`` if given.

    ``vocab_size`` is a target: with little text the model may end up smaller (the
    trainer does not fail), and it is never below 256 byte pieces + 4 specials + the
    required characters. ``seed`` is recorded; BPE training with one thread and no
    sampling is deterministic on its own (SentencePiece 0.2 has no seed option).
    """
    import sentencepiece as spm

    sentences = [t for t in texts if isinstance(t, str) and t.strip()]
    if not sentences:
        raise UserError("no text to train the tokenizer on", fix="pass a non-empty iterable of strings")
    # SentencePiece trains on "sentences" of at most max_sentence_length bytes; split long
    # texts on lines so nothing is silently skipped.
    chunks: list[str] = []
    for t in sentences:
        if len(t.encode("utf-8")) <= 4096:
            chunks.append(t)
        else:
            chunks.extend(line for line in t.split("\n") if line.strip())
    required = string.digits + string.ascii_letters + string.punctuation
    user_symbols = list(user_symbols)
    # sentencepiece's own minimum: every required character plus the whitespace piece, the
    # 4 specials, 256 byte pieces and the user symbols must fit (it says "Vocabulary size is
    # smaller than required_chars" otherwise; other characters of the text add to it).
    minimum = MIN_TRAINED_VOCAB - 1 + len(user_symbols)
    if vocab_size < minimum:
        raise UserError(f"vocab_size={vocab_size} is too small for a byte-fallback tokenizer with "
                        f"{len(set(required))} required characters", where="tokenizer.vocab_size",
                        fix=f"use vocab_size >= {minimum}")
    # Every required character must occur in the training text: sentencepiece 0.2.2's BPE
    # trainer aborts the whole process (bpe_model_trainer.cc:45 "Check failed: freq > 0")
    # on a required character of frequency 0. One extra sentence holding them all makes
    # the input valid for every 0.2.x release (0.2.0-0.2.3 checked).
    chunks.append(" ".join(required))
    options = dict(
        vocab_size=vocab_size, model_type="bpe",
        split_digits=True, byte_fallback=True,
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        pad_piece=PAD, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=user_symbols,
        required_chars=required, character_coverage=1.0,
        hard_vocab_limit=False, num_threads=1, shuffle_input_sentence=False,
        max_sentence_length=8192, minloglevel=2,
    )
    model_bytes = _train_in_child(chunks, options)
    tok = SentencePieceTokenizer(model_bytes, source="<trained>",
                                 meta={"bos_id": BOS_ID, "eos_id": EOS_ID, "pad_id": PAD_ID})
    tok.train_seed = seed
    if out_dir is not None:
        tok.save(out_dir)
        tok.source = str(Path(out_dir) / SP_MODEL)
    return tok



def _train_in_child(chunks: list[str], options: dict) -> bytes:
    """Run SentencePiece training in a forked child and return the model bytes.

    SentencePiece reports some bad inputs with a C++ ``CHECK`` that aborts the whole
    process (a core dump, not an exception). Training in a child turns any such abort
    into a ``UserError`` here, naming the installed version; the parent loses nothing."""
    import sentencepiece as spm

    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: train, write "ok"/"error" + payload, exit without cleanup
        os.close(read_fd)
        import faulthandler

        faulthandler.disable()  # an abort in here is reported by the parent, not dumped on stderr
        code = 0
        try:
            model = io.BytesIO()
            spm.SentencePieceTrainer.train(sentence_iterator=iter(chunks), model_writer=model, **options)
            payload = b"K" + model.getvalue()
        except BaseException as exc:  # noqa: BLE001 - reported to the parent
            payload = b"E" + f"{type(exc).__name__}: {exc}".encode("utf-8", "replace")
            code = 1
        try:
            with os.fdopen(write_fd, "wb") as fh:
                fh.write(payload)
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as fh:
        payload = fh.read()
    _, status = os.waitpid(pid, 0)
    if payload.startswith(b"K") and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return payload[1:]
    version = getattr(spm, "__version__", "?")
    if payload.startswith(b"E"):
        msg = payload[1:].decode("utf-8", "replace").strip().splitlines()[-1][:300]
        raise UserError(f"SentencePiece training failed: {msg}",
                        fix="raise tokenizer.vocab_size (every distinct character of the text needs a piece), "
                            "or check the training text")
    how = (f"was killed by signal {os.WTERMSIG(status)}" if os.WIFSIGNALED(status)
           else f"exited with code {os.WEXITSTATUS(status)}")
    raise UserError(f"SentencePiece {version} training aborted (the trainer process {how})",
                    fix="install sentencepiece>=0.2.3 (pip install 'sentencepiece>=0.2.3,<0.3'), "
                        "or pass an existing tokenizer")

# --------------------------------------------------------------------------- Hugging Face


class HFTokenizer(Tokenizer):
    """``transformers.AutoTokenizer`` from a local folder."""

    kind = "hf"

    def __init__(self, hf_tokenizer, *, source: str | None = None):
        self.hf = hf_tokenizer
        self.source = source
        self.vocab_size = len(hf_tokenizer)
        eos = hf_tokenizer.eos_token_id
        if eos is None:
            raise UserError(f"tokenizer in {source} defines no eos_token",
                            fix="set 'eos_token' in its tokenizer_config.json")
        self.eos_id = int(eos)
        pad = hf_tokenizer.pad_token_id
        self.pad_id = self.eos_id if pad is None else int(pad)
        bos = hf_tokenizer.bos_token_id
        self.bos_id = None if bos is None else int(bos)

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
        return self._wrap(list(self.hf.encode(text, add_special_tokens=False)), bos, eos)

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def format_chat(self, messages: list[dict], *, add_generation_prompt: bool = True) -> str:
        if getattr(self.hf, "chat_template", None):
            return self.hf.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=add_generation_prompt)
        return _fallback_chat(messages, add_generation_prompt)

    def save(self, out_dir: str | os.PathLike) -> None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(str(out_dir))


def _load_hf(folder: Path) -> HFTokenizer:
    import transformers

    try:
        hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # transformers raises many types; report one clear line
        raise UserError(f"cannot load an HF tokenizer from {folder}: {type(exc).__name__}: {exc}",
                        where=str(folder),
                        fix="point to a folder with tokenizer.json / tokenizer_config.json, "
                            "or a SentencePiece .model file") from None
    return HFTokenizer(hf, source=str(folder))


def _load_sp(model_file: Path, meta: dict | None) -> SentencePieceTokenizer:
    try:
        proto = model_file.read_bytes()
        return SentencePieceTokenizer(proto, source=str(model_file), meta=meta)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"not a SentencePiece model: {exc}", where=str(model_file),
                        fix="pass a .model file written by sentencepiece") from None


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer from an HF folder, a SentencePiece ``.model``, or a saved folder.

    A folder with ``megatron_sz_tokenizer.json`` (written by ``save``) loads the
    SentencePiece model directly, even if HF files are beside it: both encode alike, and
    SentencePiece is the source of truth.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise UserError(f"tokenizer path not found: {p}",
                        fix="pass an HF checkpoint folder or a SentencePiece .model file")
    if p.is_file():
        if p.name == SP_META:
            p = p.parent
        else:
            meta = None
            side = p.parent / SP_META
            if side.is_file():
                meta = json.loads(side.read_text(encoding="utf-8"))
            return _load_sp(p, meta)
    meta_file = p / SP_META
    if meta_file.is_file():
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise UserError(f"invalid JSON: {exc}", where=f"{meta_file}:{exc.lineno}") from None
        return _load_sp(p / meta.get("model", SP_MODEL), meta)
    hf_markers = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
    if any((p / m).is_file() for m in hf_markers):
        return _load_hf(p)
    if (p / SP_MODEL).is_file():
        return _load_sp(p / SP_MODEL, None)
    raise UserError(f"no tokenizer files in {p}",
                    fix="expected tokenizer.json/tokenizer_config.json (HF) or tokenizer.model (SentencePiece)")


def hf_equivalent(folder: str | os.PathLike, texts: Iterable[str]) -> bool:
    """True when ``AutoTokenizer`` on ``folder`` encodes ``texts`` exactly like ``load_tokenizer``."""
    ours = load_tokenizer(folder)
    theirs = _load_hf(Path(folder))
    return all(ours.encode(t) == theirs.encode(t) for t in texts)
