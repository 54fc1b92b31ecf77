"""Tiny Hugging Face models built from configs (random weights, seconds to build)."""

from __future__ import annotations

import torch
from transformers import (
    BartConfig, BartForConditionalGeneration, BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel,
    LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration,
)


def tiny_llama() -> torch.nn.Module:
    cfg = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96 + 17, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2() -> torch.nn.Module:
    cfg = GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=4, n_positions=64, n_inner=113)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bert() -> torch.nn.Module:
    cfg = BertConfig(vocab_size=97, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=113, max_position_embeddings=64)
    return BertForMaskedLM(cfg).eval()


def tiny_t5() -> torch.nn.Module:
    cfg = T5Config(vocab_size=97, d_model=64, d_kv=16, d_ff=113, num_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def tiny_bart() -> torch.nn.Module:
    cfg = BartConfig(vocab_size=97, d_model=64, encoder_layers=1, decoder_layers=2, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=113, decoder_ffn_dim=113,
                     max_position_embeddings=64)
    return BartForConditionalGeneration(cfg).eval()


#: name -> (builder, FFN path, is encoder-decoder)
TINY = {
    "llama": (tiny_llama, "model.layers.-1.mlp", False),
    "gpt2": (tiny_gpt2, "transformer.h.-1.mlp", False),
    "bert": (tiny_bert, "bert.encoder.layer.-1", False),
    "t5": (tiny_t5, "decoder.block.-1.layer.-1", True),
    "bart": (tiny_bart, "model.decoder.layers.-1", True),
}


def model_inputs(name: str, batch: int = 2, seq: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 97, (batch, seq), generator=g)
    if TINY[name][2]:
        return {"input_ids": ids, "decoder_input_ids": torch.randint(3, 97, (batch, 5), generator=g)}
    return {"input_ids": ids}
