"""lingvo-gpipe: GPipe pipeline parallelism for TensorFlow 2 in the style of Lingvo.

Flow of a model: params -> layers -> pipeline -> task -> trainer. Importing this package imports
no submodule (and so no TensorFlow); import what you use, e.g.
`from lingvo_gpipe.core import hyperparams`.
"""
