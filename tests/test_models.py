"""Tests of the denoiser U-Net, the encoder and the config helpers in sami_jax.models.

Tiny widths keep compilation cheap. Many properties (t-dependence, cond-dependence, batch
independence) are invisible at init because every residual branch and the output conv are
zero-initialised, so those tests first perturb every parameter with noise.
"""

import functools
import math
import re

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from sami_jax import configlib
from sami_jax import models
from sami_jax import rngs
from sami_jax.models import layers
from sami_jax.models.encoder import Encoder
from sami_jax.models.unet import UNet

TINY_UNET = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4)
# One level, no attention: the cheapest U-Net to run the real (random) initialisers on.
SMALL_UNET = dict(ch=8, ch_mult=(1,), num_res_blocks=1, attn_resolutions=(), num_groups=4)
TINY_ENC = dict(ch=8, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(4,), num_groups=4,
                latent_dim=3)


# Test inputs come from numpy: jax.random compiles a sampler per new shape (~0.5 s each here).
def _images(seed, shape):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _times(seed, b):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=(b,)), jnp.float32)


def _perturb(params, seed=123, scale=0.1):
  """Adds Gaussian noise to every parameter (activates the zero-initialised layers).

  The noise comes from numpy: jax.random would compile a sampler for every distinct parameter
  shape, which costs ~0.5 s each on a small CPU.
  """
  rs = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda p: p + jnp.asarray(scale * rs.standard_normal(p.shape), p.dtype), params)


