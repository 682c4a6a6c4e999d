"""Evaluation: DreamBench-style metrics (CLIP-I, CLIP-T, DINO), toy-world identity and context accuracy, reports."""
