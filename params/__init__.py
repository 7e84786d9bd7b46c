"""Registered experiment configs.

Every module under this package is imported by `lingvo_gpipe.model_registry` on the first
lookup, so a config registered with `@model_registry.RegisterModel` is found by `--model=`
without being imported by hand. Its registry name is its module path below `params` plus its
class name: class `AmoebaNetD` in `params/image/cifar10.py` is `image.cifar10.AmoebaNetD`.
"""
