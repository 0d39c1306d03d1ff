"""The BioMedLM / GPT-2 decoder in Flax linen.

`GPTConfig` (every knob, with the HF `GPT2Config` name where one exists) and the `VARIANTS` table are
in `gpt_config.py`. Read this file top to bottom: the modules from the inside out (`Attention`, `MLP`,
`Block`, `GPT`), then the helpers around them: init, embedding resize, the transposed decode head, the
KV cache, and the scan layout of the weights (`stack_layers` / `unstack_layers`).

Architecture (identical math to HF `GPT2LMHeadModel`, so HF checkpoints load 1:1 via `formats/hf.py`):

    tokens (B, T) -> wte + wpe -> dropout
      -> n_layer x Block:  x = x + Attn(LN1(x));  x = x + MLP(LN2(x))      (pre-LayerNorm)
      -> LN_f -> logits = x @ wte.T                                       (head tied to embedding)

Dtype policy: parameters are stored in `param_dtype` (fp32 master weights); matmuls run in `dtype`
(bf16 on accelerators). LayerNorm, the attention softmax and the logits are computed in fp32, because
bf16 has only 8 bits of mantissa and these are the places where that loses accuracy.

Sharding: every parameter carries *logical* axis names (`nn.with_logical_partitioning`) and the main
activations carry logical constraints. Names used:

    params:      vocab, embed, heads, kv, mlp, norm, positions, layers (stacked layers with scan)
    activations: activation_batch, activation_length, activation_embed, activation_heads,
                 activation_kv, activation_mlp, activation_vocab

Parameter and activation names are distinct so a rule set can map e.g. `embed -> fsdp` and
`activation_batch -> (data, fsdp)` without one mesh axis appearing twice in a spec. The mapping from
logical names to mesh axes lives in the training config, not here; outside a mesh these are no-ops.

Attention uses `jax.nn.dot_product_attention`, so on GPU the cuDNN flash kernel can be chosen with
`attention_impl="cudnn"`. That function has no dropout, so when attention dropout is active (training
with `attn_pdrop > 0`) the same math runs through an explicit einsum path with dropout on the probs.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from biomedlm_jax.models.gpt_config import ACTIVATIONS, GPTConfig


def _dense_init(config: GPTConfig, scale: float = 1.0):
    return nn.initializers.normal(stddev=config.initializer_range * scale)



class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 whatever the compute dtype; output cast back to `dtype`.

    Params `scale` and `bias` (HF: weight, bias), stored in `param_dtype`.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        C = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (C,), cfg.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)), (C,), cfg.param_dtype)
        x = x.astype(jnp.float32)
        mean = x.mean(-1, keepdims=True)
        var = jnp.square(x - mean).mean(-1, keepdims=True)
        y = (x - mean) * jax.lax.rsqrt(var + cfg.layer_norm_epsilon)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(cfg.dtype)



def project(x, kernel, n: int):
    """`tensordot(x, kernel)` (as a `lax.dot_general`, which Qwix intercepts) over x's last n axes and kernel's first n, computed as one 2-D matmul:
    x as (rows, *inputs) against kernel as (*inputs, *outputs).

    Same products and the same autodiff, but XLA:CPU lays out the backward pass better. The weight
    gradient contracts the batch * length rows, the major axis of both x and the output gradient g.
    From the multi-axis form, XLA:CPU transposed g rather than x, and fused into that transpose the
    whole elementwise chain producing g (LayerNorm backward and the residual-gradient sum, recomputed
    in each reader): ~165 ms of bench-cpu's 1,000 ms train step. On 2-D x it runs the plain dot with
    x transposed in place: 1,060 -> 795 ms per step. Only x's leading axes and the input axes are
    merged; the kernel's output axes stay, so a heads axis sharded by tensor parallelism is never
    merged with an unsharded one (batch with length, or heads with head_dim, keep the sharded axis
    major)."""
    lead, ins, outs = x.shape[: x.ndim - n], x.shape[x.ndim - n:], kernel.shape[n:]
    # The kernel is used as stored (no reshape): Qwix's PTQ (models/quantize.py) finds it as the parameter
    # and stores its int8 copy in this shape, with the parameter's logical axes. XLA merges the
    # contracted axes (minor in both operands) into one without a copy.
    dims = ((tuple(range(1, n + 1)), tuple(range(n))), ((), ()))
    y = jax.lax.dot_general(x.reshape(-1, *ins), kernel, dims)
    return y.reshape(*lead, *outs)



@jax.custom_vjp
def tied_head(h, emb):
    """Logits (B, T, V) in fp32 = h (B, T, C) . emb (V, C), with autodiff's gradients written out.

    Autodiff forms emb's gradient as g^T h, which made XLA:CPU transpose the (B*T, V) logits
    gradient (237 MB at bench-cpu's batch 8 x 256, 53 ms). Here it is (h^T g)^T: the transposed
    operand is h (C wide) and the transposed result is (C, V). The dtypes are autodiff's: fp32
    gradient products, cast to the inputs' dtypes."""
    return jnp.einsum("btc,vc->btv", h, emb, preferred_element_type=jnp.float32)



def _tied_head_fwd(h, emb):
    return tied_head(h, emb), (h, emb)



def _tied_head_bwd(res, g):
    h, emb = res
    dh = jax.lax.dot_general(g, emb, (((2,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    demb_t = jax.lax.dot_general(h, g, (((0, 1), (0, 1)), ((), ())), preferred_element_type=jnp.float32)  # (C, V)
    return dh.astype(h.dtype), demb_t.T.astype(emb.dtype)



tied_head.defvjp(_tied_head_fwd, _tied_head_bwd)



class Projection(nn.Module):
    """y = x @ kernel + bias, contracting the last len(in_shape) axes of x.

    kernel has shape in_shape + out_shape, so per-head layouts like (d, 3, heads, head_dim) are plain
    parameters that carry one logical name per axis (flax's DenseGeneral initialises a flattened
    kernel, which cannot carry those names under nn.scan).
    """

    config: GPTConfig
    in_shape: tuple
    out_shape: tuple
    kernel_axes: tuple
    bias_axes: tuple
    init_scale: float = 1.0
    lora_target: Optional[str] = None  # one of LORA_TARGETS: gets adapters when the config enables it

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        cfg = self.config
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(_dense_init(cfg, self.init_scale), self.kernel_axes),
            tuple(self.in_shape) + tuple(self.out_shape),
            cfg.param_dtype,
        )
        bias = self.param(
            "bias", nn.with_logical_partitioning(nn.initializers.zeros, self.bias_axes), tuple(self.out_shape), cfg.param_dtype
        )
        # promote_dtype rather than astype: under Qwix PTQ the kernel is an int8 array that Qwix's
        # interception of promote_dtype leaves as it is (models/quantize.py).
        xc, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=cfg.dtype)
        y = project(xc, kernel, len(self.in_shape))
        if self.lora_target is not None and cfg.lora_on(self.lora_target):
            y = y + self._lora(x, deterministic)
        return y + bias.astype(cfg.dtype)

    def _lora(self, x, deterministic: bool):
        """(alpha / r) * dropout(x) A B. A is initialised as PEFT does (Kaiming-uniform, a = sqrt(5):
        U(-1/sqrt(fan_in), 1/sqrt(fan_in))), B with zeros."""
        cfg, n, r = self.config, len(self.in_shape), self.config.lora_rank
        fan_in = int(np.prod(self.in_shape))
        bound = 1.0 / np.sqrt(fan_in)
        a = self.param("lora_a", nn.with_logical_partitioning(
            lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, -bound, bound),
            tuple(self.kernel_axes[:n]) + (None,)), tuple(self.in_shape) + (r,), cfg.param_dtype)
        b = self.param("lora_b", nn.with_logical_partitioning(nn.initializers.zeros, (None,) + tuple(self.kernel_axes[n:])),
                       (r,) + tuple(self.out_shape), cfg.param_dtype)
        x = nn.Dropout(rate=cfg.lora_dropout)(x, deterministic=deterministic or cfg.lora_dropout == 0.0)
        h = project(x.astype(cfg.dtype), a.astype(cfg.dtype), n)  # (..., r)
        y = project(h, b.astype(cfg.dtype), 1)
        return y * jnp.asarray(cfg.lora_alpha / r, cfg.dtype)



class Attention(nn.Module):
    """Causal multi-head self-attention.

    `c_attn` is HF's fused QKV projection (d, 3d) stored as (d, 3, heads, head_dim), so tensor
    parallelism can shard heads without splitting the fused matrix in the wrong place; `c_proj` is
    (heads, head_dim, d). `formats/hf.py` reshapes to and from HF's 2-D Conv1D layout.
    """

    config: GPTConfig

    @nn.compact
    def __call__(self, x, attention_mask, layer_idx, deterministic: bool, cache=None, cache_index=None):
        """cache: optional {"k", "v"} of (B * H, S_max, hd) for incremental decoding. The new keys/values
        are written at slots [cache_index, cache_index + T); with `attention_mask` (B, S_max) queries
        attend to cache slots <= their own absolute slot that the mask marks real; with (B, T, S_max) to
        exactly the slots it marks (the engine's ring-buffer cache, where slot order is not token
        order: learned positions are added to the input, so attention needs no slot order). Returns
        (y, new cache)."""
        cfg = self.config
        # x: (B, T, C)
        C, H, hd = cfg.d_model, cfg.n_head, cfg.head_dim
        qkv = Projection(
            cfg, (C,), (3, H, hd), ("embed", None, "heads", "kv"), (None, "heads", "kv"), lora_target="qkv",
            name="c_attn",
        )(x, deterministic)  # (B, T, 3, H, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, hd)
        act_spec = ("activation_batch", "activation_length", "activation_heads", "activation_kv")
        q, k, v = (nn.with_logical_constraint(t, act_spec) for t in (q, k, v))

        # Scores are accumulated and soft-maxed in fp32 by jax.nn.dot_product_attention (bf16 x bf16
        # products are exact in fp32), which is what HF's `reorder_and_upcast_attn` upcast achieves;
        # that flag therefore needs no extra step here.
        scale = cfg.head_dim**-0.5 if cfg.scale_attn_weights else 1.0
        if cfg.scale_attn_by_inverse_layer_idx:
            if isinstance(layer_idx, int):  # plain layer loop: a static per-layer float
                scale = scale / (layer_idx + 1)
            elif cfg.attention_impl != "cudnn":  # under nn.scan the index is traced; XLA takes a traced scale
                scale = scale / (layer_idx.astype(jnp.float32) + 1.0)
            else:  # cuDNN needs a static scale: fold 1/(i+1) into q instead (one extra rounding in bf16)
                q = q * (1.0 / (layer_idx.astype(jnp.float32) + 1.0)).astype(q.dtype)

        if cache is not None:  # decoding: attend over the preallocated cache, causality by absolute position
            # The cache is laid out (B * H, S, hd) ("heads_major"): batch and head lead, so both einsums
            # contract without transposing the whole cache every step (only the new token's q/k/v are
            # transposed), and merged, so the update and its reader see one shape. With (B, H, S, hd) at
            # batch 1, XLA:CPU dropped the unit batch axis for the dot, fused the in-place update into
            # both the dot's operand and the loop output, and copied every cache buffer three times per
            # token (0.5 of 1.7 ms per token for bench-cpu). On TPU the compiler wants the sequence axis
            # major (a step's column is then whole tiles) and copied a heads-major cache in and out of
            # the decode loop, one more KV cache of HBM: there it is (S, B * H, hd) ("seq_major";
            # GPTConfig.kv_cache_layout).
            B, T = q.shape[0], q.shape[1]
            qh, kh, vh = (t.transpose(0, 2, 1, 3).reshape(B * H, T, hd) for t in (q, k, v))  # (B*H, T, hd)
            kh, vh = kh.astype(cache["k"].dtype), vh.astype(cache["v"].dtype)
            seq_major = cfg.kv_seq_major
            if seq_major:
                kh, vh = kh.transpose(1, 0, 2), vh.transpose(1, 0, 2)  # (T, B*H, hd)
            axis = 0 if seq_major else 1  # the sequence axis of one layer's cache
            if cache["k"].ndim == 4:
                # the whole stacked cache (n_layer, ...), broadcast into a scanned layer: read this layer's
                # rows and return only the new columns; `GPT.decode` writes all layers' columns into the
                # stacked buffer after the scan, in place. (Carrying the cache as the scan's per-layer
                # input/output built a second full cache: scan outputs are fresh buffers.)
                layer = lambda c: jax.lax.dynamic_index_in_dim(c, layer_idx, 0, keepdims=False)  # noqa: E731
                k = jax.lax.dynamic_update_slice_in_dim(layer(cache["k"]), kh, cache_index, axis=axis)
                v = jax.lax.dynamic_update_slice_in_dim(layer(cache["v"]), vh, cache_index, axis=axis)
                new_cache = {"k": kh, "v": vh}
            else:
                k = jax.lax.dynamic_update_slice_in_dim(cache["k"], kh, cache_index, axis=axis)
                v = jax.lax.dynamic_update_slice_in_dim(cache["v"], vh, cache_index, axis=axis)
                new_cache = {"k": k, "v": v}
            S = k.shape[axis]
            kv = "snd" if seq_major else "nsd"
            if attention_mask.ndim == 3:  # (B, T, S) per query: the caller's whole mask, causality included
                mask = attention_mask[:, None].astype(bool)  # (B, 1, T, S)
            else:  # (B, S): causal by absolute cache slot
                q_pos = cache_index + jnp.arange(T)  # (T,)
                causal = jnp.arange(S)[None, :] <= q_pos[:, None]  # (T, S)
                mask = causal[None, None] & attention_mask[:, None, None, :].astype(bool)  # (B, 1, T, S)
            scores = jnp.einsum(f"ntd,{kv}->nts", qh, k.astype(q.dtype), preferred_element_type=jnp.float32) * scale
            scores = scores.reshape(B, H, T, S)
            probs = jax.nn.softmax(jnp.where(mask, scores, jnp.finfo(jnp.float32).min), axis=-1)  # fp32
            y = jnp.einsum(f"nts,{kv}->ntd", probs.reshape(B * H, T, S).astype(v.dtype), v)
            y = y.reshape(B, H, T, hd).transpose(0, 2, 1, 3).astype(cfg.dtype)
            y = nn.with_logical_constraint(y, act_spec)
            y = Projection(
                cfg, (H, hd), (C,), ("heads", "kv", "embed"), ("embed",), (2 * cfg.n_layer) ** -0.5,
                lora_target="attn_out", name="c_proj",
            )(y)
            return y, new_cache

        # attention_mask: (B, S) True for real tokens, or (B, T, S) per query (packed segments);
        # combined with causality below.
        if attention_mask is None:
            mask = None
        elif attention_mask.ndim == 3:
            mask = attention_mask[:, None, :, :].astype(bool)
        else:
            mask = attention_mask[:, None, None, :].astype(bool)
        if mask is not None and cfg.attention_impl == "cudnn":  # cuDNN wants the full (B, 1, T, S) mask
            mask = jnp.broadcast_to(mask, (q.shape[0], 1, q.shape[1], k.shape[1]))
        if not deterministic and cfg.attn_pdrop > 0.0:
            y = _attention_with_dropout(q, k, v, mask, scale, self.make_rng("dropout"), cfg.attn_pdrop)
        else:
            impl = None if cfg.attention_impl == "auto" else cfg.attention_impl
            y = jax.nn.dot_product_attention(
                q, k, v, mask=mask, scale=scale, is_causal=True, implementation=impl
            )  # (B, T, H, hd); scores and softmax in fp32 inside
        y = nn.with_logical_constraint(y.astype(cfg.dtype), act_spec)

        # GPT-2 scales residual projections by 1/sqrt(2 * n_layer) at init.
        y = Projection(
            cfg, (H, hd), (C,), ("heads", "kv", "embed"), ("embed",), (2 * cfg.n_layer) ** -0.5,
            lora_target="attn_out", name="c_proj",
        )(y, deterministic)  # (B, T, C)
        return nn.Dropout(rate=cfg.resid_pdrop)(y, deterministic=deterministic), None



def _attention_with_dropout(q, k, v, mask, scale, rng, rate):
    """Same math as jax.nn.dot_product_attention (fp32 scores/softmax), plus dropout on the probs."""
    T, S = q.shape[1], k.shape[1]
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    keep = jnp.tril(jnp.ones((T, S), bool))[None, None]
    if mask is not None:
        keep = keep & mask
    scores = jnp.where(keep, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = probs * jax.random.bernoulli(rng, 1.0 - rate, probs.shape) / (1.0 - rate)
    return jnp.einsum("bhts,bshd->bthd", probs.astype(v.dtype), v)



class MLP(nn.Module):
    config: GPTConfig

    @nn.compact
    def __call__(self, x, deterministic: bool):
        cfg = self.config
        C, F = cfg.d_model, cfg.ffn_dim
        h = Projection(cfg, (C,), (F,), ("embed", "mlp"), ("mlp",), lora_target="mlp_in", name="c_fc")(
            x, deterministic)  # (B, T, 4C)
        h = nn.with_logical_constraint(h, ("activation_batch", "activation_length", "activation_mlp"))
        h = ACTIVATIONS[cfg.activation](h)
        y = Projection(
            cfg, (F,), (C,), ("mlp", "embed"), ("embed",), (2 * cfg.n_layer) ** -0.5, lora_target="mlp_out",
            name="c_proj",
        )(h, deterministic)  # (B, T, C)
        return nn.Dropout(rate=cfg.resid_pdrop)(y, deterministic=deterministic)



class Block(nn.Module):
    """Pre-LayerNorm transformer block. Returns `(x, new_cache)` (None without a cache), so it can be
    the body of `nn.scan` (then given the whole stacked cache, it returns its layer's new columns)."""

    config: GPTConfig

    @nn.compact
    def __call__(self, x, attention_mask, layer_idx, deterministic: bool, cache=None, cache_index=None):
        cfg = self.config
        y, new_cache = Attention(cfg, name="attn")(
            LayerNorm(cfg, name="ln_1")(x), attention_mask, layer_idx, deterministic, cache, cache_index
        )
        x = x + y
        x = x + MLP(cfg, name="mlp")(LayerNorm(cfg, name="ln_2")(x), deterministic)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        return x, new_cache



def _block_class(cfg: GPTConfig):
    """Block, wrapped in nn.remat when a rematerialisation policy is configured."""
    if cfg.remat_policy == "none":
        return Block
    policy = {
        "full": None,  # save nothing: recompute the whole block in the backward pass
        "dots_saveable": jax.checkpoint_policies.dots_saveable,
        "dots_with_no_batch_dims_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    }[cfg.remat_policy]
    # static_argnums counts `self` as 0: (x=1, attention_mask=2, layer_idx=3, deterministic=4, cache=5,
    # cache_index=6). The layer index is static in a plain loop (a per-layer constant) and a scanned
    # value under nn.scan.
    static = (4,) if cfg.scan_layers else (3, 4)
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers, static_argnums=static)



class GPT(nn.Module):
    """GPT-2 language model. `__call__` returns fp32 logits; `hidden_states` the final-LN features."""

    config: GPTConfig

    def setup(self):
        cfg = self.config
        self.wte = nn.Embed(
            cfg.vocab_size,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(_dense_init(cfg), ("vocab", "embed")),
        )
        self.wpe = nn.Embed(
            cfg.n_positions,
            cfg.d_model,
            dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=nn.with_logical_partitioning(_dense_init(cfg), ("positions", "embed")),
        )
        self.drop = nn.Dropout(rate=cfg.embd_pdrop)
        block = _block_class(cfg)
        if cfg.scan_layers:
            # One traced block, params stacked as (n_layer, ...): compile time independent of depth.
            self.h = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                # mask, layer, det., cache (the whole stack: see Attention), index
                in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast, nn.broadcast),
                length=cfg.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(cfg)
        else:
            self.h = [block(cfg, name=f"h_{i}") for i in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg)

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                      segment_ids=None):
        """Final-LayerNorm features (B, T, C) in `dtype`; the MCQA heads read these.

        input_ids: (B, T) int. attention_mask: optional (B, T), 1/True for real tokens; masked keys
        are never attended to. position_ids: optional (B, T); default 0..T-1 (as HF does).
        segment_ids: optional (B, T) for rows packing several examples: a token attends only to earlier
        tokens of its own segment (0 = padding); pass per-segment position_ids with it.
        """
        cfg = self.config
        B, T = input_ids.shape
        if T > cfg.n_positions:
            raise ValueError(f"sequence length {T} exceeds n_positions={cfg.n_positions}")
        if position_ids is None:
            position_ids = jnp.broadcast_to(jnp.arange(T)[None, :], (B, T))
        if segment_ids is not None:
            same = (segment_ids[:, :, None] == segment_ids[:, None, :]) & (segment_ids[:, None, :] > 0)  # (B, T, S)
            attention_mask = same if attention_mask is None else same & attention_mask[:, None, :].astype(bool)
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        x = self.drop(x, deterministic=deterministic)
        if cfg.scan_layers:
            x, _ = self.h(x, attention_mask, jnp.arange(cfg.n_layer), deterministic, None, None)
        else:
            for i, block in enumerate(self.h):
                x, _ = block(x, attention_mask, i, deterministic)
        return self.ln_f(x)

    def decode(self, input_ids, kv_mask, position_ids, cache, cache_index, head=None):
        """Incremental forward for generation: (fp32 logits (B, T, V), new cache).

        input_ids / position_ids: (B, T), the tokens at cache slots [cache_index, cache_index + T).
        kv_mask: (B, S_max) True for cache slots holding real tokens (left padding is False), causal by
        slot; or (B, T, S_max), each query's visible slots (no causality implied; see `Attention`).
        cache: from `init_cache`: {"k", "v"} of (n_layer, B * H, S_max, hd) with scan_layers, else a list
        of per-layer {"k", "v"} of (B * H, S_max, hd); S_max first with `config.kv_seq_major`.
        Deterministic (no dropout).
        head: optional `transposed_head(params)`, computed once per generation (see `logits`).
        """
        cfg = self.config
        x = self.wte(input_ids) + self.wpe(position_ids)  # (B, T, C)
        x = nn.with_logical_constraint(x, ("activation_batch", "activation_length", "activation_embed"))
        if cfg.scan_layers:  # each layer returns its new columns (n_layer, B*H, T, hd): one in-place write
            x, cols = self.h(x, kv_mask, jnp.arange(cfg.n_layer), True, cache, cache_index)
            new_cache = {n: jax.lax.dynamic_update_slice_in_dim(cache[n], cols[n], cache_index,
                                                                axis=1 if cfg.kv_seq_major else 2)
                         for n in ("k", "v")}
        else:  # one buffer per layer, each updated in place (no re-stacking per token)
            new_cache = []
            for i, block in enumerate(self.h):
                x, c = block(x, kv_mask, i, True, cache[i], cache_index)
                new_cache.append(c)
        return self.logits(self.ln_f(x), head), new_cache

    def logits(self, hidden, head=None):
        """Tied LM head: (B, T, C) @ wte.T -> (B, T, V), accumulated and returned in fp32.

        head: optional (C, V) copy of wte.T in `dtype` (`transposed_head`). Decoding multiplies one token
        per row by the whole head every step; XLA:CPU runs that matmul up to 1.7x faster with the
        vocabulary minor, so generation pays for the transposed copy once instead of per token.
        """
        h = hidden.astype(self.config.dtype)
        if head is None:
            emb = self.wte.embedding.astype(self.config.dtype)
            logits = tied_head(h, emb)
        elif hasattr(head, "qvalue"):  # int8 (C, V) with (1, V) scales (quantize.quantized_head): dequantize after
            logits = jnp.einsum("btc,cv->btv", h, head.qvalue.astype(self.config.dtype),
                                preferred_element_type=jnp.float32) * head.scale.astype(jnp.float32)
        else:
            logits = jnp.einsum("btc,cv->btv", h, head.astype(self.config.dtype), preferred_element_type=jnp.float32)
        return nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))

    def __call__(self, input_ids, attention_mask=None, position_ids=None, deterministic: bool = True,
                 segment_ids=None):
        return self.logits(self.hidden_states(input_ids, attention_mask, position_ids, deterministic, segment_ids))



