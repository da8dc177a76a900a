"""Evaluation harness (``tierscope bench ...``); submodules import their heavy dependencies lazily.

- :mod:`tierscope.bench.codec`: codec ratio / error / speed benchmark (``tierscope bench codec``).
"""
