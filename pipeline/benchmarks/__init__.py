"""Benchmarks: the data layouts of the public TTA benchmarks and the streams built from them.

Owns: `layouts` (manifests from CIFAR-C / ImageNet-C / class-folder data), `settings` (the
five evaluation settings as stream orders), `corrupt` (the canonical ImageNet-C corruptions on
Ray Data), `commands` (the `manifest` and `corrupt` commands), `zoo` (architectures no library
provides).

May import: `pipeline.config`, `pipeline.manifest`, `pipeline.embedded`, `pipeline.job` (to
start Ray), and `ttt`, `kb_index`, `workers`. Never `pipeline.analysis` or `pipeline.campaigns`.
"""
