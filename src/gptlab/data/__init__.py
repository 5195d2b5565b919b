"""Text to batches: tokenizers, chat templates, records and sources, corpora, prepared shards."""
