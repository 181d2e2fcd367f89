"""CLIP byte-level BPE tokenizer (pure Python + numpy).

Reproduces the token ids of the original CLIP text tokenizer: 49408 tokens (256 byte symbols,
256 end-of-word byte symbols, 48894 merges, <start_of_text> = 49406, <end_of_text> = 49407),
context length 77, padding with id 0. The merge table `bpe_simple_vocab_16e6.txt.gz` ships
next to this module (MIT licence, see LICENSE_clip_bpe.txt).

Pipeline for one caption:
  clean   : text repair (ftfy when importable, else a small built-in subset), HTML unescape
            (twice), whitespace collapse, lowercase;
  split   : the CLIP pre-tokenisation pattern (contractions, letter runs, single digits,
            runs of other non-space symbols);
  bytes   : each piece as UTF-8 bytes, each byte mapped to a printable unicode symbol;
  merge   : repeatedly merge the adjacent pair with the lowest merge rank (cached per piece).

Special-token strings in the input text ("<end_of_text>") are NOT interpreted: a caption can
never inject a start/end token, it is tokenized as ordinary characters.

Usage:
  tok = ClipTokenizer()
  tok.encode("a photo of a cat.")      # [320, 1125, 539, 320, 2368, 269]
  tok(["a cat", "a dog"]).shape        # (2, 77), int32, [sot, ..., eot, 0, ...]
"""
from __future__ import annotations

import functools
import gzip
import html
import importlib.resources
import os
import unicodedata
from typing import Iterable, Sequence

import numpy as np
import regex

DEFAULT_CONTEXT_LENGTH = 77
NUM_MERGES = 49152 - 256 - 2  # merges used by CLIP: 48894
VOCAB_SIZE = 2 * 256 + NUM_MERGES + 2  # 49408
SOT_TEXT = "<start_of_text>"
EOT_TEXT = "<end_of_text>"
END_OF_WORD = "</w>"
DEFAULT_VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"

# CLIP pre-tokenisation: common English contractions, runs of letters, single digits, and runs
# of anything that is neither whitespace, letter nor digit.
_SPLIT_PATTERN = regex.compile(
    r"'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+", regex.IGNORECASE)

try:  # optional: the exact text repair the original tokenizer applies.
  import ftfy as _ftfy
except ImportError:  # pragma: no cover - depends on the environment
  _ftfy = None


# ------------------------------------------------------------------------------------------
# Pure helpers
# ------------------------------------------------------------------------------------------