def _random_params(model, *args, seed=7, **kwargs):
  """Random (all non-zero) float32 params of the right structure, without running model.init.

  Shapes come from jax.eval_shape (tracing only); kernels ~ N(0, 1/fan_in), norm scales ~ 1,
  biases small. Used where a test needs every layer active, not the real init.
  """
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), *args, **kwargs))["params"]
  rs = np.random.default_rng(seed)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    z = rs.standard_normal(leaf.shape)
    if "kernel" in name:
      z = z / math.sqrt(max(1, math.prod(leaf.shape[:-1])))
    elif "scale" in name:
      z = 1.0 + 0.1 * z
    else:
      z = 0.1 * z
    return jnp.asarray(z, jnp.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _init_unet(model, x, t, **kw):
  return model.init(jax.random.PRNGKey(0), x, t, train=False, **kw)["params"]


@functools.lru_cache(maxsize=None)
def _unet_apply(model):
  return jax.jit(lambda p, x, t, cond=None: model.apply({"params": p}, x, t, train=False,
                                                         cond=cond))


@functools.lru_cache(maxsize=None)
def _enc_apply(model):
  return jax.jit(lambda p, x, t=None: model.apply({"params": p}, x, t))


# ----------------------------------------------------------------------------- layers


@pytest.mark.parametrize("channels,groups,expected", [(1, 8, 1), (3, 8, 3), (12, 8, 6),
                                                      (64, 8, 8), (7, 4, 1), (48, 32, 24)])
def test_safe_num_groups(channels, groups, expected):
  assert layers.safe_num_groups(channels, groups) == expected


def test_sinusoidal_embedding_matches_formula():
  t = np.array([0.0, 0.25, 1.0], np.float32)
  dim = 6
  emb = np.asarray(layers.sinusoidal_embedding(jnp.asarray(t), dim))
  freqs = np.exp(-np.log(10000.0) * np.arange(3) / 3)
  args = 1000.0 * t[:, None] * freqs[None, :]
  np.testing.assert_allclose(emb, np.concatenate([np.sin(args), np.cos(args)], -1), atol=2e-4)


def _numpy_same_patches(x, k, stride):
  """Reference im2col by explicit loops: "SAME" padding as XLA defines it (the extra pad row
  and column go after), patch element (i, j, c) at index (i * k + j) * C + c."""
  b, h, w, c = x.shape
  ho, wo = -(-h // stride), -(-w // stride)
  pad_h = max((ho - 1) * stride + k - h, 0)
  pad_w = max((wo - 1) * stride + k - w, 0)
  xp = np.pad(x, ((0, 0), (pad_h // 2, pad_h - pad_h // 2), (pad_w // 2, pad_w - pad_w // 2),
                  (0, 0)))
  out = np.zeros((b, ho, wo, k * k * c), x.dtype)
  for oy in range(ho):
    for ox in range(wo):
      for i in range(k):
        for j in range(k):
          out[:, oy, ox, (i * k + j) * c:(i * k + j + 1) * c] = xp[:, oy * stride + i,
                                                                  ox * stride + j, :]
  return out


@pytest.mark.parametrize("size,stride", [(6, 1), (6, 2), (7, 2), (5, 1)])
def test_extract_patches_matches_loops(size, stride):
  x = np.random.default_rng(0).standard_normal((2, size, size + 1, 3)).astype(np.float32)
  got = np.asarray(layers.extract_patches(jnp.asarray(x), 3, stride))
  np.testing.assert_array_equal(got, _numpy_same_patches(x, 3, stride))


@pytest.mark.parametrize("k,stride,patches", [(3, 1, False), (3, 2, False), (3, 2, True),
                                              (3, 1, True), (1, 1, False)])
def test_conv_is_flax_conv(k, stride, patches):
  """Same parameters (names, shapes, init values) and the same function, its gradient and the
  gradient of its input-gradient (SAMI's pattern), as flax.linen.Conv with "SAME" padding."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = _images(0, (2, 8, 8, 5))
  ref = nn.Conv(7, (k, k), strides=(stride, stride), padding="SAME")
  new = layers.Conv(7, k, stride, patches=patches)
  p_ref, p_new = ref.init(jax.random.PRNGKey(3), x), new.init(jax.random.PRNGKey(3), x)
  assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_new)
  jax.tree_util.tree_map(np.testing.assert_array_equal, p_ref, p_new)
  params = _perturb(p_ref)
  np.testing.assert_allclose(new.apply(params, x), ref.apply(params, x), atol=1e-5, rtol=1e-5)
  ct = _images(1, ref.apply(params, x).shape)

  def second_order(model):
    def inner(p, xx):
      return jnp.sum(jnp.sin(model.apply(p, xx)) * ct)
    return jax.grad(lambda p: jnp.sum(jax.grad(inner, argnums=1)(p, x) ** 2))(params)

  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                         second_order(ref), second_order(new))


@pytest.mark.parametrize("shape,groups", [((2, 8, 8, 12), 4), ((3, 4, 6, 8), 8), ((2, 5, 1), 1),
                                          ((2, 4, 4, 6), 4)])
def test_group_norm_is_flax_group_norm(shape, groups):
  """Same parameters (path, shapes, init values) and the same function, its gradient and the
  gradient of its input-gradient, as flax.linen.GroupNorm (two-pass variance) inside a module
  holding it as its only child, as layers.GroupNorm did. (2, 4, 4, 6) with 4 groups: the safe
  group count (3) applies."""

  class FlaxWrapped(nn.Module):
    @nn.compact
    def __call__(self, x):
      g = layers.safe_num_groups(x.shape[-1], groups)
      return nn.GroupNorm(num_groups=g, epsilon=1e-6, use_fast_variance=False)(x)

  x = 3.0 * _images(0, shape) + 0.5
  ref, new = FlaxWrapped(), layers.GroupNorm(groups)
  p_ref, p_new = ref.init(jax.random.PRNGKey(0), x), new.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_structure(p_ref) == jax.tree_util.tree_structure(p_new)
  jax.tree_util.tree_map(np.testing.assert_array_equal, p_ref, p_new)
  params = _perturb(p_ref, scale=0.5)
  np.testing.assert_allclose(new.apply(params, x), ref.apply(params, x), atol=2e-6, rtol=1e-5)
  ct = _images(1, shape)

  def second_order(model):
    def inner(p, xx):
      return jnp.sum(jnp.sin(model.apply(p, xx)) * ct)
    return jax.grad(lambda p, xx: jnp.sum(jax.grad(inner, argnums=1)(p, xx) ** 2),
                    argnums=(0, 1))(params, x)

  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4),
                         second_order(ref), second_order(new))
  # bfloat16 compute: statistics in float32 in both, the output cast to bfloat16.
  got = layers.GroupNorm(groups, jnp.bfloat16).apply(params, x.astype(jnp.bfloat16))
  want = nn.GroupNorm(num_groups=layers.safe_num_groups(shape[-1], groups), epsilon=1e-6,
                      use_fast_variance=False, dtype=jnp.bfloat16).apply(
                          {"params": params["params"]["GroupNorm_0"]}, x.astype(jnp.bfloat16))
  assert got.dtype == want.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2, rtol=2e-2)


def test_resblock_params_keep_the_flax_conv_layout():
  # Checkpoints written before layers.Conv must still load: the 1x1 skip is still a conv kernel.
  block = layers.ResBlock(12, num_groups=4)
  shapes = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 8))))
  p = shapes["params"]
  assert p["skip"]["kernel"].shape == (1, 1, 8, 12) and p["skip"]["bias"].shape == (12,)
  assert p["conv_0"]["kernel"].shape == (3, 3, 8, 12)
  assert p["norm_0"]["GroupNorm_0"]["scale"].shape == (8,)


def test_recommended_compiler_options_compile_and_keep_the_result():
  from sami_jax.utils import xla_options  # pylint: disable=g-import-not-at-top
  assert xla_options.recommended_compiler_options("gpu") == {}
  assert xla_options.recommended_xla_flags("tpu") == ""
  opts = xla_options.recommended_compiler_options("cpu")
  assert opts and all(k.startswith("xla_cpu_") or k == "xla_disable_hlo_passes" for k in opts)
  x, w = _images(0, (2, 8, 8, 20)), _images(1, (3, 3, 20, 20))
  f = jax.jit(jax.grad(lambda w: jnp.sum(jnp.sin(jax.lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))))))
  # This JAX's XLA accepts every option (an unknown name or enum value is an error here).
  got = f.lower(w).compile(compiler_options=xla_options.recommended_compiler_options())(w)
  np.testing.assert_allclose(got, f(w), rtol=1e-4, atol=1e-4)


def test_process_flags_add_each_recommended_flag_unless_named():
  from sami_jax.utils import xla_options  # pylint: disable=g-import-not-at-top
  want = xla_options.recommended_xla_flags("cpu").split()
  assert want and all(f.startswith("--xla_") and "=" in f for f in want)
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  assert xla_options.apply_process_flags(env)
  assert env["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2", *want]
  assert not xla_options.apply_process_flags(env)  # nothing twice
  # A flag the user set wins; the others are still added.
  mine = "--xla_cpu_experimental_ynn_fusion_type=reduce"
  env = {"XLA_FLAGS": mine}
  xla_options.apply_process_flags(env)
  assert env["XLA_FLAGS"].split() == [mine, *want[1:]]
  env = {"XLA_FLAGS": "", "SAMI_JAX_XLA_FLAGS": "off"}
  assert not xla_options.apply_process_flags(env) and env["XLA_FLAGS"] == ""


def _computations(hlo: str) -> dict[str, str]:
  """An optimised HLO module's text by computation: name -> body ("ENTRY" for the entry one)."""
  out, name, lines = {}, None, []
  for line in hlo.splitlines():
    head = re.match(r"(ENTRY )?%([\w.\-]+) .*\{$", line)
    if head:
      name, lines = ("ENTRY" if head.group(1) else head.group(2)), []
    elif line.startswith("}") and name is not None:
      out[name], name = "\n".join(lines), None
    elif name is not None:
      lines.append(line)
  return out


def test_materialized_splits_the_fusion_under_the_recommended_options():
  """layers.materialized must keep a cheap producer (a nearest-neighbour upsampling) out of its
  consumers' fusions, under the options the project compiles with: on jax 0.10 those must stop
  XLA's barrier expander from running before fusion. Without the barrier (the control) XLA fuses
  the upsampling into the fusion computing sin / cos, which then reads x itself."""
  from sami_jax.utils import xla_options  # pylint: disable=g-import-not-at-top

  def trig_fusions_reading_x(barrier):
    def f(x):
      y = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
      y = layers.materialized(y) if barrier else y
      return jnp.sum(jnp.sin(y) * 2.0)
    x = _images(0, (4, 8, 8, 16))
    compiled = jax.jit(jax.grad(f)).lower(x).compile(
        compiler_options=xla_options.recommended_compiler_options("cpu"))
    np.testing.assert_allclose(compiled(x), jax.grad(f)(x), rtol=1e-6)
    comps = _computations(compiled.as_text())
    x_name = re.search(r"%([\w.\-]+) = \S+ parameter\(0\)", comps["ENTRY"]).group(1)
    called = re.findall(rf"fusion\(%{re.escape(x_name)}\)[^\n]*calls=%([\w.\-]+)",
                        comps["ENTRY"])
    assert called, "no fusion reads x: the test no longer sees what it checks"
    return sum(bool(re.search(r" (sine|cosine)\(", comps[c])) for c in called)

  assert trig_fusions_reading_x(barrier=False) >= 1  # the control: fused without the barrier
  assert trig_fusions_reading_x(barrier=True) == 0


def test_run_once_compiler_options_give_the_same_init():
  from sami_jax.utils import xla_options  # pylint: disable=g-import-not-at-top
  assert xla_options.run_once_compiler_options("gpu") == {}
  # One block with every initialiser the models use (variance-scaling normal and uniform kernels,
  # zero biases, GroupNorm scales): the whole U-Net's optimised init takes ~40 s to compile here.
  block = layers.ResBlock(8, num_groups=4)
  x, t_emb = _images(0, (2, 8, 8, 4)), _images(1, (2, 16))
  init = jax.jit(lambda key: block.init({"params": key}, x, t_emb, None, False))
  key = jax.random.PRNGKey(5)
  fast = init.lower(key).compile(
      compiler_options=xla_options.run_once_compiler_options("cpu"))(key)
  # The reference is optimised explicitly: the test session compiles without LLVM optimisation.
  optimised = init.lower(key).compile(compiler_options={
      "xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False})(key)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         optimised, fast)


# ------------------------------------------------------------------------------- U-Net


@pytest.mark.parametrize("size,channels,out_channels", [(8, 1, None), (16, 3, None),
                                                        (32, 1, 2)])
def test_unet_shapes(size, channels, out_channels):
  model = UNet(**TINY_UNET, out_channels=out_channels)
  x, t = _images(0, (2, size, size, channels)), _times(1, 2)
  out = _unet_apply(model)(_random_params(model, x, t, train=False), x, t)
  assert out.shape == (2, size, size, out_channels or channels)
  assert out.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(out))) and np.std(np.asarray(out)) > 1e-3


def test_unet_bfloat16_params_float32_output_float32():
  x, t = _images(0, (2, 16, 16, 3)), _times(1, 2)
  m16 = UNet(**TINY_UNET, dtype=jnp.bfloat16)
  abstract = jax.eval_shape(lambda: _init_unet(m16, x, t))
  assert {p.dtype for p in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype(jnp.float32)}
  params = _random_params(m16, x, t, train=False)
  out16 = _unet_apply(m16)(params, x, t)
  assert out16.dtype == jnp.float32
  out32 = _unet_apply(UNet(**TINY_UNET))(params, x, t)
  # Same params, same function: bf16 compute must agree with float32 up to bf16 precision.
  rel = np.linalg.norm(np.asarray(out16 - out32)) / np.linalg.norm(np.asarray(out32))
  assert rel < 0.05, rel


def test_unet_depends_on_t():
  model = UNet(**TINY_UNET)
  x = _images(0, (2, 8, 8, 1))
  params = _random_params(model, x, _times(1, 2), train=False)
  apply = _unet_apply(model)
  a = apply(params, x, jnp.array([0.1, 0.1]))
  b = apply(params, x, jnp.array([0.9, 0.9]))
  assert np.max(np.abs(np.asarray(a - b))) > 1e-3
  # A scalar t is broadcast over the batch.
  np.testing.assert_allclose(np.asarray(apply(params, x, jnp.float32(0.1))), np.asarray(a),
                             atol=1e-6)


def test_unet_batch_independence():
  model = UNet(**TINY_UNET)
  x, t = _images(0, (3, 8, 8, 1)), _times(1, 3)
  params = _random_params(model, x, t, train=False)
  apply = _unet_apply(model)
  a = np.asarray(apply(params, x, t))
  x2 = x.at[1].add(5.0 * _images(9, (8, 8, 1)))
  t2 = t.at[1].set(0.77)
  b = np.asarray(apply(params, x2, t2))
  assert np.max(np.abs(a[1] - b[1])) > 1e-3  # the perturbed example does change ...
  np.testing.assert_allclose(b[[0, 2]], a[[0, 2]], atol=1e-5)  # ... and no other one.


def test_unet_dropout_only_in_training():
  model = UNet(**SMALL_UNET, dropout=0.5)
  x, t = _images(0, (2, 8, 8, 1)), _times(1, 2)
  params = _random_params(model, x, t, train=False)

  @functools.partial(jax.jit, static_argnums=0)
  def apply(train, rng):
    return model.apply({"params": params}, x, t, train=train, rngs={"dropout": rng})

  def run(train, seed):
    return np.asarray(apply(train, jax.random.PRNGKey(seed)))

  eval_a, eval_b = run(False, 0), run(False, 1)
  np.testing.assert_array_equal(eval_a, eval_b)  # train=False: rng is irrelevant
  # train=False needs no rng and is exactly the network without dropout (same params).
  no_dropout = np.asarray(_unet_apply(UNet(**SMALL_UNET))(params, x, t))
  np.testing.assert_allclose(eval_a, no_dropout, atol=1e-6)  # another compilation: rounding only
  train_a, train_b = run(True, 0), run(True, 1)
  assert np.max(np.abs(train_a - train_b)) > 1e-4  # different masks
  assert np.max(np.abs(train_a - eval_a)) > 1e-4
  np.testing.assert_array_equal(train_a, run(True, 0))  # same rng, same mask


@pytest.mark.parametrize("shape", [(), (7,), (3, 5), (2, 6, 6, 4)])
def test_bernoulli_is_jax_bernoulli(shape):
  # The expected masks are JAX's own draws from the same keys.
  for key in (jax.random.PRNGKey(3), jax.random.fold_in(jax.random.PRNGKey(5), 11)):
    for p in (0.9, 0.5, 0.1):
      ours = jax.jit(lambda k, p=p: rngs.bernoulli(k, p, shape))(key)
      np.testing.assert_array_equal(ours, jax.random.bernoulli(key, p, shape))


def test_bernoulli_typed_and_other_keys():
  typed = jax.random.key(7)
  np.testing.assert_array_equal(jax.jit(lambda k: rngs.bernoulli(k, 0.7, (5, 9)))(typed),
                                jax.random.bernoulli(typed, 0.7, (5, 9)))
  rbg = jax.random.key(7, impl="rbg")  # not threefry: left to jax.random itself
  np.testing.assert_array_equal(rngs.bernoulli(rbg, 0.7, (5, 9)),
                                jax.random.bernoulli(rbg, 0.7, (5, 9)))


def test_bernoulli_sharded_over_devices():
  # Drawn for a batch-sharded result (the suite runs on 8 CPU devices): JAX's values, and each
  # device hashes only its own rows.
  n = jax.device_count()
  sharding = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(jax.devices()), ("data",)),
                                        jax.sharding.PartitionSpec("data"))
  key, shape = jax.random.PRNGKey(4), (2 * n, 4, 4, 2)
  draw = jax.jit(lambda k: rngs.bernoulli(k, 0.9, shape), out_shardings=sharding)
  np.testing.assert_array_equal(draw(key), jax.random.bernoulli(key, 0.9, shape))
  if n > 1:
    hlo = draw.lower(key).compile().as_text()
    assert "u32[2,4,4,2]" in hlo and f"u32[{2 * n},4,4,2]" not in hlo


def test_dropout_is_flax_dropout():
  # Auto-named alike ("Dropout_0"), so each draws its key from the same scope.
  class Net(nn.Module):
    use_flax: bool

    @nn.compact
    def __call__(self, x, train):
      for _ in range(2):
        if self.use_flax:
          x = nn.Dropout(0.3)(x, deterministic=not train)
        else:
          x = layers.Dropout(0.3)(x, deterministic=not train)
      return x

  x = _images(0, (2, 8, 8, 4))
  for seed in (0, 1):
    rng = {"dropout": jax.random.PRNGKey(seed)}
    outs = [jax.jit(lambda x, u=u: Net(u).apply({}, x, True, rngs=rng))(x) for u in (True, False)]
    np.testing.assert_array_equal(outs[1], outs[0])
    assert 0.3 < float(jnp.mean(outs[1] == 0)) < 0.7  # two layers: ~51% dropped
    grads = [jax.grad(lambda x, u=u: jnp.sum(Net(u).apply({}, x, True, rngs=rng) ** 2))(x)
             for u in (True, False)]
    np.testing.assert_array_equal(grads[1], grads[0])
  np.testing.assert_array_equal(Net(False).apply({}, x, False), x)


def test_unet_remat_matches():
  x, t = _images(0, (2, 8, 8, 1)), _times(1, 2)
  plain, remat = UNet(**SMALL_UNET), UNet(**SMALL_UNET, remat=True)
  params = _random_params(plain, x, t, train=False)
  params_remat = jax.eval_shape(lambda: _init_unet(remat, x, t))
  assert (jax.tree_util.tree_structure(params) ==
          jax.tree_util.tree_structure(params_remat))

  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, x, t, train=False) ** 2)

  l0, g0 = jax.jit(jax.value_and_grad(functools.partial(loss, plain)))(params)
  l1, g1 = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(params)
  np.testing.assert_allclose(float(l1), float(l0), rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-5)


