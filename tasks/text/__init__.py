"""Text utilities shared by the sequence tasks: subword vocabulary, fixed-length sequences."""
