"""Di[M]O's token-level distribution matching: the gradient sent to the generator's logits.

For a masked position of the re-masked generator sample x~_t, with p_phi the (guided) teacher
and p_psi the auxiliary model's prediction of the clean token,

  FKL:          g = p_psi - p_phi
  RKL:          g = p_psi * (log p_psi - log p_phi - KL(p_psi || p_phi))
  Jeffreys(b):  g = (1 - b) * g_FKL + b * g_RKL       (b = 0 is FKL, b = 1 is RKL)

g is treated as a constant (no gradient flows through either network) and is applied to the
generator logits z_theta through the surrogate 1/2 ||z_theta - sg(z_theta - g)||^2, whose gradient
with respect to z_theta is exactly g.
"""

import jax
import jax.numpy as jnp


def jeffreys_beta(distil_loss_type: str) -> float:
  """The weight b of the reverse KL: `FKL` -> 0, `RKL` -> 1, `Jeffreys_<b>` -> b."""
  if distil_loss_type == "FKL":
    return 0.0
  if distil_loss_type == "RKL":
    return 1.0
  prefix = "Jeffreys_"
  if distil_loss_type.startswith(prefix):
    try:
      beta = float(distil_loss_type[len(prefix):])
    except ValueError:
      beta = None
    if beta is not None and 0.0 <= beta <= 1.0:
      return beta
  raise ValueError(
      f"distil_loss_type must be 'FKL', 'RKL' or 'Jeffreys_<beta>' with beta in [0, 1], "
      f"got {distil_loss_type!r}")


def logit_gradient(
    teacher_logits: jax.Array,
    fake_logits: jax.Array,
    distil_loss_type: str,
    teacher_temp: float = 1.0,
    fake_temp: float = 1.0,
) -> jax.Array:
  """Per-token gradient g for the generator logits (no masking, no stop-gradient applied).

  Args:
    teacher_logits: float[..., V], the guided teacher logits (the `true` model).
    fake_logits: float[..., V], the auxiliary (`fake`) model's logits.
    distil_loss_type: `FKL`, `RKL` or `Jeffreys_<beta>`.
    teacher_temp, fake_temp: softmax temperatures (`true_temp`, `fake_temp`).

  Returns:
    float32[..., V], the same shape as the logits.
  """
  if teacher_logits.shape != fake_logits.shape:
    raise ValueError(f"teacher logits {teacher_logits.shape} and auxiliary logits "
                     f"{fake_logits.shape} must have the same shape")
  beta = jeffreys_beta(distil_loss_type)
  log_p_true = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / teacher_temp, axis=-1)
  log_p_fake = jax.nn.log_softmax(fake_logits.astype(jnp.float32) / fake_temp, axis=-1)
  p_true, p_fake = jnp.exp(log_p_true), jnp.exp(log_p_fake)
  grad = jnp.zeros_like(p_fake)
  if beta < 1.0:
    grad += (1.0 - beta) * (p_fake - p_true)
  if beta > 0.0:
    log_ratio = log_p_fake - log_p_true
    kl = jnp.sum(p_fake * log_ratio, axis=-1, keepdims=True)
    grad += beta * p_fake * (log_ratio - kl)
  return grad


def surrogate_loss(
    gen_logits: jax.Array, grad: jax.Array, mask: jax.Array, loss_reduction: str = "sum"
) -> jax.Array:
  """The generator loss whose gradient with respect to `gen_logits` is the masked g.

  Args:
    gen_logits: float[B, L, V], z_theta (differentiated).
    grad: float[B, L, V], g from `logit_gradient` (treated as a constant).
    mask: bool[B, L], the positions masked by the forward process; g is zero elsewhere.
    loss_reduction: `sum` (summed, divided by the batch size, as the reference) or `mean`
      (averaged over every entry).

  Returns:
    float32[] loss. Non-finite entries of g are zeroed so one bad token cannot poison a step.
  """
  grad = jnp.where(mask[..., None], grad, 0.0)
  grad = jax.lax.stop_gradient(jnp.where(jnp.isfinite(grad), grad, 0.0))
  z = gen_logits.astype(jnp.float32)
  sq = jnp.square(z - jax.lax.stop_gradient(z - grad))
  if loss_reduction == "sum":
    return 0.5 * jnp.sum(sq) / z.shape[0]
  if loss_reduction == "mean":
    return 0.5 * jnp.mean(sq)
  raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")


# --- the auxiliary model's loss ---------------------------------------------------------------

def label_smoothed_ce(logits: jax.Array, targets: jax.Array, mask: jax.Array,
                      smoothing: float) -> jax.Array:
  """torch's cross_entropy(label_smoothing=s, ignore_index) averaged over `mask`: float32[]."""
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]
  per_token = (1.0 - smoothing) * nll - smoothing * jnp.mean(log_p, axis=-1)
  return jnp.sum(jnp.where(mask, per_token, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def soft_kl(logits: jax.Array, target_logits: jax.Array, mask: jax.Array,
            temperature: float) -> jax.Array:
  """The reference's soft distillation term: t^2 * mean over the codebook of
  p_t (log p_t - log q_t), p_t = softmax(target / t), q_t = softmax(logits / t), averaged over
  `mask`: float32[]."""
  target = jax.nn.softmax(target_logits / temperature)
  log_q = jax.nn.log_softmax(logits / temperature)
  kl = jnp.mean(target * (jnp.log(jnp.maximum(target, 1e-30)) - log_q), axis=-1)
  kl = kl * temperature**2
  return jnp.sum(jnp.where(mask, kl, 0.0)) / jnp.maximum(jnp.sum(mask), 1)
