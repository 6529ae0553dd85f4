"""A left-padded decoder batch trains finite: no attention row without a key reaches the attention kernel.

The mechanism (seen on CUDA in bf16): with a causal mask and LEFT padding, the query rows of the leading pad
positions may attend to no key. CUDA's fused SDPA kernels write 0 for such a row in the forward pass but
recompute its probabilities in the backward pass as `exp(s - logsumexp(s))`, with `logsumexp = -inf`: NaN,
which reaches every weight gradient through the pad rows. torch's CPU kernels use a safe softmax and stay
finite, so this test registers an attention implementation computing what the fused kernels compute (float64,
autograd through `exp(s - lse)`, zero output for rows without a key) and checks both the mechanism (a raw
left-padded backbone call gives non-finite gradients) and the fix (`DecoderEmbedder` does not).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

from ark_hf.models.decoder import DecoderEmbedder, move_padding_right

NAME = "fused_kernel_semantics"
TEXTS = ["a short one", "a much longer text with many more words than the first text has", "mid length text here"]


def fused_kernel_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = (query.double() @ key.double().transpose(-1, -2)) * scaling
    if attention_mask is None:  # no padding: transformers lets the kernel apply the causal mask itself
        length = scores.shape[-1]
        attention_mask = torch.ones(length, length, dtype=torch.bool, device=scores.device).tril()
    scores = scores.masked_fill(~attention_mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    out = torch.exp(scores - lse) @ value.double()
    out = torch.where(torch.isfinite(lse), out, torch.zeros_like(out))  # the kernels' forward: 0 for such rows
    return out.to(query.dtype).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module")
def model(tiny_qwen3_path):
    AttentionInterface.register(NAME, fused_kernel_attention)
    AttentionMaskInterface.register(NAME, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])
    torch.manual_seed(0)
    embedder = DecoderEmbedder(tiny_qwen3_path, attn_implementation=NAME, padding_free=False)
    embedder.tokenizer.padding_side = "left"
    return embedder


def _grads_finite(model) -> bool:
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    return all(bool(torch.isfinite(g).all()) for g in grads)


def test_the_mechanism_a_left_padded_causal_batch_gives_nan_gradients(model):
    features = model.tokenize(TEXTS, max_length=32)
    assert (features["attention_mask"][:, 0] == 0).any()  # left padding: some row starts with pads
    model.zero_grad()
    hidden = model.model(**features, use_cache=False).last_hidden_state
    assert torch.isfinite(hidden).all()  # the forward pass is finite ...
    (hidden * features["attention_mask"].unsqueeze(-1)).sum().backward()
    assert not _grads_finite(model)  # ... the backward pass is not


def test_decoder_embedder_trains_finite_on_left_padded_batches(model):
    features = model.tokenize(TEXTS, max_length=32)
    model.zero_grad()
    embeddings = model.encode_features(features).dense
    (embeddings @ embeddings.T).logsumexp(-1).sum().backward()
    assert _grads_finite(model)


def test_left_and_right_padding_give_the_same_embeddings(tiny_qwen3_path):
    embedder = DecoderEmbedder(tiny_qwen3_path, attn_implementation="sdpa")
    outputs = {}
    for side in ("left", "right"):
        embedder.tokenizer.padding_side = side
        with torch.no_grad():
            outputs[side] = embedder.encode_features(embedder.tokenize(TEXTS, max_length=32)).dense
    torch.testing.assert_close(outputs["left"], outputs["right"], atol=1e-5, rtol=1e-5)


def test_move_padding_right_rotates_each_row():
    ids = torch.tensor([[0, 0, 5, 6], [7, 8, 9, 1], [3, 4, 0, 0]])
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
    moved_ids, moved_mask = move_padding_right(ids, mask)
    assert moved_ids.tolist() == [[5, 6, 0, 0], [7, 8, 9, 1], [3, 4, 0, 0]]
    assert moved_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
