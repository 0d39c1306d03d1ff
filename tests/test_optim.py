"""Optimizer: Composer vs optax decoupled decay by hand, decay mask, schedules, non-finite guard."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from biomedlm_jax.training import optim

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
    from biomedlm_jax.training import configlib, trainer

    c = configlib.train_config()
    c.num_train_steps, c.learning_rate, c.warmup_steps = 301, 2e-5, 7
    c.warmup_ratio, c.lr_decay, c.lr_final_ratio = 0.5, "linear", 0.0
    assert trainer.warmup_steps(c) == 151
    _, schedule = trainer.make_optimizer(c)
    np.testing.assert_allclose([schedule(0), schedule(151), schedule(226), schedule(301)], [0.0, 2e-5, 1e-5, 0.0],
                               atol=1e-12)
    c.warmup_ratio = 0.0
    assert trainer.warmup_steps(c) == 7
    c.warmup_ratio = 1.5
    with pytest.raises(ValueError, match="warmup_ratio must be within"):
        trainer.make_optimizer(c)


def _params_and_grads(seed=0):
    r = np.random.default_rng(seed)
    params = {"w": jnp.asarray(r.normal(size=(16, 8)), jnp.float32), "b": jnp.asarray(r.normal(size=(8,)), jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(r.normal(size=p.shape) * 3, jnp.float32), params) for _ in range(4)]
    return params, grads


def test_apply_step_skips_like_apply_if_finite_and_otherwise_equals_it():
    params, grads = _params_and_grads()
    grads[2] = dict(grads[2], b=grads[2]["b"].at[0].set(jnp.nan))
    sched = optim.lr_schedule(1e-2, 1, 10)
    ours_tx = optim.skip_if_nonfinite(optim.adamw(sched, 1e-2, weight_decay=0.1, skip_nonfinite=False))
    ref_tx = optax.apply_if_finite(optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam(b1=0.9, b2=0.95),
                                               optax.scale_by_learning_rate(sched),
                                               optim.add_schedule_scaled_decay(0.1, sched, 1e-2, mask=optim.decay_mask)),
                                   max_consecutive_errors=2**31 - 1)
    p1, s1, p2, s2 = params, ours_tx.init(params), params, ref_tx.init(params)
    for i, g in enumerate(grads):
        before = p1
        p1, s1 = jax.jit(lambda p, s, g: optim.apply_step(ours_tx, g, s, p))(p1, s1, g)
        u, s2 = ref_tx.update(g, s2, p2)
        p2 = optax.apply_updates(p2, u)
        jax.tree.map(np.testing.assert_array_equal, p1, p2)
        assert [int(x) for x in optim.nonfinite_counts(s1)] == [int(x) for x in optim.nonfinite_counts(s2)]
        if i == 2:  # skipped: params unchanged, counted
            jax.tree.map(np.testing.assert_array_equal, p1, before)
            assert [int(x) for x in optim.nonfinite_counts(s1)] == [1, 1]


def test_bf16_moments_with_folded_clipping_follow_fp32_adam():
    params, grads = _params_and_grads(1)
    sched = optim.lr_schedule(1e-2, 1, 10)
    ref = optim.adamw(sched, 1e-2, weight_decay=0.1)
    low = optim.adamw(sched, 1e-2, weight_decay=0.1, mu_dtype="bfloat16", nu_dtype="bfloat16")
    exact = optim.adamw(sched, 1e-2, weight_decay=0.1, mu_dtype="float32", nu_dtype="float32")  # folded clip, fp32
    states = [t.init(params) for t in (ref, low, exact)]
    assert {x.dtype for x in jax.tree.leaves(states[1]) if x.ndim == 2} == {jnp.dtype(jnp.bfloat16)}  # moments in bf16
    ps = [params] * 3
    for g in grads:
        out = [optim.apply_step(t, g, s, p) for t, s, p in zip((ref, low, exact), states, ps)]
        ps, states = [o[0] for o in out], [o[1] for o in out]
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), ps[0], ps[2])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=2e-3), ps[0], ps[1])
