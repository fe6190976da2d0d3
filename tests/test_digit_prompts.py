"""The text-conditional digits toy ('digits_text'): its prompts, the word tokenizer against
transformers.CLIPTokenizer, the prompt encodings against transformers' CLIP text model, and a
Meissonic-style teacher pretrained on it that loads back as a text-conditioned Teacher."""

from tests.optional import need

need("torch", "transformers")

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from configs import digits_text_teacher
from dimo_jax import clip_tokenizer, data, pretrain, teachers
from dimo_jax.teachers import meissonic
from dimo_jax.convert import clip as convert_clip
from dimo_jax.convert import common
from dimo_jax.data import digit_prompts, digits
from dimo_jax.data.digit_prompts import (HELD_OUT_TEMPLATE, TEMPLATES, WORDS, DigitPrompts,
                                         digit_prompts as make_prompts)

ATOL = 1e-4
# A tower small enough to build in a blink, its widths unlike each other so a swap shows.
ENCODER = dict(hidden_size=16, intermediate_size=24, num_attention_heads=2, projection_dim=12)


def _words(prompt: str):
  return set(clip_tokenizer.split_words(clip_tokenizer.normalize(prompt)))


def _names(digit: int):
  return {WORDS[digit], str(digit)}


def test_every_prompt_names_its_digit_and_no_other():
  prompts, labels = make_prompts(TEMPLATES)
  assert len(prompts) == len(set(prompts)) == 10 * len(TEMPLATES) == 50
  held_out, held_labels = make_prompts((HELD_OUT_TEMPLATE,))
  for prompt, label in zip(prompts + held_out, list(labels) + list(held_labels)):
    named = [d for d in range(10) if _words(prompt) & _names(d)]
    assert named == [label], prompt
  assert list(held_labels) == list(range(10)) and not set(held_out) & set(prompts)
  # The held-out template is new as a sentence, not in its words.
  assert set().union(*map(_words, held_out)) <= set().union(*map(_words, prompts))

  dataset = DigitPrompts.toy()
  assert dataset.prompts == prompts and dataset.held_out_prompts == held_out
  np.testing.assert_array_equal(dataset.prompt_labels, labels)
  tokens, indices = dataset.train_batch(np.random.default_rng(0), 256)
  assert tokens.shape == (256, 64) and indices.dtype == np.int32
  # Each digit comes with one of its own prompts, and every template is drawn.
  real_tokens, real_labels = digits.load_digit_tokens()
  label_of = {row.tobytes(): label for row, label in zip(real_tokens, real_labels)}
  np.testing.assert_array_equal(dataset.prompt_labels[indices],
                                [label_of[row.tobytes()] for row in tokens])
  assert len(set(indices % len(TEMPLATES))) == len(TEMPLATES)


def test_word_tokenizer_keeps_words_whole_and_matches_transformers(tmp_path):
  folder = str(tmp_path / "tokenizer")
  words = digit_prompts.prompt_words()
  ours = digit_prompts.write_word_vocabulary(folder, words, max_length=16)
  assert ours.max_length == 16
  for word in words:
    assert ours.encode(word) == [ours.vocab[word + clip_tokenizer.END_OF_WORD]], word

  prompts = list(make_prompts(TEMPLATES + (HELD_OUT_TEMPLATE,))[0])
  for prompt in prompts:
    assert ours.encode(prompt) == [ours.vocab[w + "</w>"] for w in prompt.split()], prompt
  reference = transformers.CLIPTokenizer.from_pretrained(folder)
  texts = prompts + ["", "a zebra of the number 42", "SEVEN!  eight"]
  expected = reference(texts, padding="max_length", truncation=True, max_length=16).input_ids
  np.testing.assert_array_equal(ours(texts), expected)
  # Whole words come from the vocabulary, not from the tokenizer: an unknown word falls apart.
  assert len(ours.encode("zebra")) > 1

  # Words that share pieces in every way stay whole, and each other word still splits.
  tricky = ["seven", "eleven", "even", "eve", "evening", "seventeen", "n", "!!", "é"]
  other = digit_prompts.write_word_vocabulary(str(tmp_path / "tricky"), tricky)
  for word in tricky:
    assert len(other.encode(word)) == 1, word
  with pytest.raises(ValueError, match="one lowercase CLIP word"):
    digit_prompts.word_vocabulary(["two words"])


