"""Word-level tokenizers and small text-encoder configs for the mini model, built offline.

The mini model's captions (the procedural scenes of the training lab in ``examples/mini_model/``)
use a closed vocabulary of a few dozen words (``WORDS``), so each word is one token (``tokenizers``
WordLevel model, lower-cased, split on whitespace and punctuation; unknown words map to ``<unk>``).
Two flavours serve diffusers' FluxPipeline:

* CLIP-style (``tokenizer``): ``<s> words </s>``, padded with ``<pad>``. CLIPTextModel pools the
  hidden state at the first ``eos_token_id``, so the config's ``eos_token_id`` must be EOS_ID
  (not 2, which transformers treats as the legacy "argmax id" rule).
* T5-style (``tokenizer_2``): ``words </s>``, padded with ``<pad>`` (id 0, T5's convention).

Both are ``PreTrainedTokenizerFast`` objects: ``save_pretrained(dir)`` writes tokenizer.json and
``AutoTokenizer.from_pretrained(dir)`` (or FluxPipeline.from_pretrained) reads them back offline.

Token ids (shared by both): 0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``, 3 ``<s>``, then ``WORDS`` in
sorted order. The ids are baked into the shipped model's text encoders, so ``WORDS`` is fixed here
rather than derived from the lab's caption grammar; the lab's tests check that its grammar
(``mini_lab.dataset.vocabulary()``) still makes exactly these words.
"""

from __future__ import annotations

# Every word (and punctuation token) a caption can contain, sorted: the token ids 4.. in this order.
WORDS: tuple[str, ...] = (
    ",", "a", "an", "and", "at", "background", "black", "blue", "bottom", "center", "checkered",
    "circle", "cross", "cyan", "diamond", "gradient", "green", "horizontal", "in", "large", "left",
    "on", "pink", "plain", "red", "right", "small", "square", "striped", "the", "to", "top",
    "triangle", "vertical", "white", "yellow",
)  # fmt: skip

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>", "<s>")
PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, 3
# Longest caption: 3 objects x 8 words + ", " + "and" + 8 background words = 34, plus <s> and </s>.
MAX_TEXT_TOKENS = 40


def token_vocab() -> dict[str, int]:
    """Token -> id, special tokens first."""
    return {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS)}


def vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(WORDS)


def _backend(add_bos: bool):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel(vocab=token_vocab(), unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # words and punctuation runs
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>",
            pair="<s> $A </s> $B </s>",
            special_tokens=[("<s>", BOS_ID), ("</s>", EOS_ID)],
        )
    else:
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", EOS_ID)]
        )
    return tok


def _wrap(backend, max_length: int, add_bos: bool):
    from transformers import PreTrainedTokenizerFast

    if max_length < 3:
        raise ValueError(f"max_length must be >= 3 (room for a word, <s> and </s>), got {max_length}")
    kwargs = dict(eos_token="</s>", unk_token="<unk>", pad_token="<pad>")
    if add_bos:
        kwargs["bos_token"] = "<s>"
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=max_length, padding_side="right", **kwargs
    )


def build_clip_tokenizer(max_length: int = MAX_TEXT_TOKENS):
    """CLIP-style tokenizer: ``<s> ... </s>``; ``model_max_length`` = ``max_length`` (FluxPipeline pads
    CLIP input to it, so CLIPTextConfig.max_position_embeddings must be >= it)."""
    return _wrap(_backend(add_bos=True), max_length, add_bos=True)


def build_t5_tokenizer(max_length: int = MAX_TEXT_TOKENS):
    """T5-style tokenizer: ``... </s>``. FluxPipeline pads T5 input to its ``max_sequence_length``
    argument (default 512!), not to this; pass ``max_sequence_length=MAX_TEXT_TOKENS``."""
    return _wrap(_backend(add_bos=False), max_length, add_bos=False)


def build_tokenizers(max_length: int = MAX_TEXT_TOKENS):
    """(clip_tokenizer, t5_tokenizer) for FluxPipeline's ``tokenizer`` and ``tokenizer_2``."""
    return build_clip_tokenizer(max_length), build_t5_tokenizer(max_length)


def clip_text_config(**overrides):
    """A small ``CLIPTextConfig`` matching the CLIP-style tokenizer (override any field).

    FluxPipeline uses ``pooler_output`` (size ``hidden_size``), so the transformer's
    ``pooled_projection_dim`` must equal ``hidden_size``.
    """
    from transformers import CLIPTextConfig

    cfg = dict(
        vocab_size=vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_TEXT_TOKENS,
        projection_dim=64,
        hidden_act="gelu",
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )
    cfg.update(overrides)
    return CLIPTextConfig(**cfg)


def t5_config(**overrides):
    """A small ``T5Config`` (T5 v1.1 style, gated-gelu) for ``T5EncoderModel`` (override any field).

    The transformer's ``joint_attention_dim`` must equal ``d_model``.
    """
    from transformers import T5Config

    cfg = dict(
        vocab_size=vocab_size(),
        d_model=64,
        d_kv=32,
        d_ff=128,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=16,
        relative_attention_max_distance=MAX_TEXT_TOKENS,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
    )
    cfg.update(overrides)
    return T5Config(**cfg)


def flux_text_dims(clip_config, t5_config) -> dict:
    """The FluxTransformer2DModel config fields that must match the text encoders."""
    return dict(joint_attention_dim=t5_config.d_model, pooled_projection_dim=clip_config.hidden_size)


__all__ = [
    "BOS_ID",
    "EOS_ID",
    "MAX_TEXT_TOKENS",
    "PAD_ID",
    "SPECIAL_TOKENS",
    "UNK_ID",
    "WORDS",
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_tokenizers",
    "clip_text_config",
    "flux_text_dims",
    "t5_config",
    "token_vocab",
    "vocab_size",
]