def byte_symbols() -> list[tuple[int, str]]:
  """(byte, symbol) pairs in vocabulary order.

  Printable Latin-1 bytes stand for themselves; the 68 remaining bytes (controls, space, DEL,
  NBSP, soft hyphen...) get the code points 256, 257, ... in increasing byte order. The list
  order is the order of the first 256 vocabulary ids.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
  printable_set = set(printable)
  others = [b for b in range(256) if b not in printable_set]
  pairs = [(b, chr(b)) for b in printable]
  pairs += [(b, chr(256 + k)) for k, b in enumerate(others)]
  return pairs


def _light_fix_table() -> dict[int, str]:
  """str.translate table for the ftfy-free fallback of `fix_text`."""
  table: dict[int, str | None] = {}
  for ch in "\u2018\u2019\u201a\u201b":  # curly single quotes
    table[ord(ch)] = "'"
  for ch in "\u201c\u201d\u201e\u201f":  # curly double quotes
    table[ord(ch)] = '"'
  for cp in (0x0132, 0x0133, *range(0xFB00, 0xFB06 + 1)):  # Latin ligatures (IJ, ff, fi, ...)
    table[cp] = unicodedata.normalize("NFKC", chr(cp))
  for cp in range(0xFF01, 0xFF5E + 1):  # full-width ASCII
    table[cp] = chr(cp - 0xFEE0)
  table[0x3000] = " "  # ideographic space
  for cp in (*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, 0xFEFF):  # controls, BOM
    table[cp] = None
  return table


_LIGHT_FIX_TABLE = _light_fix_table()
_TERMINAL_ESCAPE = regex.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_SURROGATE = regex.compile("[\ud800-\udfff]")


def fix_text(text: str) -> str:
  """Repairs text like ftfy.fix_text; uses ftfy when importable.

  The fallback covers what matters for captions: terminal colour codes, surrogates, NFC
  normalisation, straight quotes, Latin ligatures, full-width ASCII and stray control characters. It does not
  undo mojibake ('CafÃ©' stays as is).
  """
  if _ftfy is not None:
    return _ftfy.fix_text(text)
  if "\x1b" in text:
    text = _TERMINAL_ESCAPE.sub("", text)
  if _SURROGATE.search(text):  # join surrogate pairs, replace lone surrogates by U+FFFD
    text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
  return unicodedata.normalize("NFC", text.translate(_LIGHT_FIX_TABLE))


def clean_text(text: str) -> str:
  """CLIP caption cleaning: repair, HTML unescape (twice), collapse whitespace, lowercase."""
  text = fix_text(text)
  text = html.unescape(html.unescape(text))
  return " ".join(text.split()).lower()


def split_pieces(text: str) -> list[str]:
  """Pre-tokenises cleaned text into the pieces that BPE merges independently."""
  return _SPLIT_PATTERN.findall(text)


def bpe_merge(symbols: Sequence[str], merge_ranks: dict[tuple[str, str], int]) -> list[str]:
  """Applies BPE merges to a word given as a sequence of symbols.

  Each round merges every (left-to-right, non-overlapping) occurrence of the adjacent pair with
  the lowest rank; stops when no adjacent pair has a rank.
  """
  word = list(symbols)
  while len(word) > 1:
    best_rank = None
    best_pair = None
    for pair in zip(word, word[1:]):
      rank = merge_ranks.get(pair)
      if rank is not None and (best_rank is None or rank < best_rank):
        best_rank, best_pair = rank, pair
    if best_pair is None:
      break
    left, right = best_pair
    merged = []
    i, n = 0, len(word)
    while i < n:
      if i + 1 < n and word[i] == left and word[i + 1] == right:
        merged.append(left + right)
        i += 2
      else:
        merged.append(word[i])
        i += 1
    word = merged
  return word


def read_merges(bpe_path: str | os.PathLike) -> list[tuple[str, str]]:
  """Reads the first NUM_MERGES merge rules of a gzipped CLIP merge file."""
  with gzip.open(bpe_path, "rt", encoding="utf-8") as f:
    header = f.readline()
    if "#version" not in header:  # the shipped file's header has a stray prefix
      raise ValueError(f"{os.fspath(bpe_path)!r} is not a BPE merge file: first line is "
                       f"{header[:60]!r}, expected a '#version: ...' header")
    merges = []
    for line in f:
      if len(merges) == NUM_MERGES:
        break
      parts = line.split()
      if len(parts) != 2:
        raise ValueError(f"bad merge line {len(merges) + 2} in {os.fspath(bpe_path)!r}: "
                         f"{line!r}; expected two symbols")
      merges.append((parts[0], parts[1]))
  if len(merges) != NUM_MERGES:
    raise ValueError(f"{os.fspath(bpe_path)!r} has {len(merges)} merges; need {NUM_MERGES}")
  return merges


def build_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
  """Token strings in id order: bytes, bytes + '</w>', merges, then sot and eot."""
  byte_chars = [ch for _, ch in byte_symbols()]
  vocab = byte_chars + [ch + END_OF_WORD for ch in byte_chars]
  vocab += [left + right for left, right in merges]
  vocab += [SOT_TEXT, EOT_TEXT]
  return vocab


def default_bpe_path():
  """Path-like of the merge file shipped in qtx/data."""
  return importlib.resources.files("qtx.data").joinpath(DEFAULT_VOCAB_FILE)


def _check_context_length(context_length) -> int:
  if isinstance(context_length, bool) or not isinstance(context_length, (int, np.integer)):
    raise TypeError(f"context_length must be an int >= 2, got {context_length!r} "
                    f"({type(context_length).__name__})")
  if context_length < 2:
    raise ValueError(f"context_length must be >= 2 (room for <start_of_text> and "
                     f"<end_of_text>), got {context_length}")
  return int(context_length)


def _check_text(text, where: str = "text") -> str:
  if not isinstance(text, str):
    raise TypeError(f"{where} must be a str, got {type(text).__name__}: {text!r:.60}")
  return text


# ------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------


class ClipTokenizer:
  """CLIP byte-level BPE tokenizer.

  Attributes:
    vocab_size: 49408.
    sot_token: id of <start_of_text> (49406).
    eot_token: id of <end_of_text> (49407).
    pad_token: 0 (padding after the end-of-text token).
    context_length: default row length of `__call__`.
  """

  def __init__(self, bpe_path: str | os.PathLike | None = None,
               context_length: int = DEFAULT_CONTEXT_LENGTH,
               cache_size: int = 1 << 16):
    self.context_length = _check_context_length(context_length)
    if bpe_path is None:
      with importlib.resources.as_file(default_bpe_path()) as path:
        merges = read_merges(path)
    else:
      merges = read_merges(bpe_path)
    vocab = build_vocab(merges)
    self._token_to_id = {token: i for i, token in enumerate(vocab)}
    self._id_to_token = vocab
    self._merge_ranks = {pair: rank for rank, pair in enumerate(merges)}
    # bytes -> symbols via latin-1 decode + translate (one C-level pass per piece).
    self._latin1_to_symbol = {b: ch for b, ch in byte_symbols()}
    self._symbol_to_byte = {ch: b for b, ch in byte_symbols()}
    self.vocab_size = len(vocab)
    self.sot_token = self._token_to_id[SOT_TEXT]
    self.eot_token = self._token_to_id[EOT_TEXT]
    self.pad_token = 0
    self._piece_ids = functools.lru_cache(maxsize=cache_size)(self._piece_ids_uncached)

  def _piece_ids_uncached(self, piece: str) -> tuple[int, ...]:
    symbols = list(piece.encode("utf-8").decode("latin-1").translate(self._latin1_to_symbol))
    symbols[-1] += END_OF_WORD
    return tuple(self._token_to_id[s] for s in bpe_merge(symbols, self._merge_ranks))

  def encode(self, text: str) -> list[int]:
    """BPE ids of one caption, without <start_of_text>/<end_of_text>."""
    _check_text(text)
    ids: list[int] = []
    for piece in split_pieces(clean_text(text)):
      ids.extend(self._piece_ids(piece))
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of a list of ids (inverse of `encode` up to cleaning and spacing).

    With skip_special_tokens, <start_of_text> is dropped and decoding stops at the first
    <end_of_text> (what follows it is padding), so a row of `__call__` decodes to its caption.
    Otherwise special tokens are rendered as '<start_of_text>' / '<end_of_text>'.
    Word ends become single spaces; trailing whitespace is stripped.
    """
    parts: list[str] = []
    pending = bytearray()

    def flush():
      if pending:
        parts.append(pending.decode("utf-8", errors="replace"))
        pending.clear()

    ids_array = np.asarray(ids if isinstance(ids, np.ndarray) else list(ids)).reshape(-1)
    if ids_array.size and not np.issubdtype(ids_array.dtype, np.integer):
      raise TypeError(f"token ids must be integers, got dtype {ids_array.dtype}")
    for token_id in ids_array.tolist():
      if not 0 <= token_id < self.vocab_size:
        raise ValueError(f"token id {token_id} out of range [0, {self.vocab_size})")
      if token_id in (self.sot_token, self.eot_token):
        if skip_special_tokens:
          if token_id == self.eot_token:
            break
          continue
        flush()
        parts.append(self._id_to_token[token_id])
        continue
      token = self._id_to_token[token_id]
      word_end = token.endswith(END_OF_WORD)
      if word_end:
        token = token[:-len(END_OF_WORD)]
      pending.extend(self._symbol_to_byte[ch] for ch in token)
      if word_end:
        pending.extend(b" ")
    flush()
    return "".join(parts).rstrip()

  def __call__(self, texts: str | Sequence[str], context_length: int | None = None) -> np.ndarray:
    """Token rows int32 [N, context_length]: sot, ids, eot, then 0-padding.

    A caption longer than context_length - 2 ids is truncated to its first
    context_length - 1 tokens (including sot) and <end_of_text> is kept as the last token.
    A single str gives N = 1.
    """
    length = self.context_length if context_length is None else _check_context_length(
        context_length)
    if isinstance(texts, str):
      texts = [texts]
    elif isinstance(texts, (bytes, bytearray)) or not isinstance(texts, Sequence):
      raise TypeError(f"texts must be a str or a sequence of str, got {type(texts).__name__}")
    tokens_NxT = np.zeros((len(texts), length), dtype=np.int32)
    for n, text in enumerate(texts):
      _check_text(text, where=f"texts[{n}]")
      ids = self.encode(text)[:length - 2]
      row = [self.sot_token, *ids, self.eot_token]
      tokens_NxT[n, :len(row)] = row
    return tokens_NxT


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> ClipTokenizer:
  """Shared tokenizer with the shipped vocabulary (loaded once)."""
  return ClipTokenizer()


def tokenize(texts: str | Sequence[str], context_length: int = DEFAULT_CONTEXT_LENGTH
             ) -> np.ndarray:
  """`ClipTokenizer()(texts, context_length)` with a cached default instance."""
  return default_tokenizer()(texts, context_length=context_length)
