"""lychee.rerank: generated stubs and the typed client for the Lychee rerank service."""
