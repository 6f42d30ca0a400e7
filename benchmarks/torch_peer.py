r"""The PyTorch yardstick for the 32x32 train-step benchmark: the same model and step, eager PyTorch.

  pip install torch          # not a sami_jax dependency; any recent CPU build
  python benchmarks/torch_peer.py [--steps=10] [--threads=2] [--memory_format=channels_last] \
      [--kinds=ddpm,sami] [--profile] [--out=results/torch_peer.json]

Prints one JSON object. It times the model of the `cpu_32x32_ch32` target (benchmarks/targets.json)
written in PyTorch, so that our step can be compared with a mainstream stack *on the same CPU*:
a fraction of "the measured matmul peak" depends on the CPU (its peak, its caches), a ratio to
this peer measured back to back does not.

The model, layer for layer as sami_jax's (sami_jax/models/{unet,encoder,layers}.py):
  U-Net ch 32 x (1, 2, 2), one res block per level on the way down (two on the way up), middle
  attention only, GroupNorm(8, eps 1e-6), dropout 0.1, sinusoidal time embedding (32) -> 128 ->
  128: 1,062,497 parameters. Encoder: the same down path without time input, GroupNorm + SiLU,
  global mean pooling, Dense 64 -> 64, SiLU, mean and std heads (8 latents; the std head is the
  same smooth bound): 202,288 parameters. Both counts are checked against those numbers.
The step, as sami_jax.objective's: t ~ U(0, 1) on the cosine schedule, x_t = alpha x0 + sigma eps,
eps_theta = unet(x_t, t) (dropout on); for "sami" also (mean0, std0) = enc(x0),
z = mean0 + std0 eta, g = d/dx_t sum log q(z | x_t) with create_graph=True (the guidance score,
differentiated again by the backward pass), eps_hat = eps_theta - sigma g, loss = mean((eps -
eps_hat)^2) + beta KL / pixels; backward; global-norm clip at 1, Adam (lr 2e-4, b2 0.99), EMA
0.999 (the optimizer of configs/disks.py). "ddpm" is the U-Net alone.

Per kind: first_step_s (PyTorch's eager warm-up: the first step, allocation and kernel choice),
step_time (median_s, mean_s, min_s, max_s over --steps after 2 warm-up steps, process CPU median),
params, and with --profile the top operators by self CPU time over 3 more steps (torch.profiler).
"peak": the best FLOP/s of a 2048^2 float32 torch.matmul on the same threads (the peer's own
matmul; our fractions of peak use jax's, from benchmarks/train_step.py). How the two are compared
back to back: benchmarks/README.md, "Against a PyTorch peer". torch.compile is not used: it cannot
compile the double backward through autograd.grad.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

# The model of benchmarks/targets.json's cpu_32x32_ch32 (and benchmarks/README.md).
CH, CH_MULT, GROUPS, DROPOUT, LATENTS, IMAGE, CHANNELS = 32, (1, 2, 2), 8, 0.1, 8, 32, 1
EXPECTED_PARAMS = {"unet": 1_062_497, "encoder": 202_288}


def _groups(channels: int, groups: int = GROUPS) -> int:
  return next(g for g in range(min(groups, channels), 0, -1) if channels % g == 0)


def _norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(_groups(channels), channels, eps=1e-6)


class ResBlock(nn.Module):
  """GN -> SiLU -> conv3x3 (+ time proj) -> GN -> SiLU -> dropout -> conv3x3, 1x1 skip if needed."""

  def __init__(self, c_in: int, c_out: int, temb_dim: int | None, dropout: float):
    super().__init__()
    self.norm_0, self.conv_0 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
    self.temb_proj = nn.Linear(temb_dim, c_out) if temb_dim else None
    self.norm_1, self.conv_1 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
    self.dropout = nn.Dropout(dropout)
    self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

  def forward(self, x, temb=None):
    h = self.conv_0(F.silu(self.norm_0(x)))
    if self.temb_proj is not None:
      h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
    h = self.conv_1(self.dropout(F.silu(self.norm_1(h))))
    return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):
  """Residual single-head self-attention over the H*W positions (GN, qkv, softmax, out)."""

  def __init__(self, c: int):
    super().__init__()
    self.norm, self.qkv, self.out = _norm(c), nn.Linear(c, 3 * c), nn.Linear(c, c)

  def forward(self, x):
    b, c, hh, ww = x.shape
    h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
    q, k, v = self.qkv(h).chunk(3, dim=-1)
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(c), dim=-1)
    out = self.out(w @ v).transpose(1, 2).reshape(b, c, hh, ww)
    return x + out


def _timestep_features(t, dim: int):
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
  args = 1000.0 * t[:, None] * freqs[None, :]
  return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class UNet(nn.Module):
  """eps_theta(x_t, t): [B, C, H, W], [B] -> [B, C, H, W]."""

  def __init__(self):
    super().__init__()
    emb = 4 * CH
    self.temb = nn.Sequential(nn.Linear(emb // 4, emb), nn.SiLU(), nn.Linear(emb, emb))
    self.conv_in = nn.Conv2d(CHANNELS, CH, 3, padding=1)
    self.down, skip_ch, c = nn.ModuleList(), [CH], CH
    for i, mult in enumerate(CH_MULT):
      self.down.append(ResBlock(c, CH * mult, emb, DROPOUT))
      c = CH * mult
      skip_ch.append(c)
      if i != len(CH_MULT) - 1:
        self.down.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        skip_ch.append(c)
    self.mid = nn.ModuleList([ResBlock(c, c, emb, DROPOUT), Attention(c),
                              ResBlock(c, c, emb, DROPOUT)])
    self.up = nn.ModuleList()
    for i in reversed(range(len(CH_MULT))):
      for _ in range(2):
        self.up.append(ResBlock(c + skip_ch.pop(), CH * CH_MULT[i], emb, DROPOUT))
        c = CH * CH_MULT[i]
      if i != 0:
        self.up.append(nn.Conv2d(c, c, 3, padding=1))  # after a nearest x2 upsampling
    self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, CHANNELS, 3, padding=1)

  def forward(self, x, t):
    temb = self.temb(_timestep_features(t, CH))
    h = self.conv_in(x)
    skips = [h]
    for layer in self.down:
      h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
      skips.append(h)
    h = self.mid[2](self.mid[1](self.mid[0](h, temb)), temb)
    for layer in self.up:
      if isinstance(layer, ResBlock):
        h = layer(torch.cat([h, skips.pop()], dim=1), temb)
      else:
        h = layer(F.interpolate(h, scale_factor=2, mode="nearest"))
    return self.conv_out(F.silu(self.norm_out(h)))


def _softplus_inv(y: float) -> float:
  return y + math.log(-math.expm1(-y))


class Encoder(nn.Module):
  """q(z | x): [B, C, H, W] -> (mean, std), [B, LATENTS] each; std in (1e-3, 10), 1 at init."""

  def __init__(self):
    super().__init__()
    layers, c = [nn.Conv2d(CHANNELS, CH, 3, padding=1)], CH
    for i, mult in enumerate(CH_MULT):
      layers.append(ResBlock(c, CH * mult, None, 0.0))
      c = CH * mult
      if i != len(CH_MULT) - 1:
        layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
    self.body, self.norm_out = nn.Sequential(*layers), _norm(c)
    self.hidden = nn.Linear(c, c)
    self.mean_head, self.std_head = nn.Linear(c, LATENTS), nn.Linear(c, LATENTS)
    nn.init.zeros_(self.std_head.weight)
    nn.init.zeros_(self.std_head.bias)
    lo, hi = 1e-3, 10.0
    self.lo, self.cap = lo, _softplus_inv(hi - lo)
    self.offset = self.cap - _softplus_inv(self.cap - _softplus_inv(1.0 - lo))

  def forward(self, x):
    h = F.silu(self.norm_out(self.body(x))).mean(dim=(2, 3))
    h = F.silu(self.hidden(h))
    v = self.std_head(h) + self.offset
    std = self.lo + F.softplus(self.cap - F.softplus(self.cap - v))
    return self.mean_head(h), std


def make_step(kind: str, unet: UNet, encoder: Encoder):
  params = list(unet.parameters()) + (list(encoder.parameters()) if kind == "sami" else [])
  opt = torch.optim.Adam(params, lr=2e-4, betas=(0.9, 0.99), eps=1e-8)
  ema = [q.detach().clone() for q in params]

  def step(x0):
    b = x0.shape[0]
    pixels = x0[0].numel()
    t = torch.rand(b)
    alpha, sigma = torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)
    eps = torch.randn_like(x0)
    x_t = alpha[:, None, None, None] * x0 + sigma[:, None, None, None] * eps
    eps_hat = unet(x_t, t)
    loss = 0.0
    if kind == "sami":
      mean0, std0 = encoder(x0)
      z = mean0 + std0 * torch.randn_like(mean0)
      x_in = x_t.detach().requires_grad_(True)  # the score is w.r.t. x_t, through the encoder
      mean, std = encoder(x_in)
      log_q = -0.5 * (((z - mean) / std) ** 2 + 2.0 * torch.log(std) + math.log(2 * math.pi)).sum()
      (g,) = torch.autograd.grad(log_q, x_in, create_graph=True)
      eps_hat = eps_hat - sigma[:, None, None, None] * g
      kl = 0.5 * (mean0 ** 2 + std0 ** 2 - 1.0 - 2.0 * torch.log(std0)).sum(-1)
      loss = 1e-3 * kl.mean() / pixels
    loss = loss + ((eps - eps_hat) ** 2).mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    with torch.no_grad():
      torch._foreach_lerp_(ema, [q.detach() for q in params], 1.0 - 0.999)  # pylint: disable=protected-access
    return loss.detach()

  return step


def _timed(fn):
  w0, c0 = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - w0, time.process_time() - c0


def op_profile(step, x0, steps: int = 3, top: int = 25) -> list[dict]:
  """The `top` operators by self CPU time over `steps` profiled steps: ms per step, calls."""
  from torch import profiler  # pylint: disable=g-import-not-at-top
  with profiler.profile(activities=[profiler.ProfilerActivity.CPU]) as prof:
    for _ in range(steps):
      step(x0)
  rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
  return [{"op": e.key, "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps,
           "calls_per_step": e.count / steps} for e in rows[:top]]


def benchmark(kind: str, steps: int, batch: int, memory_format, profile: bool = False) -> dict:
  torch.manual_seed(0)
  unet, encoder = UNet().to(memory_format=memory_format), Encoder().to(memory_format=memory_format)
  counts = {"unet": sum(p.numel() for p in unet.parameters()),
            "encoder": sum(p.numel() for p in encoder.parameters())}
  if counts != EXPECTED_PARAMS:
    raise SystemExit(f"torch_peer: parameter counts {counts} differ from sami_jax's "
                     f"{EXPECTED_PARAMS}; the peer no longer matches the benchmark model.")
  x0 = (torch.rand(batch, CHANNELS, IMAGE, IMAGE) * 2 - 1).contiguous(memory_format=memory_format)
  step = make_step(kind, unet, encoder)
  first, _ = _timed(lambda: step(x0))
  for _ in range(2):
    step(x0)
  walls, cpus = zip(*(_timed(lambda: step(x0)) for _ in range(steps)))
  result = {"first_step_s": first, "params": counts,
          "step_time": {"median_s": statistics.median(walls), "mean_s": statistics.mean(walls),
                        "min_s": min(walls), "max_s": max(walls),
                        "cpu_median_s": statistics.median(cpus)}}
  if profile:
    result["profile"] = op_profile(step, x0)
  return result


def matmul_peak(size: int = 2048, iters: int = 5) -> dict:
  a, b = torch.rand(size, size), torch.rand(size, size)
  a @ b
  best = min(_timed(lambda: a @ b)[0] for _ in range(iters))
  return {"size": size, "flops_per_sec": 2 * size ** 3 / best}


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--steps", type=int, default=10, help="Timed steps (after 2 warm-up steps).")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads.")
  p.add_argument("--kinds", default="ddpm,sami", help="Comma-separated: ddpm and/or sami.")
  p.add_argument("--memory_format", default="contiguous", choices=["contiguous", "channels_last"])
  p.add_argument("--profile", action="store_true",
                 help="Also profile 3 steps per kind (torch.profiler): the top operators' self time.")
  p.add_argument("--out", default=None, help="Also write the JSON here.")
  args = p.parse_args(argv)
  kinds = args.kinds.split(",")
  if not kinds or set(kinds) - {"ddpm", "sami"} or args.steps < 1 or args.threads < 1:
    p.error("--kinds takes ddpm and/or sami; --steps and --threads must be >= 1.")
  torch.set_num_threads(args.threads)
  fmt = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}[
      args.memory_format]
  result = {"benchmark": "torch_peer", "torch": torch.__version__, "python": platform.python_version(),
            "threads": args.threads, "memory_format": args.memory_format, "batch": args.batch,
            "steps": args.steps, "machine": platform.processor() or platform.machine(),
            "load_avg_1m": os.getloadavg()[0]}
  for kind in kinds:
    result[kind] = benchmark(kind, args.steps, args.batch, fmt, args.profile)
  result["peak"] = matmul_peak()
  result["max_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  text = json.dumps(result, indent=1)
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      f.write(text + "\n")


if __name__ == "__main__":
  main(sys.argv[1:])
