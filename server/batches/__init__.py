"""OpenAI's Batch API: files, batches, and the runner that carries them out in-process."""
