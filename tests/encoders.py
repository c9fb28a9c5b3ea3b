"""Tiny encoder checkpoints of the real architectures, written the way the hub lays them out
(config.json, model.safetensors, tokenizer.json, preprocessor_config.json, 1_Pooling/ for
sentence-transformers folders), for the dense retrieval tests. No download: random weights, a
word-level vocabulary, and one CLIP whose weights are set by hand so that it sees colour.
"""
import json
import os

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (BertConfig, BertModel, CLIPConfig, CLIPImageProcessorPil, CLIPModel, PreTrainedTokenizerFast,
                          SiglipConfig, SiglipImageProcessorPil, SiglipModel)

WORDS = "the a of is in on red blue green yellow photo cat dog city river tower bridge old new".split()


def _tokenizer(folder, max_length, cls_sep=False):
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if cls_sep:  # BERT's "[CLS] text [SEP]": CLS pooling reads the first position
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                            sep_token="[SEP]", model_max_length=max_length).save_pretrained(folder)
    return len(vocab)


def colour_clip(folder):
    """A CLIP whose image embedding is the mean direction of its patches' colours: the patch
    embedding reads each patch's mean (r, g, b) as [r, g, b, -r, -g, -b], attention is uniform and
    copies, the MLP adds nothing, the projection is the identity. A crop of a photo then lands
    next to the photo, as a trained CLIP's would."""
    os.makedirs(folder, exist_ok=True)
    n = _tokenizer(folder, 16)
    config = CLIPConfig(
        text_config=dict(vocab_size=n, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=6, intermediate_size=12, num_hidden_layers=1, num_attention_heads=1,
                           image_size=32, patch_size=8),
        projection_dim=6)
    model = CLIPModel(config)
    vision = model.vision_model
    with torch.no_grad():
        patch = torch.zeros(6, 3, 8, 8)
        for c in range(3):
            patch[c, c], patch[c + 3, c] = 1 / 64, -1 / 64
        vision.embeddings.patch_embedding.weight.copy_(patch)
        vision.embeddings.class_embedding.zero_()
        vision.embeddings.position_embedding.weight.zero_()
        attention = vision.encoder.layers[0].self_attn
        for proj in (attention.q_proj, attention.k_proj):
            proj.weight.zero_()
            proj.bias.zero_()
        for proj in (attention.v_proj, attention.out_proj):
            proj.weight.copy_(torch.eye(6))
            proj.bias.zero_()
        vision.encoder.layers[0].mlp.fc2.weight.zero_()
        vision.encoder.layers[0].mlp.fc2.bias.zero_()
        model.visual_projection.weight.copy_(torch.eye(6))
    model.save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                          image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)
    return folder


def tiny_siglip(folder):
    os.makedirs(folder, exist_ok=True)
    n = _tokenizer(folder, 16)
    config = SiglipConfig(
        text_config=dict(vocab_size=n, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=16,
                         pad_token_id=0, bos_token_id=2, eos_token_id=3),
        vision_config=dict(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))
    torch.manual_seed(0)
    SiglipModel(config).save_pretrained(folder)
    SiglipImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def tiny_bert(folder, pooling="mean"):
    """A BERT-style text encoder in a sentence-transformers folder that declares its pooling, as
    BGE (cls) and e5 (mean) do."""
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    n = _tokenizer(folder, 32, cls_sep=True)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=n, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=32)).save_pretrained(folder)
    with open(os.path.join(folder, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 8, "pooling_mode_cls_token": pooling == "cls",
                   "pooling_mode_mean_tokens": pooling == "mean"}, f)
    return folder
