"""Tokenizer: text <-> token ids, the Llama 2 way. Chapter 01 (notebooks/01_tokenizer.ipynb) teaches it.

Two implementations of one behaviour:

    tok = Tokenizer()                          # data/tokenizer/tokenizer.model via the sentencepiece library
    tok = Tokenizer(path, impl="python")       # the same ids from BPETokenizer below, pure Python
    ids = tok.encode("Mia has a cat.", bos=True)   # [1, ...]
    tok.decode(ids)                            # "Mia has a cat."  (BOS/EOS dropped by id, never by string)

`BPETokenizer` reads a SentencePiece `.model` file itself (a small protobuf parser below, no protobuf
package needed) and reproduces SentencePiece's BPE encoding exactly, for our model and for any
Llama-2-family model (Meta's has 32000 pieces). How SentencePiece BPE encodes a text:

  1. normalize: identity (no NFKC); every " " becomes "▁" (U+2581) and one "▁" is put in front
     ("dummy prefix"), so "Hi  there" -> "▁Hi▁▁there". Extra spaces are kept (Llama 2 does not remove them).
  2. split into characters: ["▁", "H", "i", "▁", "▁", "t", ...].
  3. merge: look at every adjacent pair whose concatenation is a piece of the vocabulary; merge the pair
     whose piece has the HIGHEST score (leftmost on ties); repeat until no pair is a piece. (A BPE model's
     score is minus the merge's rank, so this replays the merges in the order they were learned.)
  4. ids: each final symbol's id; a symbol that is no piece (a character never seen in training) is
     <unk>, and with byte fallback it is written as its UTF-8 bytes instead: "😀" -> <0xF0> <0x9F> <0x98> <0x80>.

Decoding concatenates the pieces, turns "▁" back into " ", drops the dummy-prefix space once at the start,
turns runs of byte pieces back into UTF-8 (an invalid byte becomes U+FFFD) and drops control pieces
(<s>, </s>). A missing or corrupt model file raises `TokenizerError` naming the file and the fix.
"""
from __future__ import annotations

import heapq
import re
import struct
from pathlib import Path

from .errors import TokenizerError
from .inputs import read_bytes
from .paths import DEFAULT_TOKENIZER

SPACE = "\u2581"   # "▁", SentencePiece's visible space
UNK_SURFACE = " \u2047 "  # " ⁇ ", what <unk> decodes to unless the model says otherwise

# SentencePiece piece types (sentencepiece_model.proto, ModelProto.SentencePiece.Type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}


# ------------------------------------------------------------------------------------------------
# reading the .model file: a protobuf message, parsed by hand
#
# A protobuf message is a list of (field number, wire type, value). The key is a varint:
# key = field_number << 3 | wire_type; wire type 0 = varint, 1 = 8 bytes, 2 = length-delimited (bytes,
# strings, sub-messages), 5 = 4 bytes (float). The fields we need (sentencepiece_model.proto):
#   ModelProto:      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
#   SentencePiece:   1 piece (string), 2 score (float), 3 type (enum, default NORMAL)
#   TrainerSpec:     3 model_type, 4 vocab_size, 24 treat_whitespace_as_suffix, 35 byte_fallback,
#                    40 unk_id, 41 bos_id, 42 eos_id, 43 pad_id, 44 unk_surface, 46 bos_piece, 47 eos_piece
#   NormalizerSpec:  1 name, 2 precompiled_charsmap, 3 add_dummy_prefix (default true),
#                    4 remove_extra_whitespaces (default true), 5 escape_whitespaces (default true)

class _ProtoError(ValueError):
    pass


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    """Read a varint at buf[i:]; return (value, next index)."""
    value, shift = 0, 0
    while True:
        if i >= len(buf) or shift > 63:
            raise _ProtoError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes):
    """Yield (field_number, value) for each field of a message; value is int or bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i:i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = buf[i:i + 4], i + 4
        else:
            raise _ProtoError(f"unsupported wire type {wire}")
        if i > len(buf) or number == 0:
            raise _ProtoError("truncated field")
        yield number, value


def _int32(v: int) -> int:
    """A negative int32 is stored as a 64-bit two's complement varint (pad_id = -1)."""
    return v - (1 << 64) if v >= 1 << 63 else v