def test_unet_cond():
  model = UNet(**TINY_UNET, cond_dim=4)
  x, t = _images(0, (2, 8, 8, 1)), _times(1, 2)
  c1, c2 = _images(2, (2, 4)), _images(3, (2, 4))
  params = _random_params(model, x, t, train=False, cond=c1)
  apply = _unet_apply(model)
  a, b = apply(params, x, t, c1), apply(params, x, t, c2)
  assert np.max(np.abs(np.asarray(a - b))) > 1e-3
  with pytest.raises(ValueError, match="cond"):
    model.apply({"params": params}, x, t, train=False)
  with pytest.raises(ValueError, match="cond_dim=0"):
    UNet(**TINY_UNET).init(jax.random.PRNGKey(0), x, t, train=False, cond=c1)


def test_unet_rejects_indivisible_size():
  model = UNet(**TINY_UNET)  # 2 levels: one downsampling, needs even sizes
  with pytest.raises(ValueError, match="does not divide"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, 7, 7, 1)), jnp.zeros((1,)), train=False)


# ----------------------------------------------------------------------------- encoder


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 3), (32, 1)])
def test_encoder_shapes(size, channels):
  model = Encoder(**TINY_ENC)
  x = _images(0, (4, size, size, channels))
  params = model.init(jax.random.PRNGKey(0), x)["params"]
  mean, std = _enc_apply(model)(params, x)
  assert mean.shape == std.shape == (4, 3)
  assert mean.dtype == std.dtype == jnp.float32
  # The mean head is not zero-initialised: mean already depends on x.
  assert np.max(np.abs(np.asarray(mean[0] - mean[1]))) > 1e-4


