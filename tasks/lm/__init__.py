"""Language modelling: the One Billion Word benchmark (lm1b)."""