def parse_model_proto(data: bytes) -> dict:
    """The parts of a SentencePiece ModelProto that encoding and decoding need, as plain Python values."""
    pieces, trainer, normalizer = [], {}, {}
    for number, value in _fields(data):
        if number == 1:                                        # one SentencePiece
            piece, score, kind = None, 0.0, NORMAL
            for n, v in _fields(value):
                if n == 1:
                    piece = v.decode("utf-8")
                elif n == 2:
                    score = struct.unpack("<f", v)[0]
                elif n == 3:
                    kind = v
            if not piece:
                raise _ProtoError(f"piece {len(pieces)} is empty")
            pieces.append((piece, score, kind))
        elif number == 2:                                      # TrainerSpec
            for n, v in _fields(value):
                if n in (3, 4, 24, 35, 40, 41, 42, 43):
                    trainer[n] = _int32(v)
                elif n in (44, 45, 46, 47):
                    trainer[n] = v.decode("utf-8")
        elif number == 3:                                      # NormalizerSpec
            for n, v in _fields(value):
                normalizer[n] = v.decode("utf-8") if n == 1 else v
    if not pieces:
        raise _ProtoError("no pieces")
    return {
        "pieces": pieces,
        "model_type": MODEL_TYPES.get(trainer.get(3, 1), "unknown"),
        "byte_fallback": bool(trainer.get(35, 0)),
        "treat_whitespace_as_suffix": bool(trainer.get(24, 0)),
        "unk_surface": trainer.get(44, UNK_SURFACE),
        "bos_piece": trainer.get(46, "<s>"),
        "eos_piece": trainer.get(47, "</s>"),
        "normalizer_name": normalizer.get(1, ""),
        "precompiled_charsmap": normalizer.get(2, b""),
        "add_dummy_prefix": bool(normalizer.get(3, 1)),
        "remove_extra_whitespaces": bool(normalizer.get(4, 1)),
        "escape_whitespaces": bool(normalizer.get(5, 1)),
    }


def _key(number: int, wire: int) -> bytes:
    return _varint_bytes(number << 3 | wire)


def _varint_bytes(v: int) -> bytes:
    v &= (1 << 64) - 1                                         # a negative int32 as 64-bit two's complement
    out = bytearray()
    while True:
        out.append((v & 0x7F) | (0x80 if v > 0x7F else 0))
        v >>= 7
        if not v:
            return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _key(number, 2) + _varint_bytes(len(payload)) + payload


def proto_from_vocab(pieces, scores, types, unk_id=0, bos_id=1, eos_id=2, add_dummy_prefix=True) -> bytes:
    """A SentencePiece BPE ModelProto (the bytes of a .model file) for a vocabulary given as lists: what a GGUF file
    carries in tokenizer.ggml.tokens/scores/token_type (its types are SentencePiece's: 1 normal ... 6 byte).
    Normalization is Llama 2's: identity, dummy prefix, spaces kept; byte fallback when the 256 byte pieces are there."""
    body = bytearray()
    for piece, score, kind in zip(pieces, scores, types):
        sp = _length_delimited(1, piece.encode("utf-8")) + _key(2, 5) + struct.pack("<f", float(score))
        body += _length_delimited(1, sp + _key(3, 0) + _varint_bytes(int(kind)))
    byte_fallback = sum(1 for t in types if int(t) == BYTE) == 256
    trainer = b"".join(_key(n, 0) + _varint_bytes(v) for n, v in (
        (3, 2), (4, len(pieces)), (35, int(byte_fallback)), (40, unk_id), (41, bos_id), (42, eos_id), (43, -1)))
    normalizer = (_length_delimited(1, b"identity") + _key(3, 0) + _varint_bytes(int(add_dummy_prefix))
                  + _key(4, 0) + _varint_bytes(0) + _key(5, 0) + _varint_bytes(1))
    return bytes(body + _length_delimited(2, trainer) + _length_delimited(3, normalizer))


MODEL_FILE_MAX_BYTES = 64 * 2 ** 20      # a SentencePiece .model (Llama 2's is 0.5 MB; 256k pieces ~ 5 MB)


