"""Ways into and out of lin_llm: checkpoint formats read and written (so far: GGUF)."""
