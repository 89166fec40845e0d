"""The serving layer: padded batches, chat sessions and their cache policies, memory limits."""