def _read_model_file(path) -> bytes:
    path = Path(path)
    if path.is_dir():
        raise TokenizerError(f"tokenizer model {path} is a directory; pass the path of a SentencePiece .model file "
                             f"(e.g. {path / 'tokenizer.model'})")
    if not path.exists():
        raise TokenizerError(f"tokenizer model {path} not found: pass the path of a SentencePiece .model file, "
                             f"or run `python scripts/train_tokenizer.py` to make ours")
    return read_bytes(path, "tokenizer model", TokenizerError, limit=MODEL_FILE_MAX_BYTES)   # regular, capped


def _corrupt(path, why) -> TokenizerError:
    return TokenizerError(f"tokenizer model {path} is not a valid SentencePiece .model file ({why}): "
                          f"re-download or re-train it (`python scripts/train_tokenizer.py`)")


def load_model_proto(path) -> dict:
    """Read and parse a .model file; TokenizerError if it is missing or is not a SentencePiece model."""
    return _parse_or_refuse(path, _read_model_file(path))


def _parse_or_refuse(path, data: bytes) -> dict:
    try:
        return parse_model_proto(data)
    except (_ProtoError, UnicodeDecodeError, struct.error, TypeError, ValueError, IndexError, RecursionError) as e:
        raise _corrupt(path, e) from None


# ------------------------------------------------------------------------------------------------
# the pure-Python BPE tokenizer

