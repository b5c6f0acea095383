"""The tiny Gemma4-MM model directory the e2e tests serve with vLLM.

``python tiny_mm.py DIR`` writes, into DIR: the checkpoint from
``fxpass.zoo.write_tiny_gemma4_checkpoint`` (bf16 safetensors + config.json), a tokenizer built
locally (no download) whose special-token ids are ``fxpass.zoo.TINY_GEMMA4_TOKEN_IDS``, and a
``Gemma4Processor`` (image processor, video processor, audio feature extractor). It needs the
torchvision stand-in (``standin/``) first on ``sys.path``: HF's Gemma4 image processor imports
torchvision at module import. Run it in a subprocess (see conftest.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

STANDIN = Path(__file__).resolve().parent / "standin"

# Gemma4's multimodal special tokens, by the attribute names HF's Gemma4Processor reads.
_SPECIAL = {
    "boi_token": ("<|image>", "boi_token_id"),
    "eoi_token": ("<image|>", "eoi_token_id"),
    "image_token": ("<|image|>", "image_token_id"),
    "boa_token": ("<|audio>", "boa_token_id"),
    "eoa_token": ("<audio|>", "eoa_token_index"),
    "audio_token": ("<|audio|>", "audio_token_id"),
    "video_token": ("<|video|>", "video_token_id"),
}

# Plain tokens (ids 5..): characters and a few words, so prompts tokenize without byte fallback.
_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'-\n") + ["▁"]
_WORDS = ["▁the", "▁a", "▁is", "▁what", "▁this", "▁image", "▁audio", "▁describe", "▁hello",
          "▁world", "▁tell", "▁me", "▁about", "▁in", "▁of", "▁and", "▁sound", "▁picture"]


def build_tokenizer():
    from transformers import GemmaTokenizer

    from fxpass.zoo import TINY_GEMMA4_TOKEN_IDS as ids

    vocab = {"<pad>": ids["pad_token_id"], "<eos>": ids["eos_token_id"],
             "<bos>": ids["bos_token_id"], "<unk>": 3, "<mask>": 4}
    for tok in _CHARS + _WORDS:
        vocab.setdefault(tok, len(vocab))
    assert len(vocab) <= 256
    for i in range(len(vocab), 256):
        vocab[f"<unused{i}>"] = i
    for _, (tok, key) in _SPECIAL.items():
        vocab[tok] = ids[key]
    for i in range(len(vocab), 320):
        vocab[f"<unused{i}>"] = i
    merges = []
    for w in _WORDS:  # left-to-right merges building each word from its characters
        acc = w[0]
        for ch in w[1:]:
            merges.append((acc, ch))
            acc += ch
            vocab.setdefault(acc, None)
    # intermediate merge results need ids too; give them the unused slots from the top
    free = [i for i in range(255, 4, -1) if f"<unused{i}>" in vocab]
    for tok, idx in list(vocab.items()):
        if idx is None:
            slot = free.pop(0)
            del vocab[f"<unused{slot}>"]
            vocab[tok] = slot
    extra = {name: tok for name, (tok, _) in _SPECIAL.items()}
    tok = GemmaTokenizer(vocab=vocab, merges=merges, extra_special_tokens=extra)
    return tok


def build_processor(tokenizer):
    from transformers.models.gemma4 import (
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    image = Gemma4ImageProcessor(max_soft_tokens=70)
    video = Gemma4VideoProcessor()
    audio = Gemma4AudioFeatureExtractor()
    return Gemma4Processor(feature_extractor=audio, image_processor=image, tokenizer=tokenizer,
                           video_processor=video, image_seq_length=70)


def build(path: str | Path, text_kv_heads: int = 1) -> Path:
    from fxpass.zoo import write_tiny_gemma4_checkpoint

    path = write_tiny_gemma4_checkpoint(path, text_kv_heads=text_kv_heads)
    tok = build_tokenizer()
    proc = build_processor(tok)
    proc.save_pretrained(path)
    tok.save_pretrained(path)
    (path / "fxpass_e2e.json").write_text(json.dumps({"built_by": __file__}))
    return path


if __name__ == "__main__":
    if str(STANDIN) not in sys.path:
        sys.path.insert(0, str(STANDIN))
    # optional second argument: the text model's KV heads (2: a bnb tensor-parallel variant)
    print(build(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1))