def _torch_text_encoder(stack) -> transformers.CLIPTextModelWithProjection:
  """transformers' CLIP text model holding the toy encoder's weights (float64)."""
  e, vocab = stack.encoder, stack.tokenizer.vocab
  config = transformers.CLIPTextConfig(
      vocab_size=e.vocab_size, hidden_size=e.hidden_size, intermediate_size=e.intermediate_size,
      projection_dim=e.projection_dim, num_hidden_layers=e.num_hidden_layers,
      num_attention_heads=e.num_attention_heads, max_position_embeddings=e.max_position_embeddings,
      hidden_act=e.hidden_act, layer_norm_eps=e.layer_norm_eps, eos_token_id=e.eos_token_id,
      bos_token_id=vocab[digit_prompts.BOS_TOKEN], pad_token_id=e.eos_token_id)
  model = transformers.CLIPTextModelWithProjection(config).eval()
  state = {}
  for path, leaf in common.flatten(stack.variables["params"]).items():
    leaf = np.asarray(leaf, np.float64)
    state[convert_clip.torch_name(path)] = torch.from_numpy(
        leaf.T.copy() if path.endswith("kernel") else leaf)
  missing, unexpected = model.double().load_state_dict(state, strict=False)
  assert not unexpected and all(k.endswith("position_ids") for k in missing), (missing, unexpected)
  return model


def test_prompt_conditions_are_the_clip_encodings(tmp_path):
  dataset = DigitPrompts.toy(seed=3, **ENCODER)
  stack = dataset.text
  assert stack.encoder.hidden_size == 16 and stack.encoder.max_position_embeddings == 16
  # The written tokenizer folder is what transformers reads; the encodings come from its model.
  dataset.save_text(str(tmp_path))
  reference = _torch_text_encoder(stack)
  tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path / "tokenizer"))

  for conditions, texts in ((dataset.conditions, dataset.prompts),
                            (dataset.held_out_conditions, dataset.held_out_prompts)):
    e = conditions.embeddings
    assert e.prompts == tuple(texts) + ("",) and e.hidden.shape == (len(texts) + 1, 16, 16)
    ids = tokenizer(list(e.prompts), padding="max_length", max_length=16).input_ids
    with torch.no_grad():
      out = reference(torch.tensor(ids), output_hidden_states=True)
    np.testing.assert_allclose(e.hidden, out.hidden_states[-2].numpy(), atol=ATOL)
    np.testing.assert_allclose(e.pooled, out.text_embeds.numpy(), atol=ATOL)
  # The prompts are told apart: no two encodings alike.
  pooled = dataset.conditions.embeddings.pooled
  distances = np.linalg.norm(pooled[:, None] - pooled[None], axis=-1)
  assert distances[~np.eye(len(pooled), dtype=bool)].min() > 1e-3

  labels = np.array([7, 0, 7, 3])
  cond, held_cond = dataset.condition(labels), dataset.held_out_condition(labels)
  # Evaluation prompts name the digit asked for: the first template's, or the held-out one's.
  rows = labels * len(TEMPLATES)
  assert [dataset.prompts[r] for r in rows] == [f"a handwritten {WORDS[d]}" for d in labels]
  for c, e, index in ((cond, dataset.conditions.embeddings, rows),
                      (held_cond, dataset.held_out_conditions.embeddings, labels)):
    np.testing.assert_array_equal(c["hidden"], e.hidden[index])
    np.testing.assert_array_equal(c["pooled"], e.pooled[index])
    # No negative prompt: a dropped condition and guidance both see the empty prompt.
    for key in ("uncond_hidden", "neg_hidden"):
      np.testing.assert_array_equal(c[key], np.broadcast_to(e.hidden[-1], (4, 16, 16)))
    np.testing.assert_array_equal(c["micro_conds"], np.tile([8, 8, 0, 0, 6], (4, 1)))
  drawn = dataset.train_conditions(5, 8, 2)
  assert drawn["generator"].shape == (8,) and drawn["auxiliary"].shape == (2, 8)
  assert drawn["auxiliary"].max() < 50
  np.testing.assert_array_equal(drawn["generator"], dataset.train_conditions(5, 8, 2)["generator"])


