"""The homogeneous multimodal transformer: trunk, modality tokenizers, shared head."""
from .homogeneous import HomogeneousTransformer, build_model, take_items
from .tokenizers import CodeSetTokenizer, ModalityTokenizer, PatchTokenizer, SignalTokenizer, TextTokenizer, build_tokenizer
from .trunk import load_text_tokenizer, load_trunk, minilm_path

__all__ = [
    "HomogeneousTransformer", "build_model", "take_items", "CodeSetTokenizer", "ModalityTokenizer", "PatchTokenizer",
    "SignalTokenizer", "TextTokenizer", "build_tokenizer", "load_text_tokenizer", "load_trunk", "minilm_path",
]
