"""What the bench tests share."""

from pidec.model import T5Config

# 1 encoder and 1 decoder layer, d_model 4, 2 heads of d_kv 2 (inner 4), gated d_ff 8, vocabulary 10
CFG = T5Config(
    vocab_size=10,
    d_model=4,
    d_kv=2,
    d_ff=8,
    num_layers=1,
    num_heads=2,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
)
