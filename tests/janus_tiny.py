"""A tiny random Janus model and processor, built offline (no hub), that really generates images.

The config follows ../shared/ECOSYSTEM.md §1.2: transformers' own test config cannot generate images (its aligner
width and image-token count do not match), this one can. The tokenizer is a word-level tokenizer made here with
the special tokens Janus's processor needs.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    JanusConfig,
    JanusForConditionalGeneration,
    JanusImageProcessorPil,
    JanusProcessor,
    PreTrainedTokenizerFast,
)

SPECIAL = ["<s>", "<pad>", "</s>", "<image_placeholder>", "<end_of_image>", "<begin_of_image>", "<unk>"]
WORDS = ["<|User|>:", "<|Assistant|>:", "a", "an", "red", "blue", "cat", "dog", "sofa", "on", "the", "photo", "of"]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|User|>: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}"
    "{% endfor %}{% if add_generation_prompt %} <|Assistant|>:{% endif %}"
)


def tiny_janus_config(**vq) -> JanusConfig:
    return JanusConfig(
        text_config=dict(
            model_type="llama",
            vocab_size=99,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=37,
            max_position_embeddings=512,
            pad_token_id=1,
            bos_token_id=0,
            eos_token_id=2,
        ),
        vision_config=dict(
            image_size=16,
            patch_size=4,
            num_image_tokens=16,
            hidden_size=32,
            projection_dim=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            mlp_ratio=2,
        ),
        vq_config={
            "embed_dim": 8,
            "num_embeddings": 32,
            "latent_channels": 8,
            "base_channels": 32,
            "channel_multiplier": [1, 1, 1],
            "projection_dim": 32,
            "image_token_embed_dim": 32,
            **vq,
        },
        image_token_id=3,
    )


def tiny_janus_processor() -> JanusProcessor:
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={
            "image_token": "<image_placeholder>",
            "boi_token": "<begin_of_image>",
            "eoi_token": "<end_of_image>",
        },
        padding_side="left",
    )
    return JanusProcessor(
        image_processor=JanusImageProcessorPil(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, num_image_tokens=16
    )


def tiny_janus_model(seed: int = 0) -> JanusForConditionalGeneration:
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = JanusForConditionalGeneration(tiny_janus_config()).eval()
    model.generation_config.generation_kwargs = {"boi_token_id": 5}
    model.generation_config.bos_token_id = 0
    model.generation_config.pad_token_id = 1
    # As in a released checkpoint: a saved copy loads this generation config instead of re-deriving one.
    model.generation_config._from_model_config = False
    return model
