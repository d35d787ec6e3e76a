"""Data: tokenizer, prompt processing, datasets and collation."""
