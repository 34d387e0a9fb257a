"""Build a tiny Llama (random weights, ~160k parameters) with its own tokenizer, offline,
and a tiny BERT embedding model the same way (`build_bert`).

Model hubs are unreachable from the build machines, so the real-vLLM tests make
their model: a 2-layer Llama (hidden 64, 2 heads of 32: vLLM's CPU attention
needs head_dim 32/64/80/…), a byte-level BPE tokenizer trained on a small
built-in corpus, and a jinja chat template. Deterministic: same files every time.

Run as a script to build them: `python -m tests.tinymodel DIR [BERT_DIR]`.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

VERSION = "1"  # bump when the recipe changes: the cache key includes it
BERT_VERSION = "1"
# The tiny BERT's Matryoshka sizes: `dimensions` works only with them (as vllm serve).
BERT_DIMENSIONS = [16, 32, 64]

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}"
    "{% else %}{% set text = message['content'] | map(attribute='text') | join('') %}{% endif %}"
    "<|{{ message['role'] }}|>{{ text }}{{ eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_CORPUS = """
Once upon a time there was a little model that answered every question with a story.
The quick brown fox jumps over the lazy dog. Hello! How are you today?
Tell me a story about a dragon, a castle, and a brave knight who loved numbers.
What is the capital of France? Paris is the capital of France.
Write a haiku about the sea. Waves fold into foam; the tide keeps its own counsel.
One two three four five six seven eight nine ten eleven twelve.
{"name": "Ada", "age": 36, "city": "London"} JSON objects have keys and values.
Summarise the following text in one sentence. Translate to German: good morning.
"""


def default_cache_dir() -> Path:
    base = os.environ.get("SPOOLD_TEST_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "spoold-tests"
    )
    return Path(base) / f"tiny-llama-v{VERSION}"


def _publish(tmp: Path, target: Path) -> Path:
    """A model built in `tmp` renamed into place at `target`, whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:
        if not (target / "config.json").exists():  # lost a race to another builder: fine
            raise
    return target


def default_bert_dir() -> Path:
    return default_cache_dir().parent / f"tiny-bert-v{BERT_VERSION}"


def build(target: Path) -> Path:
    """Build the model into `target` (atomically: a temp dir renamed into place)."""
    if (target / "config.json").exists():
        return target
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)

    specials = ["<s>", "</s>", "<unk>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n") * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 512
    fast.save_pretrained(tmp)

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=512,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=False,
        torch_dtype="float32",
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(tmp, safe_serialization=True)
    # No sampling defaults in generation_config: vllm serve and spoold both use
    # vLLM's own defaults, which is what the fidelity test compares.
    (tmp / "generation_config.json").write_text(
        json.dumps(
            {
                "bos_token_id": fast.bos_token_id,
                "eos_token_id": fast.eos_token_id,
                "pad_token_id": fast.pad_token_id,
            }
        )
    )
    return _publish(tmp, target)


def build_bert(target: Path) -> Path:
    """A 2-layer BERT (hidden 64, 2 heads of 32) with a WordPiece tokenizer: vLLM loads
    `BertModel` as its BertEmbeddingModel (CLS pooling, normalised) with the pooling
    runner. Weights drawn at scale 0.2, not BERT's 0.02: at 0.02 every input maps to
    nearly the same vector (notes/vllm-on-cpu.md). Deterministic, built atomically."""
    if (target / "config.json").exists():
        return target
    import torch
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(
        vocab_size=600, special_tokens=specials, show_progress=False
    )
    tok.train_from_iterator(_CORPUS.split("\n") * 20, trainer=trainer)
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    fast.model_max_length = 512
    fast.save_pretrained(tmp)

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        pad_token_id=fast.pad_token_id,
        torch_dtype="float32",
    )
    model = BertModel(config)
    model.save_pretrained(tmp, safe_serialization=True)
    # Declared Matryoshka sizes: `dimensions` is honoured only for a model with them.
    cfg_path = tmp / "config.json"
    saved = json.loads(cfg_path.read_text())
    saved["matryoshka_dimensions"] = BERT_DIMENSIONS
    cfg_path.write_text(json.dumps(saved, indent=2))
    return _publish(tmp, target)


if __name__ == "__main__":
    print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else default_cache_dir()))
    if len(sys.argv) > 2:
        print(build_bert(Path(sys.argv[2])))
