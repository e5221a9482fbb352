"""The pipeline's steps and what they share (`runner`: which process is primary, process pools)."""