@pytest.mark.parametrize("scale_param", ["softplus", "exp"])
@pytest.mark.parametrize("time_conditioning,init_std", [(False, 1.0), (True, 1.0), (False, 0.1),
                                                        (True, 0.037)])
def test_encoder_std_is_init_std_at_init(scale_param, time_conditioning, init_std):
  model = Encoder(**TINY_ENC, scale_param=scale_param, time_conditioning=time_conditioning,
                  init_std=init_std)
  x, t = 3.0 * _images(0, (5, 8, 8, 2)), _times(1, 5)
  params = model.init(jax.random.PRNGKey(0), x, t)["params"]
  for seed in range(3):
    _, std = _enc_apply(model)(params, 3.0 * _images(10 + seed, (5, 8, 8, 2)), t)
    # exactly (as float32), not approximately
    np.testing.assert_array_equal(np.asarray(std), np.float32(init_std))


def test_encoder_init_std_must_lie_inside_the_bounds():
  with pytest.raises(ValueError, match="init_std"):
    Encoder(**TINY_ENC, init_std=20.0).init(jax.random.PRNGKey(0), _images(0, (1, 8, 8, 1)))


@pytest.mark.parametrize("scale_param", ["softplus", "exp"])
def test_encoder_std_bounds(scale_param):
  min_std, max_std = 1e-3, 10.0
  model = Encoder(**TINY_ENC, scale_param=scale_param, min_std=min_std, max_std=max_std)
  x = _images(0, (4, 8, 8, 1))
  params = _random_params(model, x)
  apply = _enc_apply(model)
  stds = []
  for bias in [-1e4, -100.0, -30.0, -5.0, 0.0, 5.0, 30.0, 100.0, 1e4]:
    p = jax.tree_util.tree_map(lambda a: a, params)
    p["std_head"] = {"kernel": 10.0 * params["std_head"]["kernel"],
                     "bias": jnp.full_like(params["std_head"]["bias"], bias)}
    _, std = apply(p, x)
    std = np.asarray(std)
    assert np.all(std >= min_std) and np.all(std <= max_std), (bias, std)
    stds.append(std)
  np.testing.assert_allclose(stds[0], min_std, rtol=1e-3)  # saturates at the floor ...
  np.testing.assert_allclose(stds[-1], max_std, rtol=1e-3)  # ... and at the ceiling,
  assert np.all(np.diff(np.stack(stds), axis=0) >= 0)  # monotonically in the pre-activation.


