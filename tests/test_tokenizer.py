"""Tests for the CLIP byte-level BPE tokenizer.

Expected ids were produced by the original CLIP tokenizer implementation on the same merge file.
"""
import random

import chex
import numpy as np
import pytest

from qtx.data import tokenizer as tokenizer_lib
from qtx.data.tokenizer import ClipTokenizer, tokenize

SOT, EOT = 49406, 49407

# text -> BPE ids (without sot/eot) of the reference implementation.
KNOWN_IDS = {
    "a photo of a cat.": [320, 1125, 539, 320, 2368, 269],
    "Hello, World!": [3306, 267, 1002, 256],
    "don't stop   believin'": [847, 713, 1691, 4972, 530, 262],
    "1234 apples &amp; oranges": [272, 273, 274, 275, 14032, 261, 32417],
    "the quick brown fox jumps over the lazy dog": [518, 3712, 2866, 3240, 18911, 962, 518,
                                                    10753, 1929],
    "It's a DOG's life, isn't it? We'll see; they'd've": [
        585, 568, 320, 1929, 568, 970, 267, 2923, 713, 585, 286, 649, 1342, 862, 282, 889, 1896,
        1200],
    "A man&#39;s photo of &quot;two&quot; dogs": [320, 786, 568, 1125, 539, 257, 1237, 257,
                                                  3255],
    "COVID-19 vaccine, 2021!!!": [622, 9284, 268, 272, 280, 17493, 267, 273, 271, 273, 272, 995],
    "supercalifragilisticexpialidocious": [1642, 2857, 13093, 2076, 5868, 26850, 835, 639,
                                           38466],
    "naïve café 東京 🐈": [1097, 35689, 563, 15304, 48338, 21078, 361, 2074, 486],
    "emoji 👍🏽 flags 🇯🇵": [16327, 43722, 12221, 26527],
    "ラーメン 한국어 العربية русский": [
        23007, 18584, 94, 26875, 15197, 250, 31871, 255, 31625, 368, 12973, 18843, 10948, 16378,
        12046, 20915, 16370, 39729, 23669, 23669, 27152, 29503, 373],
}


@pytest.fixture(scope="module")
def tok():
  return ClipTokenizer()


def test_vocab_and_special_tokens(tok):
  assert tok.vocab_size == 49408
  assert (tok.sot_token, tok.eot_token, tok.pad_token) == (SOT, EOT, 0)
  assert tok.context_length == 77


def test_reference_caption(tok):
  np.testing.assert_array_equal(tok("a photo of a cat.")[0, :8],
                                [SOT, 320, 1125, 539, 320, 2368, 269, EOT])


@pytest.mark.parametrize("text", sorted(KNOWN_IDS))
def test_known_ids(tok, text):
  assert tok.encode(text) == KNOWN_IDS[text]


def test_single_printable_ascii_chars_are_byte_tokens(tok):
  # A lone character is one end-of-word byte symbol: id 256 + its rank among printable bytes.
  for code in range(ord("!"), ord("~") + 1):
    char = chr(code).lower()
    assert tok.encode(chr(code)) == [256 + ord(char) - ord("!")], chr(code)


def test_cleaning_whitespace_case_and_html(tok):
  assert tok.encode("  A   PHOTO\tof\na CAT.  ") == KNOWN_IDS["a photo of a cat."]
  assert tok.encode("fish &amp;amp; chips") == tok.encode("fish & chips")
  assert tokenizer_lib.clean_text("  Tom &amp; Jerry \n") == "tom & jerry"


def test_text_repair(tok):
  # Same result with ftfy and with the built-in fallback.
  assert tokenizer_lib.fix_text("don\u2019t \u201cquote\u201d") == "don't \"quote\""
  assert tokenizer_lib.fix_text("\uff46\uff55\uff4c\uff4c \ufb01ne") == "full fine"
  assert tokenizer_lib.fix_text("e\u0301cole") == "\u00e9cole"
  assert tok.encode("I\u2019m") == tok.encode("I'm")


def test_special_token_text_is_not_interpreted(tok):
  # A caption cannot inject <end_of_text>: it is split like any other punctuation and letters.
  ids = tok.encode("<end_of_text>")
  assert ids == [283, 806, 318, 539, 318, 4160, 285]
  assert tok.decode(ids) == "< end _ of _ text >"
  row = tok("<start_of_text> <end_of_text>")[0]
  assert (row == SOT).sum() == 1 and (row == EOT).sum() == 1


def test_empty_and_blank_strings(tok):
  for text in ("", "   \t\n"):
    assert tok.encode(text) == []
    row = tok(text)[0]
    np.testing.assert_array_equal(row[:2], [SOT, EOT])
    assert not row[2:].any()


