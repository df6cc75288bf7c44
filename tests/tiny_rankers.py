"""Tiny random-weight rankers of every supported architecture family, made in the test: encoder
cross-encoders and decoder-only rerankers (``*ForSequenceClassification``, one logit, last-token
pooling), each with a fast tokenizer saved beside it, as users bring them."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from rankserve.builder.export import DECODER_ARCHITECTURES, ENCODER_ARCHITECTURES

DECODERS = tuple(sorted(DECODER_ARCHITECTURES))
ENCODERS = tuple(sorted(ENCODER_ARCHITECTURES))


@lru_cache(maxsize=None)
def _bpe(specials: tuple[str, ...]):
    """A small BPE vocabulary trained on the WANDS queries."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    from rankserve.data.wands import load_queries

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    lines = [f"{q.text} {q.query_class}" for q in load_queries()]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=600, special_tokens=list(specials), show_progress=False))
    return tok.to_str()


def decoder_tokenizer(out: Path, padding_side: str = "right", pad_is_eos: bool = False, append_eos: bool = True):
    """Qwen/Llama-like: no [CLS]/[SEP], pairs as ``q t <eos>`` (or ``q t``), pad id 2 (not 0)."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_bpe(("<unk>", "<eos>", "<pad>")))
    if append_eos:
        eos = tok.token_to_id("<eos>")
        tok.post_processor = processors.TemplateProcessing(single="$A:0 <eos>:0", pair="$A:0 $B:1 <eos>:1",
                                                           special_tokens=[("<eos>", eos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<eos>" if pad_is_eos else "<pad>", eos_token="<eos>",
                                 unk_token="<unk>", padding_side=padding_side, model_input_names=["input_ids", "attention_mask"])
    hf.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def roberta_tokenizer(out: Path):
    """RoBERTa/XLM-R-like: ``<s> q </s></s> t </s>``, pad id 1, no token types."""
    from tokenizers import Tokenizer, processors
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_bpe(("<s>", "<pad>", "</s>", "<unk>", "<mask>")))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", sep_token="</s>", cls_token="<s>",
                                 pad_token="<pad>", unk_token="<unk>", mask_token="<mask>",
                                 model_input_names=["input_ids", "attention_mask"])
    hf.save_pretrained(out)
    return AutoTokenizer.from_pretrained(out)


def bert_tokenizer(out: Path):
    from transformers import AutoTokenizer

    from rankserve.train.finetune import pretrained_encoder_dir

    tok = AutoTokenizer.from_pretrained(pretrained_encoder_dir())
    tok.save_pretrained(out)
    return tok


def _config(arch: str, tok, set_pad: bool):
    from transformers import AutoConfig

    common = dict(vocab_size=len(tok), num_labels=1, max_position_embeddings=512, initializer_range=0.2,
                  pad_token_id=tok.pad_token_id if set_pad else None)
    if arch in DECODER_ARCHITECTURES:
        kw = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                  eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=False)
        if arch in ("qwen3", "gemma", "gemma2", "gemma3_text"):
            kw["head_dim"] = 8
        return AutoConfig.for_model(arch, **kw, **common)
    small = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    kw = {"bert": small,
          "roberta": {**small, "type_vocab_size": 1, "bos_token_id": 0, "eos_token_id": 2},
          "xlm-roberta": {**small, "type_vocab_size": 1, "bos_token_id": 0, "eos_token_id": 2},
          "distilbert": dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64),
          "modernbert": {**small, "cls_token_id": tok.cls_token_id, "sep_token_id": tok.sep_token_id,
                         "bos_token_id": tok.cls_token_id, "eos_token_id": tok.sep_token_id,
                         "global_attn_every_n_layers": 2, "local_attention": 16},
          "deberta-v2": {**small, "relative_attention": True, "position_buckets": 32, "pos_att_type": ["p2c", "c2p"],
                         "max_relative_positions": -1, "position_biased_input": False, "type_vocab_size": 0}}[arch]
    return AutoConfig.for_model(arch, **kw, **common)


def make_ranker(arch: str, out: Path, padding_side: str = "right", pad_is_eos: bool = False, append_eos: bool = True,
                set_pad: bool = True, seed: int = 0) -> Path:
    """A 2-layer, 32-wide ``arch`` ranker with random weights, saved with its tokenizer in ``out``."""
    import torch
    from transformers import AutoModelForSequenceClassification

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if arch in DECODER_ARCHITECTURES:
        tok = decoder_tokenizer(out, padding_side, pad_is_eos, append_eos)
    elif arch in ("roberta", "xlm-roberta"):
        tok = roberta_tokenizer(out)
    else:
        tok = bert_tokenizer(out)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(_config(arch, tok, set_pad), attn_implementation="eager").eval()
    model.save_pretrained(out, safe_serialization=True)
    return out