def test_softplus_std_matches_unbounded_formula_in_working_range():
  # Away from max_std, std = min_std + softplus(h + c) with softplus(c) = 1 - min_std (the spec),
  # computed here independently in float64.
  from sami_jax.models.encoder import std_from_preactivation
  min_std, max_std = 1e-3, 10.0
  h = np.linspace(-6.0, 1.0, 15)
  c = np.log(np.expm1(1.0 - min_std))
  expected = min_std + np.log1p(np.exp(h + c))
  got = np.asarray(std_from_preactivation(jnp.asarray(h, jnp.float32), "softplus", min_std,
                                          max_std))
  np.testing.assert_allclose(got, expected, rtol=2e-3)
  # exp: std ~= exp(h / 2) where the bounds are far (the log-std range is [log 1e-3, log 10]).
  h = np.linspace(-8.0, 1.0, 10)
  got = np.asarray(std_from_preactivation(jnp.asarray(h, jnp.float32), "exp", min_std, max_std))
  np.testing.assert_allclose(got, np.exp(h / 2), rtol=1e-3)
  # The smooth bound never kills the gradient, even far outside the working range.
  grads = jax.vmap(jax.grad(lambda v: std_from_preactivation(v, "softplus", min_std,
                                                             max_std)))(
      jnp.array([-8.0, 0.0, 8.0]))
  assert np.all(np.asarray(grads) > 0)


