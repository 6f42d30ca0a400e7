"""I/O helpers for runs: metric writers and progress lines (`writers`), image grids (`images`).

Submodules are imported explicitly (`from sami_jax.utils import writers`) so that importing the
package does not pull in tensorboardX or PIL.
"""
