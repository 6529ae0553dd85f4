"""DecoderEmbedder: EOS handling, last-token pooling, LoRA training/merging/saving, sentence-transformers parity.

The backbone is a random tiny Qwen3 with the real Qwen3 tokenizer (`tiny_qwen3_path`), so the token ids
(`<|endoftext|>` = 151643 = pad) are those of Qwen3-Embedding. Expected values are computed from the
backbone's own `last_hidden_state`, indexed by hand, never through the code under test.
"""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoTokenizer

from ark_hf.models.decoder import (
    DEFAULT_INSTRUCTION,
    DecoderEmbedder,
    format_query,
    last_token_pool,
    truncate_embeddings,
)
from ark_hf.models.outputs import EmbeddingOutput, RetrieverOutput

ENDOFTEXT_ID = 151643
IM_END_ID = 151645
QUERIES = ["what is a load-bearing wall", "how deep are foundations", "permit for a garden shed?"]
DOCUMENTS = [
    "A load-bearing wall carries the weight of the floors and roof above it down to the foundation.",
    "Strip foundations are usually dug at least one metre deep, deeper on clay soils.",
    "Small garden sheds under fifteen square metres rarely need a building permit.",
]
LONG_DOCUMENT = " ".join(["Concrete needs about twenty-eight days to reach its design strength."] * 12)
MAX_LENGTH = 24


def hand_pooled(backbone, features) -> torch.Tensor:
    """Normalised hidden state at the last mask-1 position, found with a Python loop."""
    with torch.no_grad():
        hidden = backbone(input_ids=features["input_ids"], attention_mask=features["attention_mask"]).last_hidden_state
    rows = []
    for i, mask in enumerate(features["attention_mask"].tolist()):
        last = max(j for j, m in enumerate(mask) if m == 1)
        rows.append(hidden[i, last])
    return F.normalize(torch.stack(rows).float(), dim=-1)