def test_batch_shape_dtype_and_padding(tok):
  texts = ["a photo of a cat.", "", "Hello, World!"]
  tokens_NxT = tok(texts)
  chex.assert_shape(tokens_NxT, (3, 77))
  assert tokens_NxT.dtype == np.int32
  for row, text in zip(tokens_NxT, texts):
    ids = [SOT, *tok.encode(text), EOT]
    np.testing.assert_array_equal(row[:len(ids)], ids)
    assert not row[len(ids):].any()
  np.testing.assert_array_equal(tok(tuple(texts)), tokens_NxT)
  chex.assert_shape(tok([]), (0, 77))
  chex.assert_shape(tok("x", context_length=5), (1, 5))


def test_truncation_keeps_eot_last(tok):
  text = " ".join(["word"] * 200)
  ids = tok.encode(text)
  assert len(ids) == 200
  for length in (77, 16, 3, 2):
    row = tok(text, context_length=length)[0]
    chex.assert_shape(row, (length,))
    assert row[0] == SOT and row[-1] == EOT
    np.testing.assert_array_equal(row[1:-1], ids[:length - 2])
  # Exactly fitting caption: no truncation, no padding.
  exact = " ".join(["word"] * 75)
  row = tok(exact)[0]
  np.testing.assert_array_equal(row, [SOT, *tok.encode(exact), EOT])


def test_decode_round_trip(tok):
  assert tok.decode(KNOWN_IDS["a photo of a cat."]) == "a photo of a cat ."
  for text in KNOWN_IDS:
    ids = tok.encode(text)
    assert tok.encode(tok.decode(ids)) == ids, text
  # Unicode survives byte-level decoding exactly (after cleaning).
  assert tok.decode(tok.encode("naïve café 東京 🐈")) == "naïve café 東京 🐈"


def test_decode_padded_row_and_special_tokens(tok):
  row = tok("a photo of a cat.")[0]
  assert tok.decode(row) == "a photo of a cat ."
  ids = [SOT, 320, 2368, EOT]
  assert tok.decode(ids, skip_special_tokens=False) == "<start_of_text>a cat <end_of_text>"
  assert tok.decode([]) == ""


def test_decode_rejects_bad_ids(tok):
  with pytest.raises(ValueError, match="49408"):
    tok.decode([320, 49408])
  with pytest.raises(ValueError, match="-1"):
    tok.decode([-1])
  with pytest.raises(TypeError, match="integers"):
    tok.decode([1.5])


def test_unicode_and_emoji_do_not_crash(tok):
  rng = random.Random(0)
  pools = [range(0x20, 0x250), range(0x370, 0x700), range(0x3040, 0x3100), range(0x4E00, 0x4F00),
           range(0xAC00, 0xAD00), range(0x1F300, 0x1F700), range(0x0300, 0x0370),
           range(0x2000, 0x2070), range(0xFF00, 0xFFF0), range(0xD800, 0xE000)]
  texts = []
  for _ in range(200):
    chars = [chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(0, 40))]
    texts.append("".join(chars))
  texts += ["\U0001F468\u200d\U0001F469\u200d\U0001F467", "\ud800", "\x00\x1b[31mred\x1b[0m",
            "\u00ad\u00a0\u200b\ufeff"]
  tokens_NxT = tok(texts)
  chex.assert_shape(tokens_NxT, (len(texts), 77))
  assert ((tokens_NxT >= 0) & (tokens_NxT < tok.vocab_size)).all()
  assert (tokens_NxT[:, 0] == SOT).all()
  assert ((tokens_NxT == EOT).sum(axis=1) == 1).all()
  for text in texts:
    assert isinstance(tok.decode(tok.encode(text)), str)


def test_input_validation(tok):
  with pytest.raises(TypeError, match="str"):
    tok.encode(123)
  with pytest.raises(TypeError, match="str"):
    tok.encode(b"bytes")
  with pytest.raises(TypeError, match=r"texts\[1\]"):
    tok(["ok", None])
  with pytest.raises(TypeError, match="sequence of str"):
    tok(b"bytes")
  with pytest.raises(TypeError, match="sequence of str"):
    tok(42)
  for bad in (1, 0, -3):
    with pytest.raises(ValueError, match="context_length"):
      tok("a", context_length=bad)
    with pytest.raises(ValueError, match="context_length"):
      ClipTokenizer(context_length=bad)
  with pytest.raises(TypeError, match="context_length"):
    tok("a", context_length=2.5)


def test_bad_vocab_file(tmp_path):
  import gzip
  path = tmp_path / "bad.txt.gz"
  with gzip.open(path, "wt") as f:
    f.write("#version: 0.2\na b\n")
  with pytest.raises(ValueError, match="merges"):
    ClipTokenizer(bpe_path=path)


def test_module_tokenize_helper(tok):
  assert tokenizer_lib.default_tokenizer() is tokenizer_lib.default_tokenizer()
  texts = ["a photo of a cat.", "a dog"]
  np.testing.assert_array_equal(tokenize(texts), tok(texts))
  chex.assert_shape(tokenize("a cat", context_length=10), (1, 10))


def test_custom_default_context_length():
  tok16 = ClipTokenizer(context_length=16)
  chex.assert_shape(tok16(["a", "b"]), (2, 16))
  chex.assert_shape(tok16("a", context_length=8), (1, 8))
