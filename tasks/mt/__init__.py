"""Machine translation: WMT14 English-German (GPipe's Transformer task) and synthetic seq2seq."""
