"""The torch-free CLIP tokenizer gives open_clip's ids exactly, on a seeded corpus of varied strings."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from edgefm.runtime.clip.tokenizer import ClipTokenizer
from edgefm.runtime.errors import InputError

open_clip = pytest.importorskip("open_clip")

PIECES = {
    "words": ["a", "photo", "of", "the", "Dog", "CAT", "tower", "Eiffel", "running", "unbelievably",
              "pneumonoultramicroscopic", "xylophone", "ok", "I", "Tokyo", "DALL-E", "GPT4", "iPhone"],
    "accents": ["café", "naïve", "résumé", "Zürich", "São Paulo", "façade", "Ångström", "crème brûlée",
                "piñata", "Dvořák", "Łódź", "e\u0301", "a\u0308", "ﬁ", "Straße", "İstanbul"],
    "emoji": ["😀", "🐶", "👍🏽", "👨‍👩‍👧", "🇫🇷", "❤️", "🤖🤖", "✨", "☕"],
    "cjk": ["日本語", "中文字符", "한국어", "ひらがな", "カタカナ", "東京タワー", "你好，世界", "ｶﾀｶﾅ"],
    "scripts": ["Привет", "مرحبا", "שלום", "नमस्ते", "ελληνικά", "ไทย", "ქართული", "Ελλάδα"],
    "html": ["&amp;", "&#39;", "&quot;", "&lt;b&gt;", "&nbsp;", "&amp;amp;", "&#x27;", "&copy;", "&#8220;",
             "&eacute;", "&bogus;", "&"],
    "apostrophes": ["it's", "don't", "they're", "we've", "I'm", "you'll", "he'd", "IT'S", "rock 'n' roll",
                    "it’s", "'s", "'t", "''", "dogs'", "O'Neill"],
    "numbers": ["2024", "3.14159", "1,000,000", "-42", "0x1F", "１２３", "½", "Ⅻ", "٣", "1st", "24/7",
                "10:30", "$100", "100%", "1e-5", "007"],
    "punctuation": ["!!!", "...", "?!", "(parenthesis)", "[brackets]", "@user", "#hashtag", "a/b", "e-mail",
                    "C++", "<start_of_text>", "<end_of_text>", "</w>", "<|endoftext|>", "—", "…", "«»", "\\"],
    "whitespace": ["   ", "\t", "\n", "\r\n", "\u00a0", "\u2003", "\u200b", "\u3000", "\t\t\n  \n"],
    "mojibake": ["cafÃ©", "â€œquotedâ€\x9d", "Ã¼ber", "donâ€™t"],
    "controls": ["\x00", "\x07", "\ufeff", "\x1b[31m", "\u202e"],
}
SEPARATORS = [" ", " ", " ", "", "  ", "\t", "\n", " \n\t "]


def random_text(rng: random.Random) -> str:
    parts = []
    for _ in range(rng.randint(0, 14)):
        if rng.random() < 0.08:  # any non-surrogate code point, BMP or astral
            ranges = [(0x20, 0xD7FF), (0xE000, 0xFFFD), (0x10000, 0x2FFFF)]
            cp = rng.randint(*rng.choice(ranges))
            parts.append(chr(cp) * rng.randint(1, 3))
        else:
            piece = rng.choice(PIECES[rng.choice(list(PIECES))])
            parts.append(piece.upper() if rng.random() < 0.1 else piece)
        parts.append(rng.choice(SEPARATORS))
    return "".join(parts)


def corpus(n: int = 2400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    texts = ["", " ", "\t\n", "a", "A photo of a dog.", "&amp;#39;", "<start_of_text>", "<end_of_text> x"]
    texts += [" ".join(rng.choice(PIECES["words"]) for _ in range(rng.randint(60, 200))) for _ in range(40)]
    texts += ["😀" * 100, "日本語" * 60, "1234567890" * 20, "a" * 1000, "x " * 80]  # far beyond 77 tokens
    texts += [random_text(rng) for _ in range(n - len(texts))]
    return texts


@pytest.fixture(scope="module")
def tokenizer() -> ClipTokenizer:
    return ClipTokenizer()


def test_ids_identical_to_open_clip_on_corpus(tokenizer):
    texts = corpus()
    assert len(texts) >= 2000
    ours = tokenizer(texts)
    ref = open_clip.tokenize(texts).numpy()
    assert ours.dtype == np.int64 and ours.shape == (len(texts), 77)
    mismatched = [texts[i] for i in np.flatnonzero((ours != ref).any(axis=1))]
    assert not mismatched, f"{len(mismatched)} texts differ, e.g. {mismatched[:3]!r}"
    truncated = (ref[:, -1] != 0).sum()
    assert truncated >= 45  # the long texts really were cut, with <end_of_text> kept last
    assert (ours[ref[:, -1] != 0, -1] == tokenizer.eot_token_id).all()


def test_encode_decode_and_other_context_lengths_match_open_clip(tokenizer):
    reference = open_clip.tokenizer.SimpleTokenizer()
    texts = corpus(300, seed=1)
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids, skip_special_tokens=False) == reference.decode(ids), text
    for length in (5, 16, 100):
        assert np.array_equal(tokenizer(texts, context_length=length),
                              open_clip.tokenize(texts, context_length=length).numpy())
    row = tokenizer("a photo of a cat")[0]
    assert tokenizer.decode(row) == "a photo of a cat "
    assert tokenizer.vocab_size == 49408
    assert (tokenizer.sot_token_id, tokenizer.eot_token_id) == (49406, 49407)


def test_errors_name_the_problem(tokenizer, tmp_path):
    with pytest.raises(InputError, match="truncate=True"):
        tokenizer("word " * 100, truncate=False)
    with pytest.raises(InputError, match="not a str"):
        tokenizer(["ok", 3])
    with pytest.raises(InputError, match="outside the CLIP vocabulary"):
        tokenizer.decode([49408])
    (tmp_path / "vocab.txt.gz").write_bytes(b"not gzip")
    with pytest.raises(InputError, match=r"vocab\.txt\.gz"):
        ClipTokenizer(tmp_path / "vocab.txt.gz")


def test_tokenizer_and_preprocessing_run_without_torch():
    code = textwrap.dedent("""
        import sys
        class _NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ImportError("torch is blocked in this test")
        sys.meta_path.insert(0, _NoTorch())
        import numpy as np
        from edgefm.runtime.clip import ClipTokenizer
        from edgefm.runtime.clip.preprocess import preprocess
        ids = ClipTokenizer()(["a photo of a cat"])
        x = preprocess(np.zeros((30, 40, 3), np.uint8))
        print(ids[0, :7].tolist(), x.shape, "torch" in sys.modules)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[49406, 320, 1125, 539, 320, 2368, 49407] (3, 224, 224) False"
