"""The FID Inception-v3 feature network (pool3, 2048-d) in Flax linen, with weights from a file.

FID is only comparable across papers when computed with one specific network: the TensorFlow
Inception graph of 2015-12-05 used by the original FID code. pytorch-fid ships a port of its
weights, `pt_inception-2015-12-05-6726825d.pth`; this module runs the same architecture
(pytorch-fid's `FIDInceptionA/C/E_1/E_2` blocks: average pools that exclude padding, a max pool
in the last block) and loads those weights.

Weights file format: an .npz holding pytorch-fid's state dict, one array per key with PyTorch's
names and layouts (e.g. `Mixed_5b.branch1x1.conv.weight` [out, in, kh, kw], `...bn.running_var`).
Make it once, in a sami_jax environment with torch added (the converter checks the names and
shapes against this network before writing):

    wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
    python -m sami_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth \
        inception_fid.npz

Nothing is downloaded by this code. Batch norms are inference-only; they are folded into the
preceding convolutions at load time (conv + bias + ReLU per layer).

Inputs follow pytorch-fid: images are bilinearly resized to 299x299 (half-pixel centres, no
antialiasing, i.e. torch's `interpolate(..., align_corners=False)`) and fed in [-1, 1].

Checked once against pytorch-fid 0.3 itself (its `InceptionV3([3])` with the FID blocks, random
weights and random batch-norm statistics, loaded here through the .npz): pool3 features agreed to
1.2e-5 (features of size ~5) for 64x64 (upsampled) and 400x400 (downsampled) inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3  # the TF graph's batch-norm epsilon, kept by pytorch-fid.
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")

_HOW_TO_GET_WEIGHTS = f"""\
FID needs the Inception weights of pytorch-fid (a port of the TF 2015-12-05 FID Inception).
Nothing is downloaded automatically. To make the weights file:
  1. download {WEIGHTS_URL}
  2. in this environment with PyTorch added (pip install torch), convert it:
       python -m sami_jax.evaluation.inception --convert pt_inception-2015-12-05-6726825d.pth inception_fid.npz
  3. give the path of inception_fid.npz to the evaluation (InceptionFeatures.load(path))."""

Padding = tuple[tuple[int, int], tuple[int, int]]


def _pad(kernel: tuple[int, int]) -> Padding:
  """'Same' padding for odd kernels at stride 1 (PyTorch's padding=(kh // 2, kw // 2))."""
  return ((kernel[0] // 2, kernel[0] // 2), (kernel[1] // 2, kernel[1] // 2))


class BasicConv(nn.Module):
  """Conv (batch norm folded in, hence a bias) + ReLU. NHWC -> NHWC."""
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: tuple[int, int] = (1, 1)
  padding: Padding | str = "VALID"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=self.padding,
                use_bias=True, name="conv")(x)
    return nn.relu(x)


def _avg_pool_3x3(x: jax.Array) -> jax.Array:
  # count_include_pad=False is one of pytorch-fid's changes to torchvision's blocks: it matches
  # the TF graph, which averages only over real pixels at the borders.
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_s2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """35x35 block: 1x1, 5x5, double 3x3 and pooled branches -> 224 + pool_features channels."""
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(64, name="branch1x1")(x)
    b5 = BasicConv(48, name="branch5x5_1")(x)
    b5 = BasicConv(64, (5, 5), padding=_pad((5, 5)), name="branch5x5_2")(b5)
    b3 = BasicConv(64, name="branch3x3dbl_1")(x)
    b3 = BasicConv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(b3)
    b3 = BasicConv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_3")(b3)
    bp = BasicConv(self.pool_features, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nn.Module):
  """Grid reduction 35 -> 17: stride-2 3x3, stride-2 double 3x3, max pool."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(384, (3, 3), strides=(2, 2), name="branch3x3")(x)
    bd = BasicConv(64, name="branch3x3dbl_1")(x)
    bd = BasicConv(96, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(bd)
    bd = BasicConv(96, (3, 3), strides=(2, 2), name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_s2(x)], axis=-1)


class InceptionC(nn.Module):
  """17x17 block with factorised 7x7 convolutions -> 768 channels."""
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv(192, name="branch1x1")(x)
    b7 = BasicConv(c7, name="branch7x7_1")(x)
    b7 = BasicConv(c7, (1, 7), padding=_pad((1, 7)), name="branch7x7_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad((7, 1)), name="branch7x7_3")(b7)
    bd = BasicConv(c7, name="branch7x7dbl_1")(x)
    bd = BasicConv(c7, (7, 1), padding=_pad((7, 1)), name="branch7x7dbl_2")(bd)
    bd = BasicConv(c7, (1, 7), padding=_pad((1, 7)), name="branch7x7dbl_3")(bd)
    bd = BasicConv(c7, (7, 1), padding=_pad((7, 1)), name="branch7x7dbl_4")(bd)
    bd = BasicConv(192, (1, 7), padding=_pad((1, 7)), name="branch7x7dbl_5")(bd)
    bp = BasicConv(192, name="branch_pool")(_avg_pool_3x3(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(nn.Module):
  """Grid reduction 17 -> 8."""

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv(192, name="branch3x3_1")(x)
    b3 = BasicConv(320, (3, 3), strides=(2, 2), name="branch3x3_2")(b3)
    b7 = BasicConv(192, name="branch7x7x3_1")(x)
    b7 = BasicConv(192, (1, 7), padding=_pad((1, 7)), name="branch7x7x3_2")(b7)
    b7 = BasicConv(192, (7, 1), padding=_pad((7, 1)), name="branch7x7x3_3")(b7)
    b7 = BasicConv(192, (3, 3), strides=(2, 2), name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_s2(x)], axis=-1)


class InceptionE(nn.Module):
  """8x8 block with expanded filter banks -> 2048 channels.

  `max_pool_branch`: the last block (Mixed_7c) of the FID graph max-pools in its pool branch
  (pytorch-fid's FIDInceptionE_2); Mixed_7b average-pools without padding (FIDInceptionE_1).
  """
  max_pool_branch: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv(320, name="branch1x1")(x)
    b3 = BasicConv(384, name="branch3x3_1")(x)
    b3 = jnp.concatenate([
        BasicConv(384, (1, 3), padding=_pad((1, 3)), name="branch3x3_2a")(b3),
        BasicConv(384, (3, 1), padding=_pad((3, 1)), name="branch3x3_2b")(b3)], axis=-1)
    bd = BasicConv(448, name="branch3x3dbl_1")(x)
    bd = BasicConv(384, (3, 3), padding=_pad((3, 3)), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([
        BasicConv(384, (1, 3), padding=_pad((1, 3)), name="branch3x3dbl_3a")(bd),
        BasicConv(384, (3, 1), padding=_pad((3, 1)), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool_branch:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3(x)
    bp = BasicConv(192, name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class FIDInceptionV3(nn.Module):
  """Inception-v3 up to pool3: [B, 299, 299, 3] in [-1, 1] -> [B, 2048] float32."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    chex.assert_rank(x, 4)
    x = BasicConv(32, (3, 3), strides=(2, 2), name="Conv2d_1a_3x3")(x)  # 149
    x = BasicConv(32, (3, 3), name="Conv2d_2a_3x3")(x)  # 147
    x = BasicConv(64, (3, 3), padding=_pad((3, 3)), name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_s2(x)  # 73
    x = BasicConv(80, name="Conv2d_3b_1x1")(x)
    x = BasicConv(192, (3, 3), name="Conv2d_4a_3x3")(x)  # 71
    x = _max_pool_3x3_s2(x)  # 35
    x = InceptionA(32, name="Mixed_5b")(x)  # 256
    x = InceptionA(64, name="Mixed_5c")(x)  # 288
    x = InceptionA(64, name="Mixed_5d")(x)  # 288
    x = InceptionB(name="Mixed_6a")(x)  # 17x17x768
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)  # 8x8x1280
    x = InceptionE(name="Mixed_7b")(x)  # 2048
    x = InceptionE(max_pool_branch=True, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))  # pool3: global average pool.


def preprocess(images: jax.Array) -> jax.Array:
  """[B, H, W, C] in [-1, 1], C in {1, 3} -> [B, 299, 299, 3] float32 in [-1, 1]."""
  x = images.astype(jnp.float32)
  if x.shape[-1] == 1:
    x = jnp.repeat(x, 3, axis=-1)
  if x.shape[1:3] != (INPUT_SIZE, INPUT_SIZE):
    x = jax.image.resize(x, (x.shape[0], INPUT_SIZE, INPUT_SIZE, 3), method="bilinear",
                         antialias=False)
  return x


def _param_shapes() -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flat {path: shape} of the network's parameters (no computation, via eval_shape)."""
  abstract = jax.eval_shape(FIDInceptionV3().init, jax.random.PRNGKey(0),
                            jnp.zeros((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32))
  flat = jax.tree_util.tree_flatten_with_path(abstract["params"])[0]
  return {tuple(k.key for k in path): tuple(v.shape) for path, v in flat}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  tree: dict = {}
  for path, value in flat.items():
    node = tree
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return tree


def fold_batch_norm(weight: np.ndarray, gamma: np.ndarray, beta: np.ndarray, mean: np.ndarray,
                    var: np.ndarray, eps: float = BN_EPS) -> tuple[np.ndarray, np.ndarray]:
  """Folds inference batch norm into a bias-free conv.

  Args:
    weight: [out, in, kh, kw] PyTorch conv weight. gamma, beta, mean, var: [out].

  Returns:
    kernel [kh, kw, in, out] (Flax layout) and bias [out], such that conv(x, kernel) + bias equals
    gamma * (conv(x, weight) - mean) / sqrt(var + eps) + beta.
  """
  scale = gamma / np.sqrt(var + eps)
  kernel = np.transpose(weight, (2, 3, 1, 0)) * scale
  return kernel.astype(np.float32), (beta - mean * scale).astype(np.float32)


def params_from_state_dict(state: dict[str, np.ndarray]) -> dict:
  """Flax params of FIDInceptionV3 from pytorch-fid's state dict (numpy arrays, torch names).

  Keys the network does not use (fc.*, num_batches_tracked) are ignored.
  """
  params = {}
  for path, shape in _param_shapes().items():
    if path[-1] != "kernel":
      continue
    prefix = ".".join(path[:-2])  # e.g. "Mixed_5b.branch1x1"; path[-2] is the "conv" submodule.
    names = {"weight": f"{prefix}.conv.weight", "gamma": f"{prefix}.bn.weight",
             "beta": f"{prefix}.bn.bias", "mean": f"{prefix}.bn.running_mean",
             "var": f"{prefix}.bn.running_var"}
    missing = [n for n in names.values() if n not in state]
    if missing:
      raise ValueError(f"The Inception weights lack {missing[:3]} (and {max(len(missing) - 3, 0)} "
                       "more of this layer); the file is not a converted pytorch-fid "
                       f"pt_inception-2015-12-05 state dict.\n{_HOW_TO_GET_WEIGHTS}")
    arrays = {k: np.asarray(state[n], np.float32) for k, n in names.items()}
    kernel, bias = fold_batch_norm(**arrays)
    if kernel.shape != shape:
      raise ValueError(f"{names['weight']} has shape {arrays['weight'].shape}, which does not fit "
                       f"the FID Inception (expected a Flax kernel {shape}); wrong weights file?")
    params[path] = kernel
    params[path[:-1] + ("bias",)] = bias
  return _unflatten(params)


class InceptionFeatures:
  """Pool3 features of the FID Inception: `features(images [B, H, W, C] in [-1, 1]) -> [B, 2048]`.

  Build it with `InceptionFeatures.load(path)` (real weights) or `InceptionFeatures.random(seed)`
  (random weights, for tests only: such features give meaningless FIDs).
  """

  def __init__(self, params: dict):
    self.params = params
    module = FIDInceptionV3()
    self._features = jax.jit(lambda p, x: module.apply({"params": p}, preprocess(x)))

  @classmethod
  def load(cls, path: str) -> "InceptionFeatures":
    """Loads an .npz made by `--convert` (see the module docstring)."""
    if not path or not os.path.exists(path):
      raise FileNotFoundError(f"Inception weights file not found: {path!r}.\n{_HOW_TO_GET_WEIGHTS}")
    if path.endswith((".pth", ".pt")):
      raise ValueError(f"{path} is a PyTorch file; convert it to .npz first:\n"
                       f"  python -m sami_jax.evaluation.inception --convert {path} "
                       "inception_fid.npz")
    try:
      with np.load(path) as data:
        state = {k: data[k] for k in data.files}
    except (OSError, ValueError) as e:
      raise ValueError(f"Could not read {path} as an .npz file ({e}).\n"
                       f"{_HOW_TO_GET_WEIGHTS}") from e
    return cls(jax.tree_util.tree_map(jnp.asarray, params_from_state_dict(state)))

  @classmethod
  def random(cls, seed: int = 0) -> "InceptionFeatures":
    """Random weights: for tests of the wiring, never for reported FIDs.

    He-normal kernels (so activations keep their scale through the 94 ReLU layers) and small
    random biases, drawn with numpy from the parameter shapes: Flax's init would run (and compile)
    a full forward pass, tens of seconds on a CPU.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in _param_shapes().items():
      if path[-1] == "kernel":
        fan_in = int(np.prod(shape[:-1]))
        params[path] = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape).astype(np.float32)
      else:
        params[path] = rng.normal(0.0, 0.1, shape).astype(np.float32)
    return cls(jax.tree_util.tree_map(jnp.asarray, _unflatten(params)))

  def features(self, images) -> jax.Array:
    """Pool3 features.

    Args:
      images: [B, H, W, C] with C = 1 (grayscale, repeated to RGB) or 3, values in [-1, 1]
        (the SAMI data range); any H, W (resized bilinearly to 299x299).

    Returns:
      [B, 2048] float32. Each distinct (B, H, W, C) compiles once.
    """
    images = jnp.asarray(images)
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"images must be [B, H, W, C] with C = 1 or 3 (NHWC, values in [-1, 1]); "
                       f"got shape {images.shape}.")
    return self._features(self.params, images)


def convert(in_path: str, out_path: str) -> None:
  """Converts pytorch-fid's .pth weights to the .npz this module loads (needs torch)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise SystemExit("Converting needs PyTorch (pip install torch; the CPU build is enough) in "
                     "the environment that runs --convert; the .npz it writes then loads "
                     "without it.") from e
  if not os.path.exists(in_path):
    raise FileNotFoundError(f"{in_path} does not exist.\n{_HOW_TO_GET_WEIGHTS}")
  state = torch.load(in_path, map_location="cpu")
  if isinstance(state, dict) and "state_dict" in state:
    state = state["state_dict"]
  arrays = {k: v.detach().cpu().numpy() for k, v in state.items()
            if hasattr(v, "detach") and not k.endswith("num_batches_tracked")}
  params_from_state_dict(arrays)  # Validates names and shapes before anything is written.
  np.savez(out_path, **arrays)
  print(f"wrote {len(arrays)} arrays to {out_path}")


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(
      prog="python -m sami_jax.evaluation.inception",
      description="Convert pytorch-fid Inception weights (.pth) to the .npz sami_jax loads.")
  parser.add_argument("--convert", nargs=2, metavar=("IN_PTH", "OUT_NPZ"), required=True,
                      help=f"pytorch-fid weights (from {WEIGHTS_URL}) and the output path.")
  args = parser.parse_args(argv)
  convert(*args.convert)


if __name__ == "__main__":
  main(sys.argv[1:])
