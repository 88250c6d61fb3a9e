"""Evaluation: judging generated images."""
