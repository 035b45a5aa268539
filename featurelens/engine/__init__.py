"""The model engine: config, hooked forward pass, generation. Knows nothing of data, dictionaries or serving."""
