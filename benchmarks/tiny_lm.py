"""Tiny causal language models built from configs (random weights, no download) and a word-level
tokenizer, for benchmarks/integrations.py and the integration tests."""
import torch


def tiny_llama(vocab, hidden, seed, tie=False, layers=1, dtype=torch.float32, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=256, tie_word_embeddings=tie, pad_token_id=1,
                         eos_token_id=2, bos_token_id=0, **extra)
    return LlamaForCausalLM(config).to(dtype)


def word_tokenizer(vocab):
    """A tokenizer whose words are t0 ... t{vocab-1} (t1 pads, t2 ends)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    words = models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(words), pad_token="t1",
                                   eos_token="t2")


def token_batch(batch, length, vocab, seed, prompt=3, padded_rows=1):
    """input_ids, attention_mask and labels [batch, length]: the first `prompt` tokens and the
    padding (the last 2 positions of the first `padded_rows` rows) are -100 in the labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[:padded_rows, -2:] = 0
    ids = ids.masked_fill(mask == 0, 1)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :prompt] = -100
    return ids, mask, labels