def contrastive_steps(model: DecoderEmbedder, steps: int = 3) -> None:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    labels = torch.arange(len(QUERIES))
    for _ in range(steps):
        output = model(
            query=model.tokenize([format_query(q, DEFAULT_INSTRUCTION) for q in QUERIES], MAX_LENGTH),
            passages=model.tokenize(DOCUMENTS, MAX_LENGTH),
        )
        loss = F.cross_entropy(output.query.dense @ output.passages.dense.T / 0.05, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def embedder(tiny_qwen3_path):
    return DecoderEmbedder(tiny_qwen3_path)


@pytest.fixture(scope="module")
def lora_run(embedder):
    """A LoRA model after three optimizer steps, with the state dict from before the steps."""
    torch.manual_seed(0)
    model = DecoderEmbedder(copy.deepcopy(embedder.model), tokenizer=embedder.tokenizer, lora=True)
    before = {key: value.detach().clone() for key, value in model.state_dict().items()}
    contrastive_steps(model)
    return model, before


@pytest.fixture(scope="module")
def merged_dir(lora_run, tmp_path_factory):
    model, _ = lora_run
    folder = tmp_path_factory.mktemp("decoder") / "merged"
    model.save_pretrained(folder, merge_lora=True, max_seq_length=MAX_LENGTH)
    return folder


def training_time_embeddings(model: DecoderEmbedder, texts: list[str], instruction: str | None) -> np.ndarray:
    """What the loss sees: the training forward on collated features (train mode; Qwen3 has no dropout)."""
    model.train()
    with torch.no_grad():
        output = model(passages=model.tokenize([format_query(t, instruction) for t in texts], MAX_LENGTH))
    return output.passages.dense.numpy()


# ------------------------------------------------------------------------------------------------ formatting
def test_format_query_exact_strings():
    assert format_query("how deep", "Find answers") == "Instruct: Find answers\nQuery:how deep"
    assert format_query("how deep", DEFAULT_INSTRUCTION) == (
        "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery:how deep"
    )
    for no_instruction in (None, ""):
        text = format_query("how deep", no_instruction)
        assert text == "how deep"
        assert "None" not in text and "Instruct" not in text


# ------------------------------------------------------------------------------------------------ tokenization
@pytest.mark.parametrize("side", ["left", "right"])
def test_eos_is_last_real_token_and_survives_truncation(embedder, side):
    tokenizer = embedder.tokenizer
    original_side = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        texts = ["short", LONG_DOCUMENT, DOCUMENTS[0]]
        features = embedder.tokenize(texts, MAX_LENGTH)
    finally:
        tokenizer.padding_side = original_side
    assert embedder.eos_token_id == ENDOFTEXT_ID
    ids, mask = features["input_ids"].tolist(), features["attention_mask"].tolist()
    for text, row, row_mask in zip(texts, ids, mask):
        real = [token for token, m in zip(row, row_mask) if m == 1]
        plain = tokenizer(text, add_special_tokens=False)["input_ids"]
        assert real == plain[: MAX_LENGTH - 1] + [ENDOFTEXT_ID]
        # padding sits on the requested side
        padded_positions = [j for j, m in enumerate(row_mask) if m == 0]
        if padded_positions:
            expected = list(range(len(padded_positions))) if side == "left" else list(range(len(real), len(row)))
            assert padded_positions == expected
    assert len(tokenizer(LONG_DOCUMENT, add_special_tokens=False)["input_ids"]) > MAX_LENGTH  # truncation happened
    assert sum(mask[1]) == MAX_LENGTH


def test_endoftext_preferred_over_im_end_eos(embedder, tiny_qwen3_path):
    # Qwen3-Embedding's tokenizer declares <|im_end|> as eos but the model was trained on <|endoftext|>
    tokenizer = AutoTokenizer.from_pretrained(tiny_qwen3_path, eos_token="<|im_end|>")
    assert tokenizer.eos_token_id == IM_END_ID
    model = DecoderEmbedder(embedder.model, tokenizer=tokenizer)
    features = model.tokenize(["hello"], 8)
    assert features["input_ids"][0, -1].item() == ENDOFTEXT_ID
    assert IM_END_ID not in features["input_ids"].tolist()[0]


def test_tokenize_rejects_too_short_max_length(embedder):
    with pytest.raises(ValueError, match="max_length"):
        embedder.tokenize(["x"], 1)


# ------------------------------------------------------------------------------------------------ pooling
def test_last_token_pool_indices():
    hidden = torch.arange(2 * 4, dtype=torch.float32).reshape(2, 4, 1).repeat(1, 1, 3)
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    right = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    assert last_token_pool(hidden, left)[:, 0].tolist() == [3.0, 7.0]
    assert last_token_pool(hidden, right)[:, 0].tolist() == [1.0, 4.0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_matches_hand_indexing(embedder, side):
    tokenizer = embedder.tokenizer
    original_side = tokenizer.padding_side
    tokenizer.padding_side = side
    try:
        texts = [format_query(QUERIES[0], DEFAULT_INSTRUCTION), DOCUMENTS[1], "tiny"]
        features = embedder.tokenize(texts, 64)
        alone = [embedder.tokenize([text], 64) for text in texts]
    finally:
        tokenizer.padding_side = original_side
    assert (features["attention_mask"] == 0).any()  # the batch really is padded
    embedder.eval()
    with torch.no_grad():
        pooled = embedder.encode_features(features).dense
        unpadded = torch.cat([embedder.encode_features(f).dense for f in alone])
    expected = hand_pooled(embedder.model, features)
    torch.testing.assert_close(pooled, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(len(texts)), atol=1e-6, rtol=0)
    # padding (either side) does not change the embedding of a text
    torch.testing.assert_close(pooled, unpadded, atol=1e-5, rtol=0)


def test_forward_encodes_queries_and_passages(embedder):
    output = embedder(query=embedder.tokenize(QUERIES, 32), passages=embedder.tokenize(DOCUMENTS, 32))
    assert isinstance(output, RetrieverOutput) and isinstance(output.query, EmbeddingOutput)
    hidden = embedder.config.hidden_size
    assert output.query.dense.shape == (3, hidden) and output.passages.dense.shape == (3, hidden)
    assert embedder(passages=embedder.tokenize(DOCUMENTS, 32)).query is None


def test_encode_prompt_and_matryoshka(embedder):
    with_prompt = embedder.encode(QUERIES, prompt=DEFAULT_INSTRUCTION, batch_size=2)
    by_hand = embedder.encode([format_query(q, DEFAULT_INSTRUCTION) for q in QUERIES])
    np.testing.assert_allclose(with_prompt, by_hand, atol=1e-5)
    assert not np.allclose(with_prompt, embedder.encode(QUERIES), atol=1e-3)
    small = embedder.encode(QUERIES, prompt=DEFAULT_INSTRUCTION, truncate_dim=8)
    expected = with_prompt[:, :8] / np.linalg.norm(with_prompt[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(small, expected, atol=1e-5)
    assert truncate_embeddings(torch.from_numpy(with_prompt), 8).shape == (3, 8)
    with pytest.raises(ValueError, match="matryoshka_dims"):
        DecoderEmbedder(embedder.model, tokenizer=embedder.tokenizer, matryoshka_dims=[8, 4096])


# ------------------------------------------------------------------------------------------------ LoRA
def test_lora_trains_only_adapters(lora_run):
    model, before = lora_run
    after = model.state_dict()
    assert after.keys() == before.keys()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    adapter_keys = [key for key in before if "lora_" in key]
    assert adapter_keys
    for key, old in before.items():
        if "lora_" in key:
            assert not torch.equal(old, after[key]), f"{key} did not train"
        else:
            assert torch.equal(old, after[key]), f"{key} changed but is not an adapter"


def test_gradient_checkpointing_with_lora_backpropagates(embedder):
    model = DecoderEmbedder(copy.deepcopy(embedder.model), tokenizer=embedder.tokenizer, lora=True)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    checkpoint_funcs = [
        m._gradient_checkpointing_func for m in model.modules() if getattr(m, "gradient_checkpointing", 0)
    ]
    assert checkpoint_funcs and all(f.keywords == {"use_reentrant": False} for f in checkpoint_funcs)
    model.train()
    output = model(query=model.tokenize(QUERIES, 16), passages=model.tokenize(DOCUMENTS, 16))
    (output.query.dense @ output.passages.dense.T).sum().backward()
    grads = [p.grad for name, p in model.named_parameters() if "lora_B" in name]
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_merged_export_matches_adapter_model_and_leaves_it_untouched(lora_run, merged_dir):
    model, _ = lora_run
    state_before_save = {key: value.clone() for key, value in model.state_dict().items()}
    expected = model.encode(QUERIES + DOCUMENTS)
    files = set(os.listdir(merged_dir))
    assert {"model.safetensors", "config.json", "modules.json", "lora_adapter"} <= files
    assert "adapter_config.json" not in files
    reloaded = DecoderEmbedder.from_pretrained(merged_dir)
    assert not reloaded.is_lora
    np.testing.assert_allclose(reloaded.encode(QUERIES + DOCUMENTS), expected, atol=1e-5)
    # saving did not merge into (or otherwise change) the model being trained
    assert model.is_lora
    for key, value in model.state_dict().items():
        assert torch.equal(value, state_before_save[key]), key


def test_save_uses_a_given_state_dict(lora_run, embedder, tmp_path):
    # the Trainer passes the gathered weights under DeepSpeed ZeRO-3; keys are this module's (`model.` prefix)
    model, _ = lora_run
    state = {key: value.clone() for key, value in model.state_dict().items()}
    for key in state:
        if "lora_B" in key:
            state[key].zero_()  # a zero update: the merged weights must be the base weights
    model.save_pretrained(tmp_path / "merged", state_dict=state)
    reloaded = DecoderEmbedder.from_pretrained(tmp_path / "merged")
    np.testing.assert_allclose(reloaded.encode(DOCUMENTS), embedder.encode(DOCUMENTS), atol=1e-5)
    model.save_pretrained(tmp_path / "adapter", merge_lora=False, state_dict=state)
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert all(not tensor.any() for key, tensor in adapter.items() if "lora_B" in key)


def test_adapter_save_and_reload(lora_run, tmp_path, embedder):
    model, _ = lora_run
    model.save_pretrained(tmp_path, merge_lora=False)
    files = set(os.listdir(tmp_path))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    expected = model.encode(QUERIES + DOCUMENTS)
    reloaded = DecoderEmbedder.from_pretrained(tmp_path, base_model=copy.deepcopy(embedder.model))
    assert reloaded.is_lora
    np.testing.assert_allclose(reloaded.encode(QUERIES + DOCUMENTS), expected, atol=1e-6)
    # the Trainer's resume path: a fresh LoRA model restores the adapter in place
    fresh = DecoderEmbedder(copy.deepcopy(embedder.model), tokenizer=embedder.tokenizer, lora=True)
    fresh.load_weights_from(tmp_path)
    np.testing.assert_allclose(fresh.encode(QUERIES + DOCUMENTS), expected, atol=1e-6)


def test_merge_lora_in_place(lora_run):
    model, _ = lora_run
    expected = model.encode(DOCUMENTS)
    merged = copy.deepcopy(model).merge_lora()
    assert not merged.is_lora
    assert not any("lora_" in key for key in merged.state_dict())
    np.testing.assert_allclose(merged.encode(DOCUMENTS), expected, atol=1e-5)


def test_merged_export_of_a_lora_variant_falls_back_to_peft_merge(embedder, tmp_path):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    model = DecoderEmbedder(get_peft_model(copy.deepcopy(embedder.model), config), tokenizer=embedder.tokenizer)
    with torch.no_grad():  # DoRA starts with magnitudes equal to the column norms, where it equals plain LoRA
        for name, parameter in model.named_parameters():
            if "lora_magnitude_vector" in name:
                parameter.mul_(1.0 + torch.rand_like(parameter))
    expected = model.encode(DOCUMENTS)
    model.save_pretrained(tmp_path, max_seq_length=MAX_LENGTH)
    reloaded = DecoderEmbedder.from_pretrained(tmp_path)
    np.testing.assert_allclose(reloaded.encode(DOCUMENTS), expected, atol=1e-5)
    assert model.is_lora


# ------------------------------------------------------------------------------------------------ sentence-transformers
def test_sentence_transformers_layout(merged_dir):
    modules = json.loads((merged_dir / "modules.json").read_text())
    assert [m["type"].rsplit(".", 1)[-1] for m in modules] == ["Transformer", "Pooling", "Normalize"]
    pooling = json.loads((merged_dir / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_lasttoken"] is True and pooling["include_prompt"] is True
    assert not any(v for k, v in pooling.items() if k.startswith("pooling_mode_") and k != "pooling_mode_lasttoken")
    assert json.loads((merged_dir / "sentence_bert_config.json").read_text())["max_seq_length"] == MAX_LENGTH
    st_config = json.loads((merged_dir / "config_sentence_transformers.json").read_text())
    assert st_config["prompts"] == {"query": f"Instruct: {DEFAULT_INSTRUCTION}\nQuery:", "document": ""}
    assert st_config["default_prompt_name"] is None
    saved_tokenizer = AutoTokenizer.from_pretrained(merged_dir)
    ids = saved_tokenizer("a wall")["input_ids"]
    assert ids == saved_tokenizer("a wall", add_special_tokens=False)["input_ids"] + [ENDOFTEXT_ID]


def test_sentence_transformer_reproduces_training_embeddings(lora_run, merged_dir):
    from sentence_transformers import SentenceTransformer

    model, _ = lora_run
    documents = DOCUMENTS + [LONG_DOCUMENT]  # the long one is truncated by both
    expected_queries = training_time_embeddings(model, QUERIES, DEFAULT_INSTRUCTION)
    expected_documents = training_time_embeddings(model, documents, None)
    st_model = SentenceTransformer(str(merged_dir), device="cpu")
    assert st_model.max_seq_length == MAX_LENGTH
    np.testing.assert_allclose(st_model.encode(QUERIES, prompt_name="query"), expected_queries, atol=1e-5)
    np.testing.assert_allclose(st_model.encode(documents), expected_documents, atol=1e-5)
    np.testing.assert_allclose(st_model.encode(documents, prompt_name="document"), expected_documents, atol=1e-5)
