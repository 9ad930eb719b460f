"""LangChain integration for the Lychee rerank service."""