def _tiny_config():
  config = digits_text_teacher.get_config()
  config.text_encoder.update(ENCODER, projection_dim=16)
  config.model.update(num_layers=1, num_single_layers=1, attention_head_dim=8,
                      num_attention_heads=2, joint_attention_dim=16, pooled_projection_dim=16,
                      axes_dims_rope=(2, 2, 4))
  config.batch_size, config.num_steps, config.warmup_steps, config.log_every = 32, 60, 5, 10
  config.lr = 3e-3
  return config


def test_pretraining_writes_a_text_teacher_that_reads_its_prompts(tmp_path):
  config = _tiny_config()
  path = pretrain.pretrain(config, str(tmp_path))

  with open(os.path.join(path, "model.json")) as f:
    description = json.load(f)
  assert description["kind"] == "meissonic" and description["token_grid"] == [8, 8]
  assert description["resolution"] == 8 and description["prompt_length"] == 16
  assert description["scheduler"] == {"mask_token_id": 17, "masking_schedule": "cosine"}
  losses = description["pretraining"]["losses"]
  assert len(losses) == 6 and losses[-1] < losses[0] - 0.2, losses
  assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]  # nothing half-written left

  teacher = teachers.load(path)
  assert isinstance(teacher, teachers.Teacher) and teacher.text_conditioned
  assert teacher.text.tokenizer.max_length == 16 and teacher.codebook_size == 17
  # The saved text stack is the one pretraining encoded with.
  loaded = data.get(ml_collections.ConfigDict(dict(dataset="digits_text", teacher_path=path)))
  fresh = DigitPrompts.toy(**config.text_encoder.to_dict())
  np.testing.assert_array_equal(loaded.conditions.embeddings.hidden,
                                fresh.conditions.embeddings.hidden)
  labels = np.arange(10)
  cond = loaded.condition(labels)
  own = meissonic.prompt_condition(teacher, [loaded.prompts[d * len(TEMPLATES)] for d in labels])
  np.testing.assert_allclose(own["hidden"], cond["hidden"], atol=1e-6)
  np.testing.assert_allclose(own["micro_conds"], cond["micro_conds"])

  tokens = jnp.full((10, 64), teacher.mask_id, jnp.int32)
  logits = teacher.logits(tokens, cond)
  assert logits.shape == (10, 64, 17) and np.isfinite(np.asarray(logits)).all()



def test_pretraining_step_feeds_each_digit_its_prompt_and_drops_to_the_empty_one():
  config = _tiny_config()
  dataset = data.get(config)
  tokens, cond = pretrain.train_batch(dataset, np.random.default_rng(1), 8)
  same_tokens, indices = dataset.train_batch(np.random.default_rng(1), 8)
  np.testing.assert_array_equal(tokens, same_tokens)
  np.testing.assert_array_equal(cond["hidden"], dataset.conditions.embeddings.hidden[indices])
  np.testing.assert_array_equal(cond["pooled"], dataset.conditions.embeddings.pooled[indices])

  teacher = pretrain.build_teacher(config)
  model, variables = teacher.model, teacher.init_variables(jax.random.PRNGKey(0))
  other = dataset.conditions.condition((indices + 25) % 50)  # the digits 5 apart

  def losses(drop_label):
    """The step's loss on the digits' own prompts and on the other prompts."""
    config.drop_label = drop_label
    tx = pretrain.make_optimizer(config)
    state = pretrain.PretrainState(jnp.int32(0), variables, tx.init(variables))
    step = jax.jit(pretrain.make_train_step(config, model, tx))
    return [float(step(state, jnp.asarray(tokens), c, jax.random.PRNGKey(2))[1])
            for c in (cond, other)]

  # The loss reads the prompt, unless every condition is dropped to the empty prompt.
  kept, dropped = losses(0.0), losses(1.0)
  assert abs(kept[0] - kept[1]) > 1e-4, kept
  assert dropped[0] == pytest.approx(dropped[1], abs=1e-6), dropped


def test_text_model_must_fit_the_encoder(tmp_path):
  config = _tiny_config()
  config.model.joint_attention_dim = 24
  with pytest.raises(ValueError, match="joint_attention_dim"):
    pretrain.pretrain(config, str(tmp_path))