def test_encoder_time_conditioning():
  x, t1, t2 = _images(0, (2, 8, 8, 1)), jnp.array([0.1, 0.2]), jnp.array([0.8, 0.9])
  blind = Encoder(**TINY_ENC, time_conditioning=False)
  params = _random_params(blind, x)
  assert "time_embed" not in params
  apply = _enc_apply(blind)
  ref = apply(params, x)
  for t in (t1, t2):
    for a, b in zip(apply(params, x, t), ref):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  aware = Encoder(**TINY_ENC, time_conditioning=True)
  params = _random_params(aware, x, t1)
  apply = _enc_apply(aware)
  (m1, s1), (m2, s2) = apply(params, x, t1), apply(params, x, t2)
  assert np.max(np.abs(np.asarray(m1 - m2))) > 1e-4
  assert np.max(np.abs(np.asarray(s1 - s2))) > 1e-4
  with pytest.raises(ValueError, match="time_conditioning"):
    aware.apply({"params": params}, x)


def test_encoder_std_from_the_noise_level_alone():
  """std_input="time": the posterior std is a function of t only (init_std at init; no gradient in
  x, so the guidance comes from the mean alone), while the mean still reads the image."""
  x, x2 = _images(0, (2, 8, 8, 1)), _images(5, (2, 8, 8, 1))
  t1, t2 = jnp.array([0.1, 0.1]), jnp.array([0.8, 0.8])
  model = Encoder(**TINY_ENC, time_conditioning=True, std_input="time", init_std=0.3)
  params = model.init(jax.random.PRNGKey(0), x, t1)["params"]
  np.testing.assert_allclose(np.asarray(_enc_apply(model)(params, x, t1)[1]), 0.3, rtol=1e-6)
  params = _random_params(model, x, t1)
  apply = _enc_apply(model)
  (m1, s1), (m2, s2), (_, s3) = apply(params, x, t1), apply(params, x2, t1), apply(params, x, t2)
  np.testing.assert_array_equal(np.asarray(s1), np.asarray(s2))  # the image does not matter
  np.testing.assert_array_equal(np.asarray(s1[0]), np.asarray(s1[1]))
  assert np.max(np.abs(np.asarray(s1 - s3))) > 1e-4  # the noise level does
  assert np.max(np.abs(np.asarray(m1 - m2))) > 1e-4
  grad_x = jax.grad(lambda xx: jnp.sum(jnp.log(model.apply({"params": params}, xx, t1)[1])))(x)
  np.testing.assert_array_equal(np.asarray(grad_x), 0.0)
  # Blind to the noise level: one learned std per latent dimension.
  const = Encoder(**TINY_ENC, time_conditioning=False, std_input="time")
  p_const = _random_params(const, x)
  s_a, s_b = _enc_apply(const)(p_const, x)[1], _enc_apply(const)(p_const, x2)[1]
  np.testing.assert_array_equal(np.asarray(s_a), np.asarray(s_b))


