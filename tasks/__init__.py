"""Tasks: what is learned (image classification, machine translation, language modelling)."""
