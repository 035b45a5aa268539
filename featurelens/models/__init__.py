"""Model loading: embedded GGUF models, Hugging Face directories and hub ids, live transformers models."""
