"""Text: tokenizers (on the `tokenizers` / `sentencepiece` libraries) and pretrained word embeddings.

    tok = mltoolkit.text.load_tokenizer(folder)                  # what ships with a checkpoint
    tok = mltoolkit.text.train_tokenizer(texts, kind="bpe", vocab_size=8000)
    emb, vocab = mltoolkit.text.load_word2vec("vectors.bin")     # also load_glove, build_embedding
"""
from mltoolkit.text.embeddings import (
    Vocab,
    build_embedding,
    load_glove,
    load_word2vec,
    read_vectors,
)
from mltoolkit.text.tokenizers import BatchEncoding, Tokenizer, load_tokenizer, train_tokenizer

__all__ = ["Tokenizer", "BatchEncoding", "load_tokenizer", "train_tokenizer", "Vocab", "read_vectors",
           "load_word2vec", "load_glove", "build_embedding"]
