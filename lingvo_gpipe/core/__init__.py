"""Core building blocks: NestedMap, Params, BaseLayer, layers and the GPipe pipeline."""
