"""Operations on whole checkpoints and roots: garbage collection, retention and prune, verified
copies and tiering, export to plain Hugging Face files, best-checkpoint records."""