def test_encoder_batch_independence():
  model = Encoder(**TINY_ENC, time_conditioning=True)
  x, t = _images(0, (3, 8, 8, 1)), _times(1, 3)
  params = _random_params(model, x, t)
  apply = _enc_apply(model)
  a = [np.asarray(o) for o in apply(params, x, t)]
  b = [np.asarray(o) for o in apply(params, x.at[2].add(5.0 * _images(9, (8, 8, 1))),
                                    t.at[2].set(0.5))]
  for oa, ob in zip(a, b):
    assert np.max(np.abs(oa[2] - ob[2])) > 1e-4
    np.testing.assert_allclose(ob[:2], oa[:2], atol=1e-6)
  # Jacobian form: d(output of example 0) / d(input of examples 1, 2) is exactly zero.
  jac = jax.jit(jax.jacrev(lambda xx: model.apply({"params": params}, xx, t)[0][0]))(x)
  assert np.max(np.abs(np.asarray(jac[0]))) > 0
  np.testing.assert_array_equal(np.asarray(jac[:, 1:]), 0.0)


def test_encoder_bfloat16_and_second_order_grad():
  x = _images(0, (2, 8, 8, 1))
  # One level with attention at 8x8: every kind of layer, at the least compile time.
  model = Encoder(**{**TINY_ENC, "ch_mult": (1,), "attn_resolutions": (8,)}, dtype=jnp.bfloat16)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  assert {p.dtype for p in jax.tree_util.tree_leaves(abstract)} == {jnp.dtype(jnp.float32)}
  params = _random_params(model, x)
  mean, std = _enc_apply(model)(params, x)
  assert mean.dtype == std.dtype == jnp.float32
  z = jnp.ones((2, 3))

  # The SAMI pattern: a loss of grad_x log q(z | x), differentiated w.r.t. the params.
  def loss(p):
    def log_q(xx):
      m, s = model.apply({"params": p}, xx)
      return jnp.sum(-0.5 * ((z - m) / s) ** 2 - jnp.log(s))
    return jnp.sum(jax.grad(log_q)(x) ** 2)

  grads = jax.jit(jax.grad(loss))(params)
  norms = [float(jnp.linalg.norm(g)) for g in jax.tree_util.tree_leaves(grads)]
  assert all(math.isfinite(n) for n in norms) and max(norms) > 0


