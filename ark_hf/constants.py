"""One home for the names and templates that several modules share."""

from __future__ import annotations

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_SUBFOLDER",
    "ADAPTER_WEIGHT_FILES",
    "DEFAULT_INSTRUCTION",
    "QWEN_EOS_TOKEN",
    "QWEN_QUERY_FORMAT",
]

# Qwen3-Embedding's query template (`get_detailed_instruct`): instruction, then the query; no space after `Query:`.
QWEN_QUERY_FORMAT = "Instruct: {}\nQuery:{}"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# Qwen's end-of-text token. Qwen3-Embedding's tokenizer declares `<|im_end|>` as eos but appends this one
# (it is also the pad token), so it is preferred whenever the vocabulary has it.
QWEN_EOS_TOKEN = "<|endoftext|>"
# peft's adapter files; a full save of a LoRA model also keeps the adapter in ADAPTER_SUBFOLDER, so a checkpoint
# can resume LoRA training and a merge can read adapters.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
ADAPTER_SUBFOLDER = "lora_adapter"
