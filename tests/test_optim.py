"""Optimizer: Composer vs optax decoupled decay by hand, decay mask, schedules, non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from biomedlm_jax import optim

PARAMS = {"kernel": jnp.array([[1.0, -2.0], [0.5, 3.0]]), "bias": jnp.array([0.5, -1.0])}
GRADS = {"kernel": jnp.array([[0.1, 0.2], [-0.3, 0.4]]), "bias": jnp.array([0.05, -0.02])}


@pytest.mark.parametrize("mode", ["composer", "optax"])
def test_one_step_matches_hand_computation(mode):
    """Third step (mid-warmup, lr_t = peak/2) after two zero-gradient steps, so Adam's moments are known."""
    peak, wd = 1e-2, 0.1
    schedule = optim.lr_schedule(peak, warmup_steps=4, total_steps=10)
    tx = optim.adamw(schedule, peak, weight_decay=wd, decay_mode=mode, grad_clip_norm=None, skip_nonfinite=False)
    state = tx.init(PARAMS)
    for _ in range(2):
        _, state = tx.update(jax.tree.map(jnp.zeros_like, GRADS), state, PARAMS)
    lr_t = float(schedule(2))
    assert lr_t == pytest.approx(peak / 2)
    updates, _ = tx.update(GRADS, state, PARAMS)
    b2c = 1 - 0.95**3
    b1c = 1 - 0.9**3
    adam = {k: ((0.1 * g) / b1c) / (jnp.sqrt(0.05 * g * g / b2c) + 1e-8) for k, g in GRADS.items()}
    decay_factor = (lr_t / peak) * wd if mode == "composer" else lr_t * wd
    expected_kernel = -lr_t * adam["kernel"] - decay_factor * PARAMS["kernel"]
    expected_bias = -lr_t * adam["bias"]  # no decay on 1-D params
    np.testing.assert_allclose(updates["kernel"], expected_kernel, rtol=1e-5)
    np.testing.assert_allclose(updates["bias"], expected_bias, rtol=1e-5)


def test_composer_decay_is_independent_of_peak_lr():
    """Same schedule shape, 10x the peak LR: optax's decay grows 10x, Composer's does not."""
    zero = jax.tree.map(jnp.zeros_like, GRADS)
    for mode, ratio in (("composer", 1.0), ("optax", 10.0)):
        decays = []
        for peak in (1e-3, 1e-2):
            tx = optim.adamw(optim.lr_schedule(peak, 0, 10, decay="constant"), peak, weight_decay=0.1,
                             decay_mode=mode, grad_clip_norm=None, skip_nonfinite=False)
            updates, _ = tx.update(zero, tx.init(PARAMS), PARAMS)
            decays.append(float(updates["kernel"][0, 0]))
        assert decays[1] / decays[0] == pytest.approx(ratio, rel=1e-4)


def test_schedule_shapes():
    s = optim.lr_schedule(1.0, warmup_steps=10, total_steps=110, decay="cosine", final_ratio=0.1)
    assert float(s(0)) == 0.0 and float(s(5)) == pytest.approx(0.5) and float(s(10)) == pytest.approx(1.0)
    assert float(s(60)) == pytest.approx(0.55, rel=1e-3) and float(s(110)) == pytest.approx(0.1)
    lin = optim.lr_schedule(1.0, 0, 100, decay="linear", final_ratio=0.0)
    assert float(lin(50)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="decay"):
        optim.lr_schedule(1.0, 0, 10, decay="step")


def test_nonfinite_gradients_are_skipped_and_counted():
    tx = optim.adamw(optim.lr_schedule(1e-2, 0, 10), 1e-2, weight_decay=0.1)
    state = tx.init(PARAMS)
    bad = {"kernel": GRADS["kernel"].at[0, 0].set(jnp.nan), "bias": GRADS["bias"]}
    updates, state = tx.update(bad, state, PARAMS)
    assert all(float(jnp.abs(u).max()) == 0.0 for u in jax.tree.leaves(updates))
    assert [int(c) for c in optim.nonfinite_counts(state)] == [1, 1]
    updates, state = tx.update(GRADS, state, PARAMS)
    assert float(jnp.abs(updates["kernel"]).max()) > 0
    assert [int(c) for c in optim.nonfinite_counts(state)] == [0, 1]


def test_warmup_ratio_sets_the_warmup_like_hf_trainer():
    """warmup_ratio (BioMedLM's fine-tuning used 0.5) overrides warmup_steps: ceil(ratio * steps), then
    linear decay to 0 as HF's Trainer schedules it."""
    from biomedlm_jax import configlib, train

    c = configlib.train_config()
    c.num_train_steps, c.learning_rate, c.warmup_steps = 301, 2e-5, 7
    c.warmup_ratio, c.lr_decay, c.lr_final_ratio = 0.5, "linear", 0.0
    assert train.warmup_steps(c) == 151
    _, schedule = train.make_optimizer(c)
    np.testing.assert_allclose([schedule(0), schedule(151), schedule(226), schedule(301)], [0.0, 2e-5, 1e-5, 0.0],
                               atol=1e-12)
    c.warmup_ratio = 0.0
    assert train.warmup_steps(c) == 7
    c.warmup_ratio = 1.5
    with pytest.raises(ValueError, match="warmup_ratio must be within"):
        train.make_optimizer(c)
