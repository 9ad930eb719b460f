"""Generated protobuf / gRPC stubs for ``lychee.rerank.v1`` (see proto/ and scripts/gen_protos.sh)."""
