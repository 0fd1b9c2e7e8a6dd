"""Prompts: records and templates, class appending, LLM captions, each round's prompt file."""
