"""Generative vision-language models: official prompts, answer matching, backends, box-answer parsers."""
