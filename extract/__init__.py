"""Audio corpora to cached arrays: readers, audio, VAD, feature backends, the extraction loop."""
