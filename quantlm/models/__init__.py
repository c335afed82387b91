"""Model structure (the LLaMA block as data) and the TriLM."""
