"""The LLM the CTR models are built from: its layers (`backbone`), where it comes from
(`registry`), its token ids (`tokens`), and the CTR models on top (`ctr`)."""
