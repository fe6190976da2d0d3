"""Test-only NumPy forward pass of google-research/maskgit's transformer (eval mode).

Written from maskgit/nets/maskgit_transformer.py's description: BERT with post-LN blocks
(LayerNorm eps 1e-12, tanh-approximate GELU), word + position embeddings, and an MLM head
tied to the word embeddings plus a bias. Reads the release's nested parameter dict as stored
in its msgpack checkpoint and takes the release's input layout: class token (label + V)
first, then the visual tokens, the mask being -1 (the last vocabulary row).
"""

import numpy as np

EPS = 1e-12


def _layer_norm(x, p):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + EPS) * p["scale"] + p["bias"]


def _gelu(x):
  return 0.5 * x * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x**3)))


def _dense(x, p):
  return x @ p["kernel"] + p["bias"]


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def _self_attention(x, p):
  """x: [B, S, D]; query/key/value kernels [D, H, K], out kernel [H, K, D]."""
  q, k, v = (np.einsum("bsd,dhk->bhsk", x, p[n]["kernel"]) + p[n]["bias"][None, :, None]
             for n in ("query", "key", "value"))
  weights = _softmax(np.einsum("bhqk,bhsk->bhqs", q, k) / np.sqrt(q.shape[-1]))
  heads = np.einsum("bhqs,bhsk->bqhk", weights, v)
  return np.einsum("bqhk,hkd->bqd", heads, p["out"]["kernel"]) + p["out"]["bias"]


def _float64(tree):
  return {k: _float64(v) if isinstance(v, dict) else np.asarray(v, np.float64)
          for k, v in tree.items()}


def forward(variables, ids):
  """Logits of the release's transformer.

  Args:
    variables: {"params": {...}} as the release's checkpoint stores them (numpy arrays).
    ids: int[B, 1 + L], class token first, mask -1.

  Returns:
    float64[B, 1 + L, vocab]: logits over the whole vocabulary at every position.
  """
  p = _float64(variables["params"])
  emb = p["Embed_0"]
  table = emb["word_embeddings"]["embedding"]
  x = table[np.asarray(ids)] + emb["position_embeddings"]["embedding"][: ids.shape[1]]
  x = _layer_norm(x, emb["embeddings_ln"])
  i = 0
  while f"TransformerLayer_{i}" in p:
    attn = p[f"TransformerLayer_{i}"]["Attention_0"]
    x = _layer_norm(_self_attention(x, attn["self_attention"]) + x, attn["attention_output_ln"])
    mlp = p[f"TransformerLayer_{i}"]["Mlp_0"]
    y = _dense(_gelu(_dense(x, mlp["intermediate_output"])), mlp["layer_output"])
    x = _layer_norm(y + x, mlp["layer_output_ln"])
    i += 1
  head = p["MlmLayer_0"]
  h = _layer_norm(_gelu(_dense(x, head["mlm_dense"])), head["mlm_ln"])
  return h @ table.T + head["mlm_bias"]["bias"]
