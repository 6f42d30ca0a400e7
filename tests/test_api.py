"""The Python API (sami_jax.load / Model), --mode=export, the folder config and the example script.

One tiny Disks checkpoint is trained per module and shared by every test. The example script
(which trains the folder `test` config on a folder with a corrupt file) runs as a subprocess
started before that training, so the two compile in parallel.
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import sami_jax
from sami_jax import api
from sami_jax import checkpoint as ckpt_lib
from sami_jax import configlib
from sami_jax import export
from sami_jax import inference
from sami_jax import samplers
from sami_jax import train
from sami_jax.data import folder as folder_lib
from sami_jax.data import pipeline
from tests.test_config import ROOT, load_config, xla_flags

STEPS = 3  # reverse diffusion steps for every sampling call here (one compiled shape)
N = 6      # images used by the sampling tests (chunks of 4 vs one chunk of 8)


# ------------------------------------------------------------------------------ fixtures


def _write_folder(folder):
  """5 readable images (PNG and JPEG, one in a subfolder, odd sizes) and one corrupt file."""
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(folder, "sub"))
  names = ["a.png", "b.jpg", "sub/c.png", "d.jpeg", "e.PNG"]
  for i, name in enumerate(names):
    pixels = rng.integers(0, 256, (12 + 3 * i, 10 + i, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(os.path.join(folder, name),
                                 format="JPEG" if name.endswith(("jpg", "jpeg")) else "PNG")
  with open(os.path.join(folder, "broken.png"), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
  return names


@pytest.fixture(scope="module")
def folder_script(tmp_path_factory):
  """The README's own-images walk-through, started in the background: 2 steps of
  configs/folder.py:test from the command line, then examples/own_images.py on the run."""
  base = tmp_path_factory.mktemp("folder")
  folder = str(base / "images")
  os.makedirs(folder)
  names = _write_folder(folder)
  workdir, data_dir = str(base / "run"), str(base / "tfds")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(1))
  log = open(base / "script.log", "w+")
  script = (
      f"{sys.executable} -m sami_jax.main --config=configs/folder.py:test --workdir={workdir} "
      f"--config.data.folder={folder} --config.data.data_dir={data_dir} "
      "--config.train.num_steps=2 --config.train.ckpt_every=2 && "
      f"{sys.executable} examples/own_images.py --workdir={workdir} --folder={folder} "
      "--num_images=4")
  proc = subprocess.Popen(["bash", "-c", script], cwd=ROOT, env=env, stdout=log,
                          stderr=subprocess.STDOUT, text=True)
  info = {"proc": proc, "log": log, "folder": folder, "names": names, "workdir": workdir,
          "data_dir": data_dir}
  yield info
  if proc.poll() is None:
    proc.kill()
  log.close()


def _finished(info) -> str:
  """Waits for the example script; returns its output (fails the test if it failed)."""
  rc = info["proc"].wait(timeout=600)
  info["log"].seek(0)
  out = info["log"].read()
  assert rc == 0, out[-4000:]
  return out


@pytest.fixture(scope="module")
def run(tmp_path_factory, folder_script):
  """A 4-step disks `test` checkpoint (steps 2 and 4 kept)."""
  del folder_script  # started first so that it trains while this one does
  base = tmp_path_factory.mktemp("disks")
  config = load_config("disks", "test")
  config.data.data_dir = str(base / "tfds")
  config.train.write_grids = False
  config.train.probe_at_end = False
  # One resolution level and no attention: the test variant otherwise, at half the compile time.
  config.model.denoiser.ch_mult = (1,)
  config.model.denoiser.attn_resolutions = ()
  config.model.encoder.ch_mult = (1,)
  workdir = str(base / "run")
  train.train(config, workdir)
  return {"config": config, "workdir": workdir}


@pytest.fixture(scope="module")
def model(run):
  return sami_jax.load(run["workdir"], batch_size=4)


@pytest.fixture(scope="module")
def test_split(run):
  """The whole disks test split read straight from the TFDS source: uint8 images, ids, factors."""
  src = pipeline.dataset_for(run["config"]).source("test")
  records = [src[i] for i in range(len(src))]
  return {"image": np.stack([np.asarray(r["image"]) for r in records]),
          "id": np.array([int(r["id"]) for r in records]),
          "factors": np.stack([np.asarray(r["factors"], np.float32) for r in records])}


# ------------------------------------------------------------------------------ references


def _float(u8):
  return u8.astype(np.float64) / 127.5 - 1.0


def _reference_encode(model, x_float):
  """Posterior (mean, std) from the encoder module itself, in one batch."""
  encoder = inference.components(model.config).encoder
  x = jnp.asarray(x_float, jnp.float32)
  t = jnp.zeros((x.shape[0],)) if encoder.time_conditioning else None  # clean images: t = 0
  mean, std = encoder.apply({"params": model.params["encoder"]}, x, t)
  return np.asarray(mean), np.asarray(std)


@jax.jit
def _noise(seed, ids):
  """The documented initial noise of rows with these noise ids, [B, 1, H, W, C] -> squeezed."""
  base = jax.random.fold_in(jax.random.PRNGKey(seed), 0)
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), (8, 8, 1)))(ids)


def _reference_decode(model, z, seed, shared=False, guided=True):
  """Guided DDIM from the documented noise, the whole batch at once through samplers.sample."""
  comp = inference.components(model.config)
  denoiser, encoder, schedule = comp.image_model, comp.encoder, comp.schedule
  ids = jnp.zeros(len(z), jnp.int32) if shared else jnp.arange(len(z), dtype=jnp.int32)
  x_init = _noise(np.uint32(seed), ids)
  if guided:
    eps_fn = samplers.conditional_eps_fn(denoiser, encoder, model.params, jnp.asarray(z),
                                         time_conditioning=comp.time_conditioning,
                                         schedule=schedule)
  else:
    eps_fn = samplers.unconditional_eps_fn(denoiser, model.params)
  out = samplers.sample(eps_fn, schedule, x_init, jax.random.PRNGKey(99), steps=STEPS)
  return np.asarray(out)


# ------------------------------------------------------------------------------ load


def test_import_is_lazy_and_load_is_exported():
  code = "import sys, sami_jax; assert 'jax' not in sys.modules, 'import sami_jax imported jax'"
  subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=60)
  assert sami_jax.load is api.load
  assert sami_jax.Model is api.Model


def test_load_restores_the_run_config_step_and_ema_params(run, model):
  assert model.step == 4
  assert model.config.model.kind == "sami"
  assert (model.config.data.image_size, model.config.data.channels) == (8, 1)
  assert model.image_shape == (8, 8, 1) and model.latent_dim == 3
  ema = ckpt_lib.restore_params_only(os.path.join(run["workdir"], "checkpoints"), step=4)
  flat_model = jax.tree_util.tree_leaves_with_path(model.params)
  flat_ema = dict(jax.tree_util.tree_leaves_with_path(ema))
  assert len(flat_model) == len(flat_ema)
  for path, leaf in flat_model:
    np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_ema[path]))

  older = sami_jax.load(run["workdir"], step=2)
  assert older.step == 2
  leaf = jax.tree_util.tree_leaves(older.params["encoder"])[0]
  assert not np.array_equal(np.asarray(leaf), np.asarray(
      jax.tree_util.tree_leaves(model.params["encoder"])[0]))


def test_load_of_a_step_folder_loads_that_step(run, model):
  older = sami_jax.load(os.path.join(run["workdir"], "checkpoints", "2"))
  assert older.step == 2
  newer = sami_jax.load(os.path.join(run["workdir"], "checkpoints", "4"), step=4)
  for a, b in zip(jax.tree.leaves(newer.params), jax.tree.leaves(model.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match=r"folder of step 2, but step=4.*workdir .*step=4"):
    sami_jax.load(os.path.join(run["workdir"], "checkpoints", "2"), step=4)


def test_load_without_a_checkpoint_says_so(run, tmp_path):
  with pytest.raises(FileNotFoundError, match="[Nn]o checkpoints in"):
    sami_jax.load(str(tmp_path / "nothing_here"))
  with pytest.raises(FileNotFoundError, match=r"step 3.*\[2, 4\]"):
    sami_jax.load(run["workdir"], step=3)


# ------------------------------------------------------------------------------ encode


def test_encode_matches_the_encoder_for_uint8_float_and_single_images(model, test_split):
  u8 = test_split["image"][:N]
  mean, std = model.encode(u8)
  assert mean.shape == std.shape == (N, 3)
  assert mean.dtype == std.dtype == np.float32
  ref_mean, ref_std = _reference_encode(model, _float(u8))
  np.testing.assert_allclose(mean, ref_mean, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(std, ref_std, atol=1e-5, rtol=1e-5)
  assert np.all(std > 0)

  mean_f, std_f = model.encode(_float(u8).astype(np.float32))
  np.testing.assert_allclose(mean_f, mean, atol=1e-6)
  np.testing.assert_allclose(std_f, std, atol=1e-6)
  mean_1, _ = model.encode(u8[2])  # one HWC image -> a batch of one
  assert mean_1.shape == (1, 3)
  np.testing.assert_allclose(mean_1[0], mean[2], atol=1e-6)


def test_batching_gives_the_same_result_as_one_batch(model, test_split):
  u8 = test_split["image"][:N]
  one_batch = api.Model(model.config, model.params, model.step, batch_size=8)
  assert model.batch_size == 4 < N  # chunks of 4 rows, the last one padded
  np.testing.assert_allclose(model.encode(u8)[0], one_batch.encode(u8)[0], atol=1e-6)
  rec_chunked = model.reconstruct(u8, steps=STEPS, seed=3)
  size_after_first = model._decode_chunk._cache_size()  # pylint: disable=protected-access
  np.testing.assert_allclose(rec_chunked, one_batch.reconstruct(u8, steps=STEPS, seed=3),
                             atol=1e-5)
  # Jitted once per shape: a second call with the same shapes compiles nothing new.
  np.testing.assert_array_equal(model.reconstruct(u8, steps=STEPS, seed=3), rec_chunked)
  assert model._decode_chunk._cache_size() == size_after_first  # pylint: disable=protected-access


# ------------------------------------------------------------------------------ sampling


def test_reconstruct_equals_guided_sampling_from_the_posterior_mean(model, test_split):
  u8 = test_split["image"][:N]
  rec = model.reconstruct(u8, steps=STEPS, seed=5)
  assert rec.shape == (N, 8, 8, 1) and rec.dtype == np.float32
  assert rec.min() >= -1.0 and rec.max() <= 1.0
  ref_mean, _ = _reference_encode(model, _float(u8))
  np.testing.assert_allclose(rec, _reference_decode(model, ref_mean, seed=5), atol=1e-4)
  assert not np.allclose(rec, model.reconstruct(u8, steps=STEPS, seed=6), atol=1e-3)


def test_generate_draws_z_from_the_prior_and_is_seeded(model):
  samples = model.generate(N, seed=7, steps=STEPS)
  assert samples.shape == (N, 8, 8, 1) and samples.dtype == np.float32
  assert samples.min() >= -1.0 and samples.max() <= 1.0
  z = np.random.default_rng(7).standard_normal((N, 3)).astype(np.float32)
  np.testing.assert_allclose(samples, _reference_decode(model, z, seed=7), atol=1e-4)
  np.testing.assert_array_equal(model.generate(N, seed=7, steps=STEPS), samples)
  with pytest.raises(ValueError, match="n must be >= 1"):
    model.generate(0)


def test_traverse_and_interpolate(model, test_split):
  a, b = test_split["image"][0], test_split["image"][1]
  (mean_a,), _ = _reference_encode(model, _float(a[None]))
  (mean_b,), _ = _reference_encode(model, _float(b[None]))
  values = np.linspace(-2.0, 2.0, N)
  rows = model.traverse(a, 1, values, steps=STEPS, seed=2)
  assert rows.shape == (N, 8, 8, 1) and rows.dtype == np.float32
  z = np.repeat(mean_a[None], N, axis=0)
  z[:, 1] = values
  np.testing.assert_allclose(rows, _reference_decode(model, z, seed=2, shared=True), atol=1e-4)

  path = model.interpolate(a, b, N, steps=STEPS, seed=2)
  assert path.shape == (N, 8, 8, 1) and path.dtype == np.float32
  w = np.linspace(0.0, 1.0, N)[:, None]
  z = (1 - w) * mean_a[None] + w * mean_b[None]
  np.testing.assert_allclose(path, _reference_decode(model, z, seed=2, shared=True), atol=1e-4)

  with pytest.raises(ValueError, match="dim=3 is out of range"):
    model.traverse(a, 3, values)
  with pytest.raises(ValueError, match="expected one image"):
    model.traverse(test_split["image"][:2], 0, values)


def test_to_uint8():
  out = api.to_uint8(np.array([-1.0, 0.0, 1.0, 2.0, np.nan], np.float32))
  np.testing.assert_array_equal(out, np.array([0, 128, 255, 255, 0], np.uint8))


# ------------------------------------------------------------------------------ input errors


@pytest.mark.parametrize("shape,dtype,match", [
    ((9, 9, 1), np.uint8, r"\[8, 8, 1\].*got \[9, 9, 1\].*resize to 8x8"),
    ((2, 8, 8, 3), np.uint8, r"\[8, 8, 1\].*got \[8, 8, 3\].*grayscale"),
    ((8, 8), np.uint8, r"channel axis"),
    ((8, 8, 1), np.int64, r"dtype int64"),
])
def test_wrong_images_raise_value_errors_naming_the_shapes(model, shape, dtype, match):
  with pytest.raises(ValueError, match=match):
    model.encode(np.zeros(shape, dtype))


def test_bad_latents_guidance_seed_and_channel_order_are_named(model, test_split):
  u8 = test_split["image"][:2]
  with pytest.raises(ValueError, match="z contains NaN"):
    model.decode(np.full((1, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match="guidance_scale must be a finite number"):
    model.reconstruct(u8, guidance_scale=float("nan"))
  with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*32\), got seed=-3"):
    model.generate(2, seed=-3)
  with pytest.raises(ValueError, match=r"channels first \(NCHW\).*transpose\(0, 2, 3, 1\)"):
    model.encode(np.zeros((2, 1, 8, 8), np.uint8))


def test_sampling_defaults_come_from_the_run_config(model, test_split, monkeypatch):
  u8 = test_split["image"][:2]
  steps = model.config.sampling.steps
  default = model.reconstruct(u8, seed=4)
  np.testing.assert_array_equal(default, model.reconstruct(u8, steps=steps, seed=4))
  # Every sampling method compiles with the run's sampling.steps unless told otherwise.
  seen = []
  real = model._decode_chunk  # pylint: disable=protected-access

  def spy(*args, steps):
    seen.append(steps)
    return real(*args, steps=steps)
  monkeypatch.setattr(model, "_decode_chunk", spy)
  model.reconstruct(u8)
  model.generate(2)
  model.traverse(u8[0], 0, [0.0, 1.0])
  model.interpolate(u8[0], u8[1], 2)
  model.reconstruct(u8, steps=7)
  assert seen == [steps, steps, steps, steps, 7]


def test_a_deterministic_encoder_has_no_posterior_std(model, test_split):
  from sami_jax import models as models_lib  # pylint: disable=g-import-not-at-top
  config = configlib.copy(model.config)
  config.model.kind = "diffae"
  params = models_lib.initialize(config, jax.random.PRNGKey(0))
  diffae = api.Model(config, params, 0, batch_size=4)
  assert not diffae.has_posterior and model.has_posterior
  mean, std = diffae.encode(test_split["image"][:2])
  assert mean.shape == (2, 3) and std is None
  with pytest.raises(ValueError, match="deterministic"):
    diffae.reconstruct(test_split["image"][:2], use_mean=False)


def test_float_images_outside_minus_one_one_are_rejected(model):
  with pytest.raises(ValueError, match=r"\[-1, 1\].*\[0, 255\]"):
    model.encode(np.full((8, 8, 1), 200.0, np.float32))


def test_a_ddpm_model_generates_but_does_not_encode(model):
  config = configlib.copy(model.config)
  config.model.kind = "ddpm"
  ddpm = api.Model(config, model.params, model.step, batch_size=4)
  for call in (lambda: ddpm.encode(np.zeros((8, 8, 1), np.uint8)),
               lambda: ddpm.reconstruct(np.zeros((8, 8, 1), np.uint8)),
               lambda: ddpm.traverse(np.zeros((8, 8, 1), np.uint8), 0, [0.0])):
    with pytest.raises(ValueError, match="model.kind='ddpm'.*Only Model.generate"):
      call()
  samples = ddpm.generate(4, seed=1, steps=STEPS)
  assert samples.shape == (4, 8, 8, 1) and samples.dtype == np.float32
  z_unused = np.zeros((4, 3), np.float32)
  np.testing.assert_allclose(samples, _reference_decode(ddpm, z_unused, seed=1, guided=False),
                             atol=1e-4)


# ------------------------------------------------------------------------------ export


def _export_config(run, **eval_fields):
  config = load_config("disks", "test")
  config.data.data_dir = run["config"].data.data_dir
  for k, v in eval_fields.items():
    config.eval[k] = v
  return config


def test_export_npz_equals_model_encode(run, model, test_split):
  path = export.run(_export_config(run), run["workdir"], batch_size=24)  # 64 = 24 + 24 + 16
  assert path == os.path.join(run["workdir"], "export", "test_4.npz")
  with np.load(path) as f:
    out = {k: f[k] for k in f.files}
  np.testing.assert_array_equal(out["id"], test_split["id"])
  mean, std = _reference_encode(model, _float(test_split["image"]))
  np.testing.assert_allclose(out["mean"], mean, atol=1e-5)
  np.testing.assert_allclose(out["std"], std, atol=1e-5)
  np.testing.assert_array_equal(out["factors"], test_split["factors"])
  assert list(out["factor_names"]) == ["x", "y", "background"]
  assert int(out["step"]) == 4 and str(out["split"]) == "test"
  assert not os.path.exists(path + ".parts") and not os.path.exists(path + ".incomplete")


def test_export_parquet_row_groups_equal_model_encode(run, model, test_split):
  path = export.run(_export_config(run, export_format="parquet"), run["workdir"], batch_size=24)
  assert path.endswith(os.path.join("export", "test_4.parquet"))
  f = pq.ParquetFile(path)
  assert f.metadata.num_row_groups == 3
  table = f.read().to_pydict()
  assert f.schema_arrow.metadata[b"step"] == b"4"
  np.testing.assert_array_equal(table["id"], test_split["id"])
  mean, std = _reference_encode(model, _float(test_split["image"]))
  for j in range(3):
    np.testing.assert_allclose(table[f"mean_{j}"], mean[:, j], atol=1e-5)
    np.testing.assert_allclose(table[f"std_{j}"], std[:, j], atol=1e-5)
  for j, name in enumerate(["x", "y", "background"]):
    np.testing.assert_array_equal(table[f"factor_{name}"], test_split["factors"][:, j])


def test_export_rejects_an_unknown_format_and_split(run):
  with pytest.raises(ValueError, match="export_format='csv'"):
    export.run(_export_config(run, export_format="csv"), run["workdir"])
  with pytest.raises(ValueError, match="export_split='validation'.*train"):
    export.run(_export_config(run, export_split="validation"), run["workdir"])


# ------------------------------------------------------------------------------ folder + example


def test_folder_config_trains_and_lists_the_corrupt_file(folder_script):
  out = _finished(folder_script)
  assert "broken.png" in out and "Downloading" not in out
  m = sami_jax.load(folder_script["workdir"])
  assert m.step == 2
  assert m.config.data.name == "folder" and m.image_shape == (8, 8, 3)
  with open(os.path.join(folder_script["workdir"], "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  assert [r["step"] for r in metrics][-1] == 2 and all(np.isfinite(r["loss"]) for r in metrics)

  config = m.config
  config.data.data_dir = folder_script["data_dir"]
  ds = folder_lib.FolderDataset(config)
  skipped = ds.skipped_files()
  assert len(skipped) == 1 and skipped[0].startswith("broken.png")
  files = ds.files()
  assert sorted(files["train"] + files["test"]) == sorted(folder_script["names"])
  assert len(files["test"]) >= 1

  # Export on a folder run names each row's file.
  config.eval.export_split = "train"
  path = export.run(config, folder_script["workdir"])
  with np.load(path) as f:
    assert list(f["file"]) == [files["train"][i] for i in f["id"]]
    assert f["mean"].shape == (len(files["train"]), 3)


def test_example_script_runs_the_api_walk_through(folder_script):
  out = _finished(folder_script)
  wd = folder_script["workdir"]
  path = out.strip().splitlines()[-1]
  assert path == os.path.join(wd, "export", "test_2.npz")
  assert "Model(kind='sami', step=2, image_shape=(8, 8, 3), latent_dim=3" in out
  assert "encoded 4 images [4, 8, 8, 3] -> latent means [4, 3]" in out
  assert "exported 1 test latents" in out or "exported 2 test latents" in out
  # Library noise (issue: a warning per dataset open for our own builders' configs): neither the
  # command line nor the API shows it.
  assert "Using custom data configuration" not in out
  assert "Unable to initialize backend" not in out
  with Image.open(os.path.join(wd, "example_reconstructions.png")) as im:
    # 2 rows (originals, reconstructions) x 4 images of 8 px, each cell enlarged to >= 64 px.
    assert im.size[0] >= 4 * 64 and im.size[1] >= 2 * 64
  with Image.open(os.path.join(wd, "example_traversal.png")) as im:
    assert im.size[0] >= 3 * 64  # configs/folder.py:test traverses 3 points
