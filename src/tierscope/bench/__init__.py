"""Evaluation harness (``tierscope bench ...``); submodules import their heavy dependencies lazily.

- :mod:`tierscope.bench.codec`: codec ratio / error / speed benchmark (``tierscope bench codec``);
- :mod:`tierscope.bench.patterns`: seeded access patterns, their metrics, sequence files;
- :mod:`tierscope.bench.link`: the shaping TCP proxy that emulates a link;
- :mod:`tierscope.bench.systems`, :mod:`tierscope.bench.replay`, :mod:`tierscope.bench.plots`: replay of
  sequences against tierscope and the baselines, results and figures (``tierscope bench``).
"""
