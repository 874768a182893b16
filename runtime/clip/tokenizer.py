"""CLIP's byte-level BPE tokenizer without torch: ids identical to OpenAI's / open_clip's ``tokenize``.

Pipeline of one text (as OpenAI's ``SimpleTokenizer``): ``ftfy.fix_text``, HTML unescape twice, strip,
collapse whitespace runs to one space, lowercase; split with the pattern below (the special tokens, English
contractions, letter runs, single digits, runs of other non-space characters); map each piece's UTF-8 bytes
to printable characters (``bytes_to_unicode``), mark its last symbol with ``</w>`` and merge symbol pairs in
the order of the merge list. Vocabulary: 256 byte symbols, the same with ``</w>``, one symbol per merge
(48,894), then ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407): 49,408 ids.

``__call__`` frames each text as ``[<start_of_text>, ..., <end_of_text>]`` zero-padded to the context
length; a longer text is cut to the context length with its last id replaced by ``<end_of_text>``.
"""

from __future__ import annotations

import functools
import gzip
import html
import os
from pathlib import Path

import ftfy
import numpy as np
import regex

from ..errors import InputError

DEFAULT_VOCAB = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
_NUM_MERGES = 49152 - 256 - 2  # the vocabulary size CLIP was trained with, less bytes and specials
# Pieces: special tokens (matched literally, also inside user text), contractions, letter runs, one digit,
# runs of anything that is neither space, letter nor digit. IGNORECASE as in OpenAI's pattern.
_PATTERN = regex.compile(
    rf"{SOT_TOKEN}|{EOT_TOKEN}|'s|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}]+",
    regex.IGNORECASE,
)


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable characters (no whitespace or controls).

    Printable Latin-1 bytes map to themselves; the other 68 bytes map to code points 256, 257, ... in
    byte order, so BPE never sees whitespace or control characters. The dict's order (printable bytes
    first, then the others) is the order of the first 256 vocabulary entries.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def clean_text(text: str) -> str:
    """The normalization CLIP applies before splitting (see the module docstring)."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Byte-level BPE of OpenAI's CLIP.

    Args:
        vocab_path: the gzipped merge list (``bpe_simple_vocab_16e6.txt.gz``); default: the copy shipped in
            ``edgefm/runtime/clip/assets``.
        context_length: default row length of :meth:`__call__` (77 for every OpenAI/OpenCLIP model).
    """

    def __init__(self, vocab_path: str | os.PathLike[str] | None = None, context_length: int = 77) -> None:
        merges = _read_merges(Path(vocab_path) if vocab_path is not None else DEFAULT_VOCAB)
        symbols = list(bytes_to_unicode().values())
        words = [s + "</w>" for s in symbols]
        vocab = [*symbols, *words, *("".join(m) for m in merges), SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = dict(enumerate(vocab))
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self.vocab_size = len(vocab)
        self.context_length = context_length
        # Per-instance cache: words repeat a lot (prompt templates, class names) and BPE is the slow part.
        self._bpe = functools.lru_cache(maxsize=1 << 16)(self._bpe_uncached)

    def _bpe_uncached(self, piece: str) -> tuple[str, ...]:
        """Merge the symbols of one byte-mapped piece, lowest merge rank first, until no pair is listed."""
        if piece in (SOT_TOKEN, EOT_TOKEN):
            return (piece,)
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            pairs = list(zip(word[:-1], word[1:], strict=True))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, _NUM_MERGES))
            if best not in self.ranks:
                break
            merged: list[str] = []
            i = 0
            while i < len(word):  # every non-overlapping occurrence, left to right
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        return tuple(word)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``<start_of_text>`` / ``<end_of_text>`` framing."""
        ids: list[int] = []
        for piece in _PATTERN.findall(clean_text(text)):
            mapped = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self._bpe(mapped))
        return ids

    def decode(self, ids: list[int] | np.ndarray, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; word ends become spaces. With ``skip_special_tokens`` the framing and the zero
        padding after ``<end_of_text>`` are dropped, so a row of :meth:`__call__` decodes to its text."""
        ids = [int(i) for i in np.asarray(ids).reshape(-1)]
        if skip_special_tokens:
            if self.eot_token_id in ids:
                ids = ids[: ids.index(self.eot_token_id)]
            ids = [i for i in ids if i != self.sot_token_id]
        unknown = [i for i in ids if i not in self.decoder]
        if unknown:
            raise InputError(
                f"Token ids {unknown[:5]} are outside the CLIP vocabulary (0..{self.vocab_size - 1})."
            )
        symbols = "".join(self.decoder[i] for i in ids)
        raw = bytes(self.byte_decoder[c] for c in symbols)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | list[str], context_length: int | None = None,
                 truncate: bool = True) -> np.ndarray:
        """``int64 [N, context_length]`` rows ``<start_of_text> ids <end_of_text> 0 ...`` for N texts.

        A text longer than the row is cut and its last id set to ``<end_of_text>`` (as open_clip does);
        with ``truncate=False`` it raises :class:`InputError` instead.
        """
        if isinstance(texts, str):
            texts = [texts]
        length = self.context_length if context_length is None else context_length
        if length < 2:
            raise InputError(
                f"context_length={length} cannot hold <start_of_text> and <end_of_text>; use 77."
            )
        out = np.zeros((len(texts), length), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise InputError(f"Text {row} is a {type(text).__name__}, not a str: pass a list of strings.")
            ids = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(ids) > length:
                if not truncate:
                    raise InputError(
                        f"Text {row} ({text[:40]!r}...) is {len(ids)} tokens long with its start and end "
                        f"tokens, more than context_length={length}. Shorten it or pass truncate=True."
                    )
                ids = ids[:length]
                ids[-1] = self.eot_token_id
            out[row, : len(ids)] = ids
        return out


def _read_merges(path: Path) -> list[tuple[str, str]]:
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise InputError(
            f"CLIP vocabulary '{path}' could not be read ({type(exc).__name__}: {exc}). Pass vocab_path=None "
            "for the copy shipped with edgefm, or the bpe_simple_vocab_16e6.txt.gz of OpenAI's CLIP."
        ) from exc
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # line 0 is a version header
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
        raise InputError(
            f"CLIP vocabulary '{path}' does not hold {_NUM_MERGES} merge pairs after its header line; it is "
            "not CLIP's bpe_simple_vocab_16e6.txt.gz (or it is damaged). Pass vocab_path=None."
        )
    return merges