def test_encoder_rejects_bad_settings():
  x = jnp.zeros((1, 8, 8, 1))
  with pytest.raises(ValueError, match="scale_param"):
    Encoder(**TINY_ENC, scale_param="sigmoid").init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="min_std"):
    Encoder(**TINY_ENC, max_std=0.5).init(jax.random.PRNGKey(0), x)
  with pytest.raises(ValueError, match="does not divide"):
    Encoder(**TINY_ENC).init(jax.random.PRNGKey(0), jnp.zeros((1, 9, 9, 1)))


# ------------------------------------------------------------------ config helpers


def _tiny_config(dtype="float32", time_conditioning=False):
  # Parameter shapes match SMALL_UNET / TINY_ENC: the encoder initialisers are already compiled.
  c = configlib.default_config()
  c.data.image_size, c.data.channels = 8, 1
  c.model.dtype = dtype
  for key, value in SMALL_UNET.items():
    c.model.denoiser[key] = value
  for key, value in TINY_ENC.items():
    c.model.encoder[key] = value
  c.model.encoder.time_conditioning = time_conditioning
  return c


def test_build_and_init_from_config():
  config = _tiny_config("bfloat16")
  denoiser, encoder = models.build_models(config)
  assert denoiser.dtype == jnp.bfloat16 and encoder.dtype == jnp.bfloat16
  assert denoiser.out_channels == 1 and encoder.latent_dim == 3
  assert denoiser.ch_mult == (1,) and encoder.attn_resolutions == (4,)
  params = models.initialize(config, jax.random.PRNGKey(0))  # init_params, jitted
  assert set(params) == {"denoiser", "encoder"}
  assert {p.dtype for p in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
  # The std head is a Dense from the 16-channel last level to 3 latents: 16 * 3 + 3 params.
  assert models.count_params(params["encoder"]["std_head"]) == 16 * 3 + 3
  # The output conv is zero-initialised, so the initial prediction is exactly eps = 0.
  np.testing.assert_array_equal(np.asarray(params["denoiser"]["conv_out"]["kernel"]), 0.0)
  x, t = _images(0, (2, 8, 8, 1)), _times(1, 2)
  np.testing.assert_array_equal(np.asarray(_unet_apply(denoiser)(params["denoiser"], x, t)), 0.0)
  # Traceable (hence jit-friendly, e.g. jax.jit(init, out_shardings=...)): eval_shape traces it.
  abstract = jax.eval_shape(functools.partial(models.init_params, config),
                            jax.random.PRNGKey(0))
  assert models.count_params(abstract) == models.count_params(params)
  mean, std = jax.jit(encoder.apply)({"params": params["encoder"]}, x)
  assert mean.shape == (2, 3)
  np.testing.assert_array_equal(np.asarray(std), 1.0)
  # With time conditioning the encoder gets a time embedding (traced only: cheap).
  tc = jax.eval_shape(functools.partial(models.init_params, _tiny_config(time_conditioning=True)),
                      jax.random.PRNGKey(0))
  assert "time_embed" in tc["encoder"] and "time_embed" not in params["encoder"]


def test_mean_init_scale_from_config_scales_the_mean_head():
  # variance_scaling: the kernel's std is sqrt(scale / fan_in), drawn from the same key, so a
  # 100x larger scale gives exactly a 10x larger kernel (and nothing else changes).
  params = {}
  for scale in (0.1, 10.0):
    c = _tiny_config()
    c.model.encoder.mean_init_scale = scale
    assert models.build_models(c)[1].mean_init_scale == scale
    params[scale] = models.initialize(c, jax.random.PRNGKey(3))["encoder"]
  np.testing.assert_allclose(np.asarray(params[10.0]["mean_head"]["kernel"]),
                             10.0 * np.asarray(params[0.1]["mean_head"]["kernel"]), rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(params[10.0]["hidden"]["kernel"]),
                                np.asarray(params[0.1]["hidden"]["kernel"]))


def test_count_params_counts_elements():
  tree = {"a": jnp.zeros((3, 4)), "b": [jnp.zeros((5,)), jnp.zeros(())],
          "c": jax.ShapeDtypeStruct((2, 2), jnp.float32)}
  assert models.count_params(tree) == 12 + 5 + 1 + 4


def test_bad_dtype_name():
  with pytest.raises(ValueError, match="model.dtype"):
    models.build_models(_tiny_config(dtype="float16"))