def init_params(model: GPT, rng: jax.Array, batch: int = 1, seq: int = 8):
    """Random init with plain (unboxed) arrays. Sharded init lives with the trainer (jit+out_shardings)."""
    ids = jnp.zeros((batch, min(seq, model.config.n_positions)), jnp.int32)
    return nn.unbox(model.init(rng, ids)["params"])



def resize_embeddings(params: dict, new_vocab: int) -> dict:
    """Grow `wte` to `new_vocab` rows for added tokens (MCQA's [PAD]/[SEP], seq2seq's <|startoftext|>).
    Old rows are unchanged; new rows are their mean (transformers' resize_token_embeddings default).
    The LM head is tied to `wte`, so it grows consistently. Returns new params (the same when already
    `new_vocab` rows)."""
    wte = np.asarray(params["wte"]["embedding"])
    if new_vocab == wte.shape[0]:
        return params
    if new_vocab < wte.shape[0]:
        raise ValueError(f"cannot shrink the vocabulary from {wte.shape[0]} to {new_vocab}")
    extra = np.repeat(wte.mean(0, keepdims=True), new_vocab - wte.shape[0], axis=0)
    return dict(params, wte={"embedding": jnp.asarray(np.concatenate([wte, extra]).astype(wte.dtype))})



def transposed_head(params, cfg: GPTConfig):
    """(C, V) tied-head weights in the compute dtype, for `GPT.decode(..., head=)`; for int8 params
    (models/quantize.py) their int8 head, a Qwix QArray stored under "lm_head_int8"."""
    if "lm_head_int8" in params:
        return params["lm_head_int8"]
    return params["wte"]["embedding"].T.astype(cfg.dtype)



