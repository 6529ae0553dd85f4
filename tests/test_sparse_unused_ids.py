"""The sparse head drops the same token ids as FlagEmbedding's BGEM3FlagModel, for BERT and XLM-R vocabularies."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from ark_hf.models.bge_m3 import BGEM3Model, sparse_unused_token_ids

flag_embedding = pytest.importorskip("FlagEmbedding")

TEXTS = [
    "how do I renew a building permit",
    "A building permit can be renewed online before it expires. Ask the planning office [SEP] first.",
    "hi",
    "permit permit permit: the same token three times",
]


@pytest.fixture(scope="module")
def minilm_folder(minilm_path, tmp_path_factory):
    """The real MiniLM (BERT vocabulary: [CLS] ... [SEP], no EOS token) with fresh heads, saved by ark_hf."""
    torch.manual_seed(0)
    model = BGEM3Model(minilm_path, pooling="cls", init_missing_heads=True)
    with torch.no_grad():  # most tokens positive, so that a dropped id is visible as a missing key
        model.sparse_linear.bias.fill_(1.0)
    folder = tmp_path_factory.mktemp("m3_minilm") / "saved"
    model.save_pretrained(folder)
    return folder


def test_unused_ids_are_cls_eos_pad_unk(minilm_path, tiny_xlmr_path):
    bert = AutoTokenizer.from_pretrained(minilm_path)
    assert bert.eos_token_id is None
    assert sparse_unused_token_ids(bert) == sorted({bert.cls_token_id, bert.pad_token_id, bert.unk_token_id})
    assert bert.sep_token_id not in sparse_unused_token_ids(bert)
    xlmr = AutoTokenizer.from_pretrained(tiny_xlmr_path)  # BGE-M3's vocabulary: <s> </s> <pad> <unk>
    assert sparse_unused_token_ids(xlmr) == [0, 1, 2, 3]
    assert xlmr.mask_token_id not in sparse_unused_token_ids(xlmr)


def test_lexical_weights_equal_flagembedding_on_a_bert_vocabulary(minilm_folder):
    ours = BGEM3Model.from_pretrained(str(minilm_folder)).eval()
    theirs = flag_embedding.BGEM3FlagModel(str(minilm_folder), use_fp16=False, devices="cpu")
    our_weights = ours.encode(TEXTS, return_dense=False, return_sparse=True)["lexical_weights"]
    fe_weights = theirs.encode(TEXTS, return_dense=False, return_sparse=True)["lexical_weights"]
    sep = str(ours.tokenizer.sep_token_id)
    assert len(our_weights) == len(fe_weights) == len(TEXTS)
    for text, fe, mine in zip(TEXTS, fe_weights, our_weights):
        assert set(mine) == set(fe), text
        assert sep in mine, f"[SEP] dropped from {text!r}"
        assert str(ours.tokenizer.cls_token_id) not in mine
        for token, weight in fe.items():
            assert mine[token] == pytest.approx(float(weight), abs=1e-5), (text, token)