class BPETokenizer:
    """SentencePiece BPE encoding and decoding in plain Python, reading the same .model file."""

    def __init__(self, path=DEFAULT_TOKENIZER, data: bytes | None = None):
        self.path = Path(path)
        m = load_model_proto(self.path) if data is None else _parse_or_refuse(self.path, data)
        if m["model_type"] != "bpe":
            raise TokenizerError(f"{self.path} is a SentencePiece {m['model_type']} model; the pure-Python "
                                 f"tokenizer implements BPE (Llama 2's): use impl='sentencepiece'")
        if m["precompiled_charsmap"] or m["treat_whitespace_as_suffix"]:
            raise TokenizerError(f"{self.path} uses a normalization the pure-Python tokenizer does not implement "
                                 f"(rule {m['normalizer_name']!r}); Llama 2 uses 'identity': use impl='sentencepiece'")
        self.pieces = [p for p, _, _ in m["pieces"]]           # id -> piece string
        self.scores = [s for _, s, _ in m["pieces"]]           # id -> score (higher merges first)
        self.types = [t for _, _, t in m["pieces"]]            # id -> NORMAL, CONTROL, BYTE, ...
        self.byte_fallback = m["byte_fallback"]
        self.add_dummy_prefix = m["add_dummy_prefix"]
        self.remove_extra_whitespaces = m["remove_extra_whitespaces"]
        self.escape_whitespaces = m["escape_whitespaces"]
        self.unk_surface = m["unk_surface"]
        # Pieces BPE may produce (normal, user-defined, unused) and the reserved ones (unk, control, byte)
        # live in two tables, as in SentencePiece; a string is looked up in the reserved table first.
        self.mergeable, self.reserved = {}, {}
        for i, (piece, kind) in enumerate(zip(self.pieces, self.types)):
            table = self.mergeable if kind in (NORMAL, USER_DEFINED, UNUSED) else self.reserved
            if piece in table:
                raise _corrupt(self.path, f"piece {piece!r} appears twice")
            table[piece] = i
        unks = [i for i, t in enumerate(self.types) if t == UNKNOWN]
        if len(unks) != 1:
            raise _corrupt(self.path, "it must have exactly one <unk> piece")
        self.unk_id = unks[0]
        self.bos_id = self._control_id(m["bos_piece"])      # -1 if the model has no BOS
        self.eos_id = self._control_id(m["eos_piece"])
        self.byte_ids = {}                                     # byte value -> id of "<0xXX>"
        for i, (piece, kind) in enumerate(zip(self.pieces, self.types)):
            if kind == BYTE:
                self.byte_ids[int(piece[3:5], 16)] = i
        if self.byte_fallback and len(self.byte_ids) != 256:
            raise _corrupt(self.path, f"byte_fallback is on but it has {len(self.byte_ids)} of 256 byte pieces")
        # user-defined symbols (e.g. "<|im_start|>") are never split: matched longest first
        self.user_defined = sorted((p for p, t in zip(self.pieces, self.types) if t == USER_DEFINED),
                                   key=len, reverse=True)

    def _control_id(self, piece: str) -> int:
        i = self.piece_to_id(piece)
        return i if self.types[i] == CONTROL else -1

    @property
    def vocab_size(self) -> int:
        return len(self.pieces)

    def piece_to_id(self, piece: str) -> int:
        """Id of a piece string (reserved pieces first), <unk>'s id if it is none."""
        return self.reserved.get(piece, self.mergeable.get(piece, self.unk_id))

    # --- step 1: normalize -------------------------------------------------------------------------

    def normalize(self, text: str) -> str:
        """Identity normalization + SentencePiece's whitespace rules: " Hi" -> "▁▁Hi" for Llama 2."""
        if self.remove_extra_whitespaces:          # (not Llama 2) drop leading spaces, collapse runs
            text = re.sub(" +", " ", text.lstrip(" "))
        if not text:
            return ""
        if self.add_dummy_prefix:
            text = " " + text
        space = SPACE if self.escape_whitespaces else " "
        text = text.replace(" ", space)
        if self.remove_extra_whitespaces:          # trailing space symbols go, even ones typed as "▁"
            text = text.rstrip(space)
        return text

    # --- step 2: characters --------------------------------------------------------------------------

    def split_symbols(self, normalized: str) -> list[str]:
        """One symbol per character; a user-defined symbol stays whole."""
        symbols, i = [], 0
        while i < len(normalized):
            match = next((u for u in self.user_defined if normalized.startswith(u, i)), None)
            step = len(match) if match else 1
            symbols.append(normalized[i:i + step])
            i += step
        return symbols

    # --- step 3: merge by score ------------------------------------------------------------------------

    def bpe(self, symbols: list[str]) -> list[str]:
        """Merge adjacent symbols, best-scoring piece first (leftmost on ties), until no pair is a piece.

        A doubly linked list over `symbols`: prev[i]/next[i] point to the neighbours; a merged-away
        symbol becomes "". The heap holds candidate pairs (-score, left, right, merged string); a pair is
        stale if either side changed since it was pushed, which we see because left+right != merged.
        """
        n = len(symbols)
        if n == 0:
            return []
        sym = list(symbols)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n)) + [-1]
        frozen = [s in self.user_defined for s in sym]
        heap, unused_split = [], {}

        def push(left, right):
            if left == -1 or right == -1 or frozen[left] or frozen[right]:
                return
            merged = sym[left] + sym[right]
            i = self.mergeable.get(merged)
            if i is None:
                return
            heapq.heappush(heap, (-self.scores[i], left, right, merged))
            if self.types[i] == UNUSED:          # remember how to split it again (see resegment)
                unused_split[merged] = (sym[left], sym[right])

        for i in range(1, n):
            push(i - 1, i)
        while heap:
            _, left, right, merged = heapq.heappop(heap)
            if not sym[left] or not sym[right] or sym[left] + sym[right] != merged:
                continue                          # stale: one side was merged into something else
            sym[left], sym[right] = merged, ""
            nxt[left] = nxt[right]
            if nxt[right] != -1:
                prev[nxt[right]] = left
            push(prev[left], left)
            push(left, nxt[left])
        out, i = [], 0
        while i != -1:
            out.extend(self._resegment(sym[i], unused_split))
            i = nxt[i]
        return out

    def _resegment(self, piece: str, unused_split: dict) -> list[str]:
        """An UNUSED piece may be reached as a merge step but must not be output: split it back."""
        i = self.piece_to_id(piece)
        if i == self.unk_id or self.types[i] != UNUSED or piece not in unused_split:
            return [piece]
        left, right = unused_split[piece]
        return self._resegment(left, unused_split) + self._resegment(right, unused_split)

    # --- step 4: ids, with byte fallback -------------------------------------------------------------

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Token ids of `text`, exactly as SentencePiece's encode (+ BOS/EOS ids if asked)."""
        ids = []
        prev_unk = False
        for piece in self.bpe(self.split_symbols(self.normalize(text))):
            i = self.piece_to_id(piece)
            if i == self.unk_id and self.byte_fallback:
                ids.extend(self.byte_ids[b] for b in piece.encode("utf-8"))
            elif not (i == self.unk_id and prev_unk):     # a run of unknowns is one <unk>
                ids.append(i)
            prev_unk = i == self.unk_id
        if bos:
            ids.insert(0, self._special(self.bos_id, "BOS <s>"))
        if eos:
            ids.append(self._special(self.eos_id, "EOS </s>"))
        return ids

    def _special(self, i: int, name: str) -> int:
        if i < 0:
            raise TokenizerError(f"{self.path} has no {name} piece: encode without bos/eos")
        return i

    # --- decoding ------------------------------------------------------------------------------------

    def decode(self, ids) -> str:
        """Text of token ids: pieces joined, "▁" -> " ", bytes -> UTF-8, control pieces dropped.

        The dummy-prefix space is dropped once: from the first piece that shows text, if it starts with "▁".
        """
        out, pending = [], bytearray()          # decoded strings; byte pieces not yet turned into text
        expect_prefix, prefix_seen = True, False
        for i in ids:
            if not 0 <= i < len(self.pieces):
                raise TokenizerError(f"token id {i} is out of range: this tokenizer has ids 0..{len(self.pieces) - 1}")
            kind, piece = self.types[i], self.pieces[i]
            if kind == BYTE:
                pending.append(int(piece[3:5], 16))
                continue
            if pending:
                out.append(_decode_utf8_bytes(bytes(pending)))
                pending.clear()
            if prefix_seen or any(out):
                expect_prefix = False
            prefix_seen = False
            if kind == CONTROL:
                continue
            if kind == UNKNOWN:
                out.append(self.unk_surface)
                continue
            if expect_prefix and (self.add_dummy_prefix or self.remove_extra_whitespaces) and piece.startswith(SPACE):
                piece = piece[1:]
                prefix_seen = not self.remove_extra_whitespaces
            out.append(piece.replace(SPACE, " "))
        if pending:
            out.append(_decode_utf8_bytes(bytes(pending)))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self.pieces[i]