def init_cache(cfg: GPTConfig, batch: int, max_len: int, dtype=None):
    """Zero KV cache in the compute dtype, per layer (batch * n_head, max_len, head_dim), or (max_len,
    batch * n_head, head_dim) with `cfg.kv_seq_major`. A scanned model gets {"k", "v"} of those stacked on
    a leading n_layer axis (one buffer each, updated in place after the layer scan), else a list of
    per-layer {"k", "v"}, so each layer's buffer is updated in place."""
    dtype = dtype or cfg.dtype
    rows = (max_len, batch * cfg.n_head) if cfg.kv_seq_major else (batch * cfg.n_head, max_len)
    if cfg.scan_layers:
        shape = (cfg.n_layer, *rows, cfg.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    shape = (*rows, cfg.head_dim)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)]



def stack_layers(params: dict, n_layer: int) -> dict:
    """Per-layer params {h_0, h_1, ...} -> scan layout {h: leaves stacked on a leading layer axis}."""
    out = {k: v for k, v in params.items() if not k.startswith("h_")}
    stack = lambda *xs: np.stack(xs) if isinstance(xs[0], np.ndarray) else jnp.stack(xs)  # noqa: E731
    out["h"] = jax.tree.map(stack, *[params[f"h_{i}"] for i in range(n_layer)])
    return out



def unstack_layers(params: dict, n_layer: int) -> dict:
    """Inverse of `stack_layers`."""
    out = {k: v for k, v in params.items() if k != "h"}
    for i in range(n_layer):
        out[f"h_{i}"] = jax.tree.map(lambda x: x[i], params["h"])
    return out