def hf_tokenizer_json(path=DEFAULT_TOKENIZER, data: bytes | None = None) -> dict:
    """The same tokenizer as Hugging Face's tokenizer.json (what ONNX Runtime GenAI and `tokenizers` read).

    A BPE model there is a vocabulary plus *merges* in priority order. SentencePiece has no merge list, only piece
    scores; the merges are implied: every piece that two other pieces concatenate to is a merge, ranked by the
    merged piece's score (higher first). Normalization is step 1 above as a rule list (prepend "▁", spaces to "▁");
    decoding turns "▁" back into spaces, byte pieces into bytes and drops the dummy-prefix space.
    """
    t = BPETokenizer(path, data)
    if t.remove_extra_whitespaces or not t.escape_whitespaces:
        raise TokenizerError(f"{path}: only Llama 2's whitespace rules can be written as tokenizer.json")
    merges = []
    for piece, i in t.mergeable.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in t.mergeable and b in t.mergeable:
                merges.append((-t.scores[i], t.mergeable[a], t.mergeable[b], f"{a} {b}"))
    merges.sort()
    special = [i for i, kind in enumerate(t.types) if kind in (UNKNOWN, CONTROL)]
    bos = [{"SpecialToken": {"id": t.pieces[t.bos_id], "type_id": 0}}] if t.bos_id >= 0 else []
    normalizers = ([{"type": "Prepend", "prepend": SPACE}] if t.add_dummy_prefix else []) + \
        [{"type": "Replace", "pattern": {"String": " "}, "content": SPACE}]
    decoders = [{"type": "Replace", "pattern": {"String": SPACE}, "content": " "}, {"type": "ByteFallback"},
                {"type": "Fuse"}] + ([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
                                     if t.add_dummy_prefix else [])
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": t.pieces[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in special],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": {"type": "TemplateProcessing",
                           "single": bos + [{"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": bos + [{"Sequence": {"id": "A", "type_id": 0}}] + bos
                           + [{"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": ({t.pieces[t.bos_id]: {"id": t.pieces[t.bos_id], "ids": [t.bos_id],
                                                                    "tokens": [t.pieces[t.bos_id]]}}
                                              if t.bos_id >= 0 else {})},
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": t.pieces[t.unk_id], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": t.byte_fallback,
                  "ignore_merges": False, "vocab": {p: i for i, p in enumerate(t.pieces)},
                  "merges": [m[3] for m in merges]},
    }


def _decode_utf8_bytes(data: bytes) -> str:
    """UTF-8 to text, one character at a time; each byte that starts no valid character becomes U+FFFD."""
    out, i = [], 0
    while i < len(data):
        b = data[i]
        n = 1 if b < 0x80 else 2 if 0xC2 <= b < 0xE0 else 3 if 0xE0 <= b < 0xF0 else 4 if 0xF0 <= b < 0xF5 else 0
        try:
            if n == 0:
                raise UnicodeDecodeError("utf-8", data, i, i + 1, "invalid start byte")
            out.append(data[i:i + n].decode("utf-8"))
            i += n
        except UnicodeDecodeError:
            out.append("\ufffd")
            i += 1
    return "".join(out)


# ------------------------------------------------------------------------------------------------
# the Tokenizer the package uses: either implementation behind one interface

def check_unicode(text: str, what="the text") -> str:
    """Refuse text that is not valid Unicode (lone surrogates: what Python makes of invalid UTF-8 bytes on a command
    line, or of a broken \\ud800 escape in JSON), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(f"{what} is not valid Unicode: character {e.start} is {text[e.start]!r}, a lone surrogate "
                             "(invalid UTF-8 bytes?); pass UTF-8 text") from None
    return text


class Tokenizer:
    """`encode(text, bos, eos) -> ids`, `decode(ids) -> text`, backed by sentencepiece or by BPETokenizer."""

    def __init__(self, path=DEFAULT_TOKENIZER, impl: str = "sentencepiece", data: bytes | None = None):
        """path: a SentencePiece .model; or data: the bytes of one (e.g. proto_from_vocab of a GGUF's vocabulary),
        with path only naming it in messages."""
        self.path = Path(path) if path is not None else DEFAULT_TOKENIZER
        self.impl = impl
        if impl == "python":
            try:
                self._bpe = BPETokenizer(self.path, data)
            except (ValueError, KeyError, IndexError, struct.error, UnicodeDecodeError, RecursionError) as e:
                raise _corrupt(self.path, e) from None
            self.vocab_size = self._bpe.vocab_size
            self.bos_id, self.eos_id, self.unk_id = self._bpe.bos_id, self._bpe.eos_id, self._bpe.unk_id
        elif impl == "sentencepiece":
            self._sp = _load_sentencepiece(self.path, data)
            self.vocab_size = self._sp.vocab_size()
            self.bos_id, self.eos_id, self.unk_id = self._sp.bos_id(), self._sp.eos_id(), self._sp.unk_id()
        else:
            raise TokenizerError(f"impl must be 'sentencepiece' or 'python', got {impl!r}")

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TokenizerError(f"encode takes a str, got {type(text).__name__}")
        check_unicode(text)
        if self.impl == "python":
            return self._bpe.encode(text, bos, eos)
        if (bos and self.bos_id < 0) or (eos and self.eos_id < 0):
            raise TokenizerError(f"{self.path} has no BOS/EOS piece: encode without bos/eos")
        return ([self.bos_id] if bos else []) + self._sp.encode(text) + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Text of `ids`. BOS, EOS and other control ids decode to nothing (by id, not by string)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise TokenizerError(f"token id {bad[0]} is out of range: this tokenizer has ids 0..{self.vocab_size - 1}")
        return self._bpe.decode(ids) if self.impl == "python" else self._sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        if not 0 <= int(i) < self.vocab_size:
            raise TokenizerError(f"token id {i} is out of range: this tokenizer has ids 0..{self.vocab_size - 1}")
        return self._bpe.id_to_piece(int(i)) if self.impl == "python" else self._sp.id_to_piece(int(i))

    def pieces(self, ids) -> list[str]:
        return [self.id_to_piece(i) for i in ids]

    def __repr__(self):
        return f"Tokenizer({str(self.path)!r}, impl={self.impl!r}, vocab_size={self.vocab_size})"


def _load_sentencepiece(path: Path, data: bytes | None = None):
    """A SentencePieceProcessor for `path` (or for `data`, the bytes of a .model), with our error messages for a
    missing or corrupt file."""
    data = _read_model_file(path) if data is None else data
    try:
        parse_model_proto(data)       # the library's own error for garbage is an opaque RuntimeError
    except (_ProtoError, UnicodeDecodeError, struct.error, TypeError, ValueError, IndexError, RecursionError) as e:
        raise _corrupt(path, e) from None
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    try:
        sp.load_from_serialized_proto(data)
    except (RuntimeError, OSError) as e:
        raise _corrupt(path, str(e).strip().splitlines()[-1] if str(e).strip() else "sentencepiece refused it") from None
    return sp
